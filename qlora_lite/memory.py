"""Memory planner: the peak memory of a QLoRA fine-tune, per GPU, before it runs.

    peak per rank =  quantized weights   NF4 per linear (all but the head): ceil(n/2) + ceil(n/64)
                                         + 4·ceil(ceil(n/64)/256) + 4 bytes (as NF4Weight.nbytes)
                   + 16-bit weights      embeddings, norms, lm_head, biases · 2 bytes (tied once)
                   + LoRA params + grads r·(in+out) per target, in the adapter dtype (LoraConfig.lora_dtype:
                                         "auto" is the compute dtype on CUDA, fp32 on CPU)
                   + optimizer states    bitsandbytes AdamW 32-bit: 8 B/param; 8-bit: 2 B + 8 B per 256;
                                         torch AdamW: 2 states in the parameter's dtype
                   + paged optimizer     the part of those states bitsandbytes puts in CUDA managed memory
                                         (tensors of >= 1e5 values): invisible to torch's counters, own line
                   + activations         L · batch·seq·hidden·2   (checkpointed block inputs)
                                         + ONE of the two transients below, the larger:
                        block phase:  a recomputed block's saved tensors + backward workspace
                        loss phase:   final norm + the loss through the LM head: chunked (loss.py,
                                      the default) one chunk's fp32 logits (+ a compute-dtype copy
                                      when 16-bit) + the hidden state's gradient; unchunked,
                                      12 B/(token·vocab) (fp32 log-softmax output, its gradient,
                                      the gradient of its input)
                   + allocator slack     ALLOCATOR_SLACK × what torch allocates (the caching allocator's
                                         reserved − allocated: fragmentation, rounding, cached blocks)
                   + CUDA context        CUDA_CONTEXT_BYTES (driver context, kernels, cuBLAS handles)

    `recipe="peft"` predicts the peer (transformers + bitsandbytes + PEFT) for the same run instead:
    `memory_peer.py` says which terms change and why.

    host memory doing what the card cannot (offload.py; the terms: memory_offload.py): offload_activations,
    mlp_chunk_tokens (long context), offload_base (the layers' NF4 base in pinned host memory)

    host memory to load (`host_load_bytes`, not in the GPU peak) = the largest 16-bit checkpoint tensor
    per process streaming to its GPU; under FSDP (rank 0 reads, then sends the shards) or on CPU,
    one whole model as loaded (NF4 + 16-bit + LoRA) + that tensor.

The per-block formula is in `_block_bytes_per_token`; every term there was checked against the
tensors autograd saves in a transformers Llama layer (tests/test_memory.py). Parameter counts come
from the model built on the meta device, so they are exact for any architecture; the activation
formula assumes a pre-norm decoder block (RMSNorm, SDPA attention, gated or plain MLP, or a routed
mixture-of-experts MLP: `memory_moe.py`), and `memory_arch.model_shape` refuses what it does not
describe (encoders, Mamba, expert layouts other than transformers' fused experts). Expert
projections count like linears, one NF4 weight and one LoRA pair per expert.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .config import LoraConfig, QuantConfig, resolve_dtype, resolve_lora_dtype
from .errors import ConfigError, QLoraLiteError
from .memory_arch import (GB, GPU_MEMORY, GiB, ModelShape, builtin_configs, layer_index, load_model_config,
                          model_shape, parse_budget)
from .memory_moe import moe_mlp_bytes_per_token
from .memory_offload import OFFLOAD_RESIDENT_INPUTS, PCIE4_X16_GBPS, BaseOffload, base_offload, offload_lines
from .memory_peer import peer_terms
from .nf4 import nf4_nbytes

__all__ = [
    "GPU_MEMORY", "CUDA_CONTEXT_BYTES", "ALLOCATOR_SLACK", "PAGED_MIN_NUMEL", "MemoryEstimate", "MemoryBudgetError",
    "PCIE4_X16_GBPS", "estimate_memory", "parse_budget", "builtin_configs", "load_model_config", "nf4_nbytes",
    "plot_estimate", "GiB", "GB",
]

# The two constants a GPU run calibrates (docs/memory.md, "Calibrating on a GPU"): measured on an H100
# for the peer, Llama-2-7B 2048×1: reserved 8.44 GB against 7.01 GB allocated (+20.4 %); a slack of 20 %
# reproduces Unsloth's published HF+FA2 maximum contexts at 24-80 GB (tests/test_memory.py's anchors).
CUDA_CONTEXT_BYTES = 512 * 2**20  # torch's CUDA context with lazy module loading, + cuBLAS handles; not yet measured
ALLOCATOR_SLACK = 0.20  # reserved = allocated · (1 + ALLOCATOR_SLACK) at the peak
PAGED_MIN_NUMEL = 100_000  # bitsandbytes pages a state tensor of >= 1e5 values (Optimizer8bit.get_state_buffer)
BACKWARD_WORKSPACE_INTER = 2  # live (token × intermediate) gradient buffers while a block runs backward (3 before
# the LoRA scale moved into the matmul: test_memory::test_peak_matches_live_tensor_bytes measures it)
Optimizer = Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw"]
Recipe = Literal["qlora-lite", "peft"]
_OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw")
_COMPONENTS = {
    "quantized_weights": "quantized weights (NF4)", "weights_16bit": "unquantized weights", "lora_params": "LoRA parameters",
    "lora_grads": "LoRA gradients", "optimizer_states": "optimizer states", "optimizer_paged": "optimizer, paged",
    "activations": "activations", "logits": "logits & loss", "allocator_slack": "allocator slack",
    "cuda_context": "CUDA context",
}
_NOT_ALLOCATED = ("optimizer_paged", "allocator_slack", "cuda_context")  # what max_memory_allocated never sees
# Which LoRA inputs are the same tensor when dropout is off (the attention output is SDPA's own output).
_INPUT_GROUP = {**dict.fromkeys(("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "Wqkv"), "attn_in"),
                **dict.fromkeys(("o_proj", "out_proj"), "attn_out"),
                **dict.fromkeys(("gate_proj", "up_proj", "gate_up_proj", "fc1", "c_fc", "w1", "w3"), "mlp_in")}


class MemoryBudgetError(QLoraLiteError, ValueError):
    """Not even the smallest configuration fits the budget; the message says by how much and what would."""

    def __init__(self, message: str, needed_bytes: int, budget_bytes: int, suggestions: list[str]):
        super().__init__(message)
        self.needed_bytes, self.budget_bytes, self.suggestions = needed_bytes, budget_bytes, suggestions


def _block_bytes_per_token(a: ModelShape, layer_targets: list[tuple[str, int]], *, b: int, mask: int, r: int,
                           dropout: float, mlp_only: bool = False, moe_mlp: int | None = None) -> int:
    """Bytes autograd saves per token in one decoder block (compute dtype b bytes, dropout mask `mask` bytes).

        2 RMSNorms  2·(4h + 4)         fp32 copy of the input + rsqrt (the weight multiply saves nothing: frozen)
        attention   b·(2q + 2kv) + 4·H  RoPE'd q and k, v, SDPA output, fp32 logsumexp per head (no seq² matrix)
        MLP         3·b·i (gated)       gate output (SiLU input), SiLU output and up output (the product's inputs)
                    1·b·i (plain)       the activation's input
        LoRA, per adapted linear:  b·r (x·Aᵀ)  + with dropout (b + mask)·in (dropped input + mask)
                                   without dropout the input once per distinct input tensor (q/k/v share one,
                                   gate/up share one, o_proj's is SDPA's output, already counted)

    `mlp_only`: the MLP's share alone (give it the MLP's targets): what a tiled MLP keeps per chunk.
    `moe_mlp`: a routed MLP's bytes per token (memory_moe.moe_mlp_bytes_per_token) in place of the dense one.
    """
    h, q, kv, i = a.hidden, a.heads * a.head_dim, a.kv_heads * a.head_dim, a.intermediate
    total = (3 if a.gated else 1) * b * i if moe_mlp is None else moe_mlp
    if not mlp_only:
        total += 2 * (4 * h + 4) + b * (2 * q + 2 * kv) + 4 * a.heads
    shared: set[str] = set()
    for kind, n_in in layer_targets:
        total += b * r
        if dropout > 0:
            total += (b + mask) * n_in
        elif (group := _INPUT_GROUP.get(kind, kind)) != "attn_out" and group not in shared:
            shared.add(group)
            total += b * n_in
    return total




def _optimizer_bytes(optimizer: str, tensors: list[int], param_bytes: int) -> tuple[int, int]:
    """(bytes torch allocates, bytes bitsandbytes pages) of the optimizer states of these LoRA tensors.

    bitsandbytes keeps 32-bit states for 16-bit parameters and puts a state tensor of >= 1e5 values in
    CUDA managed memory (`get_paged`); its 8-bit AdamW keeps tensors under 4096 values 32-bit and adds
    one fp32 absmax per 256 values for each of the two states. torch AdamW keeps exp_avg and exp_avg_sq
    in the parameter's dtype (`param_bytes`: the caller passes 4 where the states are 32-bit anyway).
    """
    if optimizer == "adamw":
        return 2 * param_bytes * sum(tensors), 0
    plain = paged = 0
    for n in tensors:
        if optimizer == "paged_adamw_8bit" and n >= 4096:
            states, absmax = 2 * n, 8 * -(-n // 256)
        else:
            states, absmax = 8 * n, 0
        plain += absmax
        if n >= PAGED_MIN_NUMEL:
            paged += states
        else:
            plain += states
    return plain, paged


# ---- the estimate ------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory per rank, in bytes, and the inputs it was computed for.

    `activations` = checkpointed block inputs + one recomputed block + its backward workspace;
    `logits` = the loss phase's buffers. The two transients are never alive together, so
    `total_bytes` counts only the larger (`peak_phase`); `peak_breakdown()` splits the total.
    `allocated_bytes` is what `torch.cuda.max_memory_allocated` sees (no context, no slack, no
    paged optimizer state), `reserved_bytes` what `max_memory_reserved` sees.
    """

    model: str
    recipe: str
    seq_len: int
    batch_size: int
    rank: int
    target_modules: str | list[str]
    lora_dropout: float
    lora_dtype: str
    quantized: bool
    optimizer: str
    gradient_checkpointing: bool
    loss_chunk_tokens: int
    offload_activations: bool
    mlp_chunk_tokens: int
    link_gbps: float
    offload_base: bool
    compute_dtype: str
    world_size: int
    fsdp: bool
    device: str
    params_total: int
    params_quantized: int
    params_16bit: int
    params_trainable: int
    quantized_weights: int
    weights_16bit: int
    lora_params: int
    lora_grads: int
    optimizer_states: int
    optimizer_paged: int
    activations: int
    logits: int
    allocator_slack: int
    cuda_context: int
    peak_phase: str
    detail: dict[str, int]
    host_load_bytes: int
    pinned_host_bytes: int  # offloaded block inputs + NF4 base held in pinned host memory
    transfer_bytes: int  # host↔GPU bytes per micro-step (out in forward, back in backward)

    @property
    def transfer_seconds(self) -> float:
        """Time the offload copies of one micro-step take at `link_gbps` (hidden if compute is longer)."""
        return self.transfer_bytes / (self.link_gbps * GB)

    def peak_breakdown(self) -> dict[str, int]:
        """Components alive at the peak; they add up to `total_bytes`."""
        out = {k: getattr(self, k) for k in _COMPONENTS}
        if self.peak_phase == "loss":
            out["activations"] = self.detail["saved_block_inputs"] + self.detail["final_norm"]
        else:
            out["logits"] = 0
        return out

    @property
    def total_bytes(self) -> int:
        return sum(self.peak_breakdown().values())

    @property
    def required_bytes(self) -> int:
        """What must fit on the GPU: the total less the paged optimizer state, which CUDA managed memory
        moves to host memory when the GPU runs full (the QLoRA paper's paged optimizers). Fits use this."""
        return self.total_bytes - self.optimizer_paged

    @property
    def allocated_bytes(self) -> int:
        """What torch's caching allocator hands out at the peak: `torch.cuda.max_memory_allocated`."""
        peak = self.peak_breakdown()
        return sum(v for k, v in peak.items() if k not in _NOT_ALLOCATED)

    @property
    def reserved_bytes(self) -> int:
        """What the caching allocator holds at the peak: `torch.cuda.max_memory_reserved`."""
        return self.allocated_bytes + self.allocator_slack

    @property
    def framework_overhead(self) -> int:
        """CUDA context + allocator slack: the part of the total that is not a tensor."""
        return self.cuda_context + self.allocator_slack

    @property
    def transient_bytes(self) -> int:
        """Activations + logits at the peak: what a training step adds on top of the resident state."""
        peak = self.peak_breakdown()
        return peak["activations"] + peak["logits"]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes, "allocated_bytes": self.allocated_bytes,
                "reserved_bytes": self.reserved_bytes, "peak_breakdown": self.peak_breakdown()}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_table(self) -> str:
        total, peak = self.total_bytes, self.peak_breakdown()
        lora = f"LoRA r={self.rank} on {self.target_modules} ({self.lora_dtype}), dropout {self.lora_dropout}"
        ranks = f", {self.world_size} ranks ({'FSDP' if self.fsdp else 'DDP'})" if self.world_size > 1 else ""
        recipe = "" if self.recipe == "qlora-lite" else " [peer: transformers + bitsandbytes + PEFT]"
        cells = {k: (f"{peak[k] / GiB:.3f}", f"{peak[k] / GB:.3f}", f"{100 * peak[k] / total:.1f}%") for k in peak}
        cells["total"] = (f"{total / GiB:.3f}", f"{total / GB:.3f}", "100.0%")
        w = [max(8, *(len(c[i]) for c in cells.values())) + 1 for i in range(3)]  # columns grow with the numbers
        label = max(len(v) for v in _COMPONENTS.values()) + 2
        rows = [f"{self.model}: seq {self.seq_len} × batch {self.batch_size}, {lora}, "
                f"{'NF4 base' if self.quantized else '16-bit base'}, {self.compute_dtype}, {self.optimizer}, "
                f"checkpointing {'on' if self.gradient_checkpointing else 'off'}{ranks}{recipe}",
                f"{'component':<{label}}{'GiB':>{w[0]}}{'GB':>{w[1]}}{'share':>{w[2]}}"]
        for key, name in _COMPONENTS.items():
            rows.append(f"{name:<{label}}{cells[key][0]:>{w[0]}}{cells[key][1]:>{w[1]}}{cells[key][2]:>{w[2]}}")
        rows += ["-" * (label + sum(w)),
                 f"{'total (peak per GPU)':<{label}}{cells['total'][0]:>{w[0]}}{cells['total'][1]:>{w[1]}}"
                 f"{cells['total'][2]:>{w[2]}}"]
        d = self.detail
        other = (f"logits & loss {d['logits_and_loss'] / GiB:.3f} GiB (freed before the block recomputes)"
                 if self.peak_phase == "block" else
                 f"block recompute {(d['recomputed_block'] + d['backward_workspace']) / GiB:.3f} GiB (after the logits are freed)")
        rows.append(f"peak during the {self.peak_phase} phase; not counted: {other}")
        if self.device == "cuda":
            rows.append(f"torch sees: {self.allocated_bytes / GiB:.3f} GiB allocated (max_memory_allocated), "
                        f"{self.reserved_bytes / GiB:.3f} GiB reserved")
        if self.optimizer_paged:
            rows.append(f"paged optimizer: {self.optimizer_paged / GiB:.3f} GiB in CUDA managed memory, not in torch's "
                        "counters; it can move to host memory under pressure")
        if self.device == "cuda":
            how = ("rank 0 holds the whole quantized model until every process has its shard" if self.fsdp
                   and self.world_size > 1 else "the model loads into host memory; the NF4 layers stay there"
                   if self.offload_base else "each process streams one checkpoint tensor at a time to its GPU")
            rows.append(f"host memory to load: {self.host_load_bytes / GiB:.2f} GiB ({how})")
        if self.mlp_chunk_tokens:
            rows.append(f"tiled MLP: {self.mlp_chunk_tokens} positions per chunk")
        rows += offload_lines(self)
        rows.append(f"parameters: total {self.params_total:,}, NF4 {self.params_quantized:,}, unquantized "
                    f"{self.params_16bit:,}, trainable {self.params_trainable:,} "
                    f"({100 * self.params_trainable / self.params_total:.2f}%)")
        return "\n".join(rows)


def estimate_memory(config: Any, *, seq_len: int, batch_size: int, lora: LoraConfig | None = None,
                    quant: QuantConfig | None = QuantConfig(), optimizer: Optimizer = "paged_adamw_32bit",
                    gradient_checkpointing: bool = True, compute_dtype: str | torch.dtype = "bfloat16",
                    world_size: int = 1, fsdp: bool = False, device: Literal["cuda", "cpu"] = "cuda",
                    context_bytes: int | None = None, allocator_slack: float | None = None,
                    loss_chunk_tokens: int = 1024, recipe: Recipe = "qlora-lite", offload_activations: bool = False,
                    mlp_chunk_tokens: int = 0, link_gbps: float = PCIE4_X16_GBPS,
                    offload_base: bool = False) -> MemoryEstimate:
    """Peak memory per rank of one training step; `batch_size` is per device.

    `device="cpu"` estimates host memory (torch's CPU dropout keeps its mask in the compute dtype;
    no CUDA context, no allocator slack). `context_bytes` and `allocator_slack` override
    CUDA_CONTEXT_BYTES and ALLOCATOR_SLACK (a GPU calibration passes what it measured). The
    optimizer is the one training runs: torch AdamW on CPU and under FSDP (bitsandbytes' paged
    optimizers need CUDA and plain tensors). `recipe="peft"` predicts the peer's footprint instead.
    `offload_activations`, `mlp_chunk_tokens`: the long-context options (TrainConfig's; offload.py);
    `link_gbps` the host↔GPU link speed in GB/s the transfer time is given at. On CPU offloading moves
    nothing (the host copies are the process's memory), so it changes only a GPU estimate.
    `offload_base`: the layers' NF4 base in pinned host memory, fetched layer by layer (memory_offload.py).
    """
    lora = lora if lora is not None else LoraConfig()  # LoraConfig is mutable: no shared default
    problems = [f"{n}={v!r} must be a positive integer" for n, v in
                (("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size))
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0]
    if optimizer not in _OPTIMIZERS:
        problems.append(f"optimizer={optimizer!r} must be one of {', '.join(_OPTIMIZERS)}")
    if device not in ("cuda", "cpu"):
        problems.append(f"device={device!r} must be 'cuda' or 'cpu'")
    if recipe not in ("qlora-lite", "peft"):
        problems.append(f"recipe={recipe!r} must be 'qlora-lite' or 'peft'")
    if not isinstance(mlp_chunk_tokens, int) or isinstance(mlp_chunk_tokens, bool) or mlp_chunk_tokens < 0:
        problems.append(f"mlp_chunk_tokens={mlp_chunk_tokens!r} must be a non-negative integer (0: off)")
    if offload_activations and not gradient_checkpointing:
        problems.append("offload_activations offloads the checkpointed blocks' inputs: it needs gradient_checkpointing")
    if offload_base and (not gradient_checkpointing or not quant or fsdp):
        problems.append("offload_base needs gradient_checkpointing, an NF4 base (quant) and no fsdp")
    if recipe == "peft" and (offload_activations or mlp_chunk_tokens or offload_base):
        problems.append("the peer's recipe (recipe='peft') has no offload or tiled MLP; plan it without")
    if isinstance(link_gbps, bool) or not isinstance(link_gbps, (int, float)) or not link_gbps > 0:
        problems.append(f"link_gbps={link_gbps!r} must be a positive speed in GB/s (PCIe 4.0 x16: 25)")
    if allocator_slack is not None and not 0 <= allocator_slack < 10:
        problems.append(f"allocator_slack={allocator_slack!r} must be a fraction of the allocated bytes, e.g. 0.2")
    if problems:
        raise ConfigError(problems, "memory estimate")
    cfg, name = load_model_config(config)
    a = model_shape(cfg)
    if a.experts and (recipe == "peft" or mlp_chunk_tokens):
        raise ConfigError(f"{name} is a mixture-of-experts model; the planner does not plan "
                          f"{'the peer recipe' if recipe == 'peft' else 'a tiled MLP (mlp_chunk_tokens)'} for it",
                          "memory estimate")
    dtype = resolve_dtype(compute_dtype) if compute_dtype != "auto" else (
        torch.bfloat16 if device == "cuda" else torch.float32)
    peer = peer_terms(a, lora, dtype) if recipe == "peft" else None
    lora_dtype = peer.lora_dtype if peer else resolve_lora_dtype(lora.lora_dtype, dtype, device)
    optimizer = optimizer if device == "cuda" and not fsdp else "adamw"  # as train._optimizer_in_use
    b, lora_b = dtype.itemsize, lora_dtype.itemsize
    w16_b = peer.weight_bytes if peer else b
    targets = a.target_names(lora.target_modules) + a.expert_target_names(lora)
    matrices = a.matrices  # name -> (count, out, in): linears once, expert projections once per expert

    # weights. FSDP2 (fsdp.py: every block one unit, the root unit the rest) keeps per rank 1/N of every
    # parameter, plus the units it has gathered: the root unit (embeddings, final norm, head) whole from
    # the forward's start to the backward's end (FSDP2 does not reshard the root after forward), and
    # two blocks (the one computing and the next, prefetched)
    quantized_params = sum(c * o * i for c, o, i in matrices.values()) if quant else 0
    n16 = a.total - quantized_params
    q_bytes = sum(c * nf4_nbytes(o * i, quant.blocksize, quant.double_quant) for c, o, i in matrices.values()) \
        if quant else 0
    q_layer = sum(c * nf4_nbytes(o * i, quant.blocksize, quant.double_quant)
                  for n, (c, o, i) in matrices.items() if layer_index(n) == 0) if quant else 0
    layer16 = a.layer_params - sum(c * o * i for n, (c, o, i) in matrices.items() if layer_index(n) == 0 and quant)
    root16 = n16 - a.layers * layer16  # embeddings, final norm, lm_head
    sharded = fsdp and world_size > 1
    gathered = min(2, a.layers)
    base = base_offload(a, quant, device) if offload_base else BaseOffload(q_bytes, 0, 0)  # offload_base: 2 layers
    q_whole, q_bytes = q_bytes, base.gpu_bytes
    if sharded:
        q_bytes = -(-q_bytes // world_size) + gathered * q_layer
        w16_bytes = (-(-n16 // world_size) + gathered * layer16 + root16) * w16_b
    else:
        w16_bytes = n16 * w16_b

    # LoRA and optimizer: replicated under DDP (plus a gradient bucket copy); under FSDP sharded 1/N
    # like the base, with the gathered blocks' factors and gradients whole
    lora_tensors = [n for t in targets for n in (matrices[t][0] * lora.r * matrices[t][2],
                                                 matrices[t][0] * matrices[t][1] * lora.r)]
    n_lora = sum(lora_tensors)
    n_lora_layer = sum(c * lora.r * (o + i) for t, (c, o, i) in matrices.items()
                       if t in targets and layer_index(t) == 0)
    lora_resident = -(-n_lora // world_size) + gathered * n_lora_layer if sharded else n_lora
    grads = lora_resident * lora_b * (2 if world_size > 1 and not fsdp else 1)
    # off FSDP the CPU optimizer keeps 32-bit states for 16-bit adapters too (train.build_optimizer)
    opt, paged = _optimizer_bytes(optimizer, lora_tensors, 4 if optimizer == "adamw" and not fsdp else lora_b)
    if sharded:
        opt = -(-opt // world_size)

    # activations
    tokens, h = seq_len * batch_size, a.hidden
    mask = 1 if device == "cuda" else b  # CUDA's native dropout keeps a bool mask
    block, inter = 0, 0  # the largest recomputed block, the widest MLP intermediate per token
    for n in a.representative_layers():  # a dense block, a routed one, or both
        linear = [(t.rsplit(".", 1)[-1], a.linears[t][1]) for t in targets if layer_index(t) == n and t in a.linears]
        routed = [t.rsplit(".", 1)[-1] for t in targets if layer_index(t) == n and t in a.experts]
        moe = moe_mlp_bytes_per_token(a, n, routed, dtype=dtype, r=lora.r) if any(
            layer_index(e) == n for e in a.experts) else None
        block = max(block, tokens * _block_bytes_per_token(a, linear, b=b, mask=mask, r=lora.r,
                                                           dropout=lora.lora_dropout, moe_mlp=moe))
        inter = max(inter, a.intermediate if moe is None else a.top_k * next(
            s[2] for e, s in a.experts.items() if layer_index(e) == n and e.endswith(".down_proj")))
    rope = 2 * seq_len * a.head_dim * b
    max_linear = max(o * i for _, o, i in matrices.values())
    inter_tokens = tokens  # positions whose MLP intermediates are alive at once
    if mlp_chunk_tokens and mlp_chunk_tokens < seq_len:  # offload.install_tiled_mlp: a checkpoint per chunk
        mlp_targets = [(t.rsplit(".", 1)[-1], a.linears[t][1]) for t in targets if layer_index(t) == 0 and ".mlp." in t]
        mlp = _block_bytes_per_token(a, mlp_targets, b=b, mask=mask, r=lora.r, dropout=lora.lora_dropout,
                                     mlp_only=True)
        inter_tokens = batch_size * mlp_chunk_tokens
        block += tokens * (b * h - mlp) + inter_tokens * mlp  # the MLP input instead; one chunk's own
    workspace = tokens * b * h + inter_tokens * b * BACKWARD_WORKSPACE_INTER * inter + max_linear * b
    inputs = a.layers * tokens * h * (peer.residual_bytes if peer else b)  # the checkpointed block inputs
    offloaded = inputs if offload_activations and device == "cuda" else 0
    if gradient_checkpointing:
        saved = inputs - offloaded + (min(OFFLOAD_RESIDENT_INPUTS, a.layers) * tokens * h * b if offloaded else 0) + rope
        block -= tokens * h * 4 if b == 4 else 0  # in fp32 the first norm's "copy" is the checkpointed input
    else:
        saved, block = a.layers * block + rope, 0
    if peer:
        block += peer.block_extra(tokens)
    block_phase = block + workspace
    final_norm = tokens * (4 * h + 4)
    if peer:  # transformers' own loss: the full logits, and what the peer keeps besides
        logits = tokens * a.vocab * 12 + peer.loss_extra(tokens)
    elif loss_chunk_tokens:  # loss.py: one chunk's logits at a time, plus the gradient of the hidden state
        chunk = min(tokens, loss_chunk_tokens)
        logits = chunk * a.vocab * (4 if b == 4 else 4 + b) + tokens * h * b
    else:
        logits = tokens * a.vocab * 12
    phase = "loss" if final_norm + logits >= block_phase else "block"
    # host memory while loading: a process reads the checkpoint one tensor at a time (the largest,
    # 16-bit), quantizing on its GPU; under FSDP rank 0 also keeps the whole model on the host until
    # it has sent every process its shards (fsdp.load_sharded); on CPU the host holds the model anyway
    largest = 2 * max(max_linear, a.vocab * h)
    staged = q_whole + n16 * b + n_lora * lora_b
    streamed = device == "cuda" and not sharded and not offload_base  # (offload_base: loaded into host memory)
    host_load = world_size * largest if streamed else staged + largest
    detail = {"saved_block_inputs": saved, "recomputed_block": block, "backward_workspace": workspace,
              "final_norm": final_norm, "logits_and_loss": logits, "offloaded_block_inputs": offloaded,
              "offloaded_base": base.host_bytes}
    cuda = device == "cuda"
    fields = dict(
        model=name, recipe=recipe, seq_len=seq_len, batch_size=batch_size, rank=lora.r,
        target_modules=lora.target_modules, lora_dropout=lora.lora_dropout,
        lora_dtype=str(lora_dtype).removeprefix("torch."), quantized=quant is not None, optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing, loss_chunk_tokens=0 if peer else loss_chunk_tokens,
        offload_activations=offload_activations, mlp_chunk_tokens=mlp_chunk_tokens, link_gbps=float(link_gbps),
        offload_base=offload_base,
        compute_dtype=str(dtype).removeprefix("torch."), world_size=world_size, fsdp=fsdp, device=device,
        params_total=a.total + n_lora, params_quantized=quantized_params, params_16bit=n16, params_trainable=n_lora,
        quantized_weights=q_bytes, weights_16bit=w16_bytes, lora_params=lora_resident * lora_b, lora_grads=grads,
        optimizer_states=opt, optimizer_paged=paged, activations=saved + block_phase, logits=logits,
        allocator_slack=0, cuda_context=(CUDA_CONTEXT_BYTES if context_bytes is None else context_bytes) if cuda else 0,
        peak_phase=phase, detail=detail, host_load_bytes=host_load, pinned_host_bytes=offloaded + base.host_bytes,
        transfer_bytes=2 * offloaded + base.transfer_bytes)
    est = MemoryEstimate(**fields)
    slack = ALLOCATOR_SLACK if allocator_slack is None else allocator_slack
    return dataclasses.replace(est, allocator_slack=round(slack * est.allocated_bytes) if cuda else 0)


# ---- budgets and fitting ---------------------------------------------------------------------------

def plot_estimate(est: MemoryEstimate, path: str | Path, capacity_bytes: int | None = None,
                  capacity_label: str = "capacity", title: str | None = None) -> list[Path]:
    """A stacked bar of the peak breakdown (segments add up to the total), optionally against a capacity."""
    from .plots import plot_memory_breakdown

    segments = {_COMPONENTS[k]: v / GiB for k, v in est.peak_breakdown().items()}
    where = "GPU" if est.device == "cuda" else "process"
    return plot_memory_breakdown(
        segments, path, title=title or f"peak memory per {where} ({est.peak_phase} phase)",
        xlabel=f"{Path(est.model).name or est.model}\nseq {est.seq_len} × batch {est.batch_size}, r={est.rank}",
        capacity=capacity_bytes / GiB if capacity_bytes else None, capacity_label=capacity_label)


def __getattr__(name: str) -> Any:
    """The budget answers (what fits, the `qlora-lite memory` report) live in memory_fit, which builds on this
    module; they stay importable from here."""
    if name in ("FitResult", "fit_to_budget", "largest_seq_len", "memory_report"):
        from . import memory_fit

        return getattr(memory_fit, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
