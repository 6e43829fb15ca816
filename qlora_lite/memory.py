"""Memory planner: the peak memory of a QLoRA fine-tune, per GPU, before it runs.

    peak per rank =  quantized weights   NF4 per linear (all but the head): ceil(n/2) + ceil(n/64)
                                         + 4·ceil(ceil(n/64)/256) + 4 bytes (as NF4Weight.nbytes)
                   + 16-bit weights      embeddings, norms, lm_head, biases · 2 bytes (tied once)
                   + LoRA params + grads r·(in+out) per target · 4 bytes (fp32) each
                   + optimizer states    Adam m, v: 8 B/param (8-bit: 2 B + 8 B per 256); paged
                   + activations         L · batch·seq·hidden·2   (checkpointed block inputs)
                                         + ONE of the two transients below, the larger:
                        block phase:  a recomputed block's saved tensors + backward workspace
                        loss phase:   final norm + the loss through the LM head: chunked (loss.py,
                                      the default) one chunk's fp32 logits (+ a compute-dtype copy
                                      when 16-bit) + the hidden state's gradient; unchunked,
                                      12 B/(token·vocab) (fp32 log-softmax output, its gradient,
                                      the gradient of its input)
                   + framework overhead  CUDA context + allocator slack (a constant, default 1 GiB)

    host memory to load (`host_load_bytes`, not in the GPU peak) = the largest 16-bit checkpoint tensor
    per process streaming to its GPU; under FSDP (rank 0 reads, then sends the shards) or on CPU,
    one whole model as loaded (NF4 + 16-bit + LoRA) + that tensor.

The per-block formula is in `_block_bytes_per_token`; every term there was checked against the
tensors autograd saves in a transformers Llama layer (tests/test_memory.py). Parameter counts come
from the model built on the meta device, so they are exact for any architecture; the activation
formula assumes a pre-norm decoder block (RMSNorm, SDPA attention, gated or plain MLP).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .config import LoraConfig, QuantConfig, resolve_dtype
from .errors import ConfigError, QLoraLiteError

__all__ = [
    "GPU_MEMORY", "CUDA_OVERHEAD_BYTES", "MemoryEstimate", "FitResult", "MemoryBudgetError",
    "estimate_memory", "fit_to_budget", "parse_budget", "builtin_configs", "load_model_config", "nf4_nbytes",
    "memory_report", "plot_estimate",
]

GiB, GB = 1024**3, 10**9
CUDA_OVERHEAD_BYTES = 1 * GiB  # CUDA context (~0.5 GiB with lazy module loading) + allocator slack; not yet measured
BACKWARD_WORKSPACE_INTER = 3  # live (token × intermediate) gradient buffers while a block runs backward
Optimizer = Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw"]
_CONFIG_DIR = Path(__file__).parent / "configs"
_COMPONENTS = {
    "quantized_weights": "quantized weights (NF4)", "weights_16bit": "16-bit weights", "lora_params": "LoRA parameters",
    "lora_grads": "LoRA gradients", "optimizer_states": "optimizer states", "activations": "activations",
    "logits": "logits & loss", "framework_overhead": "framework overhead",
}
# Nominal memory per GPU (the driver shows a little less, e.g. 79.6 GiB on an H100: the overhead covers it).
GPU_MEMORY: dict[str, int] = {name: int(gib * GiB) for name, gib in {
    "T4": 16, "P100": 16, "V100-16GB": 16, "V100-32GB": 32, "A10": 24, "A10G": 24, "L4": 24, "A40": 48,
    "A6000": 48, "L40S": 48, "RTX6000Ada": 48, "RTX3060": 12, "RTX3080": 10, "RTX3090": 24, "RTX4060Ti-16GB": 16,
    "RTX4070Ti": 12, "RTX4080": 16, "RTX4090": 24, "RTX5090": 32, "A100-40GB": 40, "A100-80GB": 80, "H100": 80,
    "H100-NVL": 94, "H200": 141, "B200": 180, "MI300X": 192}.items()}
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}
# Which LoRA inputs are the same tensor when dropout is off (the attention output is SDPA's own output).
_INPUT_GROUP = {**dict.fromkeys(("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "Wqkv"), "attn_in"),
                **dict.fromkeys(("o_proj", "out_proj"), "attn_out"),
                **dict.fromkeys(("gate_proj", "up_proj", "gate_up_proj", "fc1", "c_fc", "w1", "w3"), "mlp_in")}
_GATE_NAMES = {"gate_proj", "gate_up_proj", "w3"}


class MemoryBudgetError(QLoraLiteError, ValueError):
    """Not even the smallest configuration fits the budget; the message says by how much and what would."""

    def __init__(self, message: str, needed_bytes: int, budget_bytes: int, suggestions: list[str]):
        super().__init__(message)
        self.needed_bytes, self.budget_bytes, self.suggestions = needed_bytes, budget_bytes, suggestions


# ---- model configs and shapes --------------------------------------------------------------------

def builtin_configs() -> list[str]:
    """Names of the config.json files shipped in qlora_lite/configs (e.g. "llama-2-7b")."""
    return sorted(p.stem for p in _CONFIG_DIR.glob("*.json"))


def load_model_config(config: Any) -> tuple[Any, str]:
    """(PretrainedConfig, display name) from a config object, a built-in name, a config.json or a model dir."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config, getattr(config, "name_or_path", "") or config.model_type
    if not isinstance(config, (str, os.PathLike)):
        raise ConfigError(f"model config must be a PretrainedConfig, a name or a path, not {type(config).__name__}")
    text, path = str(config), Path(config)
    if text in builtin_configs():
        path = _CONFIG_DIR / f"{text}.json"
    elif path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{text!r} is not a built-in model ({', '.join(builtin_configs())}), "
                          "a config.json file or a model directory with one", "model")
    data = json.loads(path.read_text())
    model_type = data.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **data), text if path.parent == _CONFIG_DIR else str(config)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not a transformers config.json ({exc})", "model") from None


@dataclass(eq=False)
class _Arch:
    """What the estimate needs from a model, read off its meta-device instance."""

    model: Any
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    total: int  # base parameters, a tied embedding/head counted once
    linears: dict[str, tuple[int, int]]  # every linear but the head: name -> (out, in)
    layer_params: int  # parameters inside decoder layer 0
    gated: bool
    targets: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def target_names(self, spec: str | list[str]) -> tuple[str, ...]:
        from .inject import find_targets

        key = json.dumps(spec)
        if key not in self.targets:
            self.targets[key] = tuple(find_targets(self.model, spec))
        return self.targets[key]


def _layer_index(name: str) -> int | None:
    match = re.search(r"\.(\d+)\.", f".{name}")
    return int(match.group(1)) if match else None


@functools.lru_cache(maxsize=16)
def _arch_from_json(config_json: str, model_type: str) -> _Arch:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .inject import find_targets

    cfg = AutoConfig.for_model(model_type, **{k: v for k, v in json.loads(config_json).items() if k != "model_type"})
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    model.tie_weights()  # init_empty_weights skips the tying that a real instantiation does
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    linears = {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features)
               for n in find_targets(model, "all-linear")}
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    layer0 = sum(p.numel() for n, p in model.named_parameters() if _layer_index(n) == 0)
    heads = text.num_attention_heads
    return _Arch(model, text.hidden_size, getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
                 text.num_hidden_layers, heads, getattr(text, "num_key_value_heads", None) or heads,
                 getattr(text, "head_dim", None) or text.hidden_size // heads, text.vocab_size, total, linears, layer0,
                 any(n.rsplit(".", 1)[-1] in _GATE_NAMES for n in linears))


def _arch(cfg: Any) -> _Arch:
    return _arch_from_json(cfg.to_json_string(use_diff=False), cfg.model_type)


def nf4_nbytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of one NF4 weight of `numel` values, exactly as `NF4Weight.nbytes` counts them."""
    blocks = -(-numel // blocksize)
    if double_quant:
        return -(-numel // 2) + blocks + 4 * -(-blocks // 256) + 4
    return -(-numel // 2) + 4 * blocks


def _block_bytes_per_token(a: _Arch, layer_targets: list[tuple[str, int]], *, b: int, mask: int, r: int,
                           dropout: float) -> int:
    """Bytes autograd saves per token in one decoder block (compute dtype b bytes, dropout mask `mask` bytes).

        2 RMSNorms  2·(4h + 4)         fp32 copy of the input + rsqrt (the weight multiply saves nothing: frozen)
        attention   b·(2q + 2kv) + 4·H  RoPE'd q and k, v, SDPA output, fp32 logsumexp per head (no seq² matrix)
        MLP         3·b·i (gated)       gate output (SiLU input), SiLU output and up output (the product's inputs)
                    1·b·i (plain)       the activation's input
        LoRA, per adapted linear:  b·r (x·Aᵀ)  + with dropout (b + mask)·in (dropped input + mask)
                                   without dropout the input once per distinct input tensor (q/k/v share one,
                                   gate/up share one, o_proj's is SDPA's output, already counted)
    """
    h, q, kv, i = a.hidden, a.heads * a.head_dim, a.kv_heads * a.head_dim, a.intermediate
    total = 2 * (4 * h + 4) + b * (2 * q + 2 * kv) + 4 * a.heads + (3 if a.gated else 1) * b * i
    shared: set[str] = set()
    for kind, n_in in layer_targets:
        total += b * r
        if dropout > 0:
            total += (b + mask) * n_in
        elif (group := _INPUT_GROUP.get(kind, kind)) != "attn_out" and group not in shared:
            shared.add(group)
            total += b * n_in
    return total


# ---- the estimate ------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory per rank, in bytes, and the inputs it was computed for.

    `activations` = checkpointed block inputs + one recomputed block + its backward workspace;
    `logits` = the loss phase's buffers. The two transients are never alive together, so
    `total_bytes` counts only the larger (`peak_phase`); `peak_breakdown()` splits the total.
    """

    model: str
    seq_len: int
    batch_size: int
    rank: int
    target_modules: str | list[str]
    lora_dropout: float
    quantized: bool
    optimizer: str
    gradient_checkpointing: bool
    loss_chunk_tokens: int
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
    optimizer_pageable: int
    activations: int
    logits: int
    framework_overhead: int
    peak_phase: str
    detail: dict[str, int]
    host_load_bytes: int

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
    def transient_bytes(self) -> int:
        """Activations + logits at the peak: what a training step adds on top of the resident state."""
        peak = self.peak_breakdown()
        return peak["activations"] + peak["logits"]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes, "peak_breakdown": self.peak_breakdown()}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_table(self) -> str:
        total, peak = self.total_bytes, self.peak_breakdown()
        lora = f"LoRA r={self.rank} on {self.target_modules}, dropout {self.lora_dropout}"
        ranks = f", {self.world_size} ranks ({'FSDP' if self.fsdp else 'DDP'})" if self.world_size > 1 else ""
        rows = [f"{self.model}: seq {self.seq_len} × batch {self.batch_size}, {lora}, "
                f"{'NF4 base' if self.quantized else '16-bit base'}, {self.compute_dtype}, {self.optimizer}, "
                f"checkpointing {'on' if self.gradient_checkpointing else 'off'}{ranks}",
                f"{'component':<26}{'GiB':>9}{'GB':>9}{'share':>8}"]
        for key, label in _COMPONENTS.items():
            rows.append(f"{label:<26}{peak[key] / GiB:>9.3f}{peak[key] / GB:>9.3f}{100 * peak[key] / total:>7.1f}%")
        rows += ["-" * 52, f"{'total (peak per GPU)':<26}{total / GiB:>9.3f}{total / GB:>9.3f}{100:>7.1f}%"]
        d = self.detail
        other = (f"logits & loss {d['logits_and_loss'] / GiB:.3f} GiB (freed before the block recomputes)"
                 if self.peak_phase == "block" else
                 f"block recompute {(d['recomputed_block'] + d['backward_workspace']) / GiB:.3f} GiB (after the logits are freed)")
        rows.append(f"peak during the {self.peak_phase} phase; not counted: {other}")
        if self.optimizer_pageable:
            rows.append(f"paged optimizer: up to {self.optimizer_pageable / GiB:.3f} GiB can move to CPU under pressure")
        if self.device == "cuda":
            how = ("rank 0 holds the whole quantized model until every process has its shard" if self.fsdp
                   and self.world_size > 1 else "each process streams one checkpoint tensor at a time to its GPU")
            rows.append(f"host memory to load: {self.host_load_bytes / GiB:.2f} GiB ({how})")
        rows.append(f"parameters: total {self.params_total:,}, NF4 {self.params_quantized:,}, 16-bit "
                    f"{self.params_16bit:,}, trainable {self.params_trainable:,} "
                    f"({100 * self.params_trainable / self.params_total:.2f}%)")
        return "\n".join(rows)


def estimate_memory(config: Any, *, seq_len: int, batch_size: int, lora: LoraConfig = LoraConfig(),
                    quant: QuantConfig | None = QuantConfig(), optimizer: Optimizer = "paged_adamw_32bit",
                    gradient_checkpointing: bool = True, compute_dtype: str | torch.dtype = "bfloat16",
                    world_size: int = 1, fsdp: bool = False, device: Literal["cuda", "cpu"] = "cuda",
                    overhead_bytes: int | None = None, loss_chunk_tokens: int = 1024) -> MemoryEstimate:
    """Peak memory per rank of one training step; `batch_size` is per device.

    `device="cpu"` estimates host memory (torch's CPU dropout keeps its mask in the compute dtype;
    no CUDA context). `overhead_bytes` defaults to CUDA_OVERHEAD_BYTES on cuda and 0 on cpu.
    """
    problems = [f"{n}={v!r} must be a positive integer" for n, v in
                (("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size))
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0]
    if optimizer not in ("paged_adamw_32bit", "paged_adamw_8bit", "adamw"):
        problems.append(f"optimizer={optimizer!r} must be 'paged_adamw_32bit', 'paged_adamw_8bit' or 'adamw'")
    if device not in ("cuda", "cpu"):
        problems.append(f"device={device!r} must be 'cuda' or 'cpu'")
    if problems:
        raise ConfigError(problems, "memory estimate")
    cfg, name = load_model_config(config)
    a = _arch(cfg)
    dtype = resolve_dtype(compute_dtype) if compute_dtype != "auto" else (
        torch.bfloat16 if device == "cuda" else torch.float32)
    b, lora_b = dtype.itemsize, resolve_dtype(lora.lora_dtype).itemsize
    targets = a.target_names(lora.target_modules)

    # weights
    quantized_params = sum(o * i for o, i in a.linears.values()) if quant else 0
    n16 = a.total - quantized_params
    q_bytes = sum(nf4_nbytes(o * i, quant.blocksize, quant.double_quant) for o, i in a.linears.values()) if quant else 0
    q_layer = sum(nf4_nbytes(o * i, quant.blocksize, quant.double_quant)
                  for n, (o, i) in a.linears.items() if _layer_index(n) == 0) if quant else 0
    layer16 = a.layer_params - sum(o * i for n, (o, i) in a.linears.items() if _layer_index(n) == 0 and quant)
    root16 = n16 - a.layers * layer16  # embeddings, final norm, lm_head
    sharded = fsdp and world_size > 1
    q_whole = q_bytes
    if sharded:  # layers sharded + one gathered layer; the root unit (embeddings, head) is gathered for the loss
        q_bytes = -(-q_bytes // world_size) + q_layer
        w16_bytes = (-(-(a.layers * layer16) // world_size) + layer16 + root16) * b
    else:
        w16_bytes = n16 * b

    # LoRA and optimizer: replicated under DDP (plus a gradient bucket copy); under FSDP sharded
    # 1/N like the base, with one block's factors and gradients gathered while it computes
    lora_tensors = [n for t in targets for n in (lora.r * a.linears[t][1], a.linears[t][0] * lora.r)]
    n_lora = sum(lora_tensors)
    n_lora_layer = sum(lora.r * (a.linears[t][0] + a.linears[t][1]) for t in targets if _layer_index(t) == 0)
    lora_resident = -(-n_lora // world_size) + n_lora_layer if sharded else n_lora
    grads = lora_resident * lora_b * (2 if world_size > 1 and not fsdp else 1)
    if optimizer == "paged_adamw_8bit" and not fsdp:  # bitsandbytes: tensors under 4096 values stay 32-bit
        # (under FSDP training uses torch AdamW: bitsandbytes' optimizers do not take DTensor shards)
        opt = sum(8 * n if n < 4096 else 2 * n + 8 * -(-n // 256) for n in lora_tensors)
    else:
        opt = 8 * n_lora
    opt = -(-opt // world_size) if sharded else opt

    # activations
    tokens, h = seq_len * batch_size, a.hidden
    layer0 = [(t.rsplit(".", 1)[-1], a.linears[t][1]) for t in targets if _layer_index(t) == 0]
    mask = 1 if device == "cuda" else b  # CUDA's native dropout keeps a bool mask
    block = tokens * _block_bytes_per_token(a, layer0, b=b, mask=mask, r=lora.r, dropout=lora.lora_dropout)
    rope = 2 * seq_len * a.head_dim * b
    max_linear = max(o * i for o, i in a.linears.values())
    workspace = tokens * b * (h + BACKWARD_WORKSPACE_INTER * a.intermediate) + max_linear * b
    if gradient_checkpointing:
        saved = a.layers * tokens * h * b + rope
        block -= tokens * h * 4 if b == 4 else 0  # in fp32 the first norm's "copy" is the checkpointed input
    else:
        saved, block = a.layers * block + rope, 0
    block_phase = block + workspace
    final_norm = tokens * (4 * h + 4)
    if loss_chunk_tokens:  # loss.py: one chunk's logits at a time, plus the gradient of the hidden state
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
    host_load = world_size * largest if device == "cuda" and not sharded else staged + largest
    overhead = (CUDA_OVERHEAD_BYTES if device == "cuda" else 0) if overhead_bytes is None else overhead_bytes
    detail = {"saved_block_inputs": saved, "recomputed_block": block, "backward_workspace": workspace,
              "final_norm": final_norm, "logits_and_loss": logits}
    return MemoryEstimate(
        model=name, seq_len=seq_len, batch_size=batch_size, rank=lora.r, target_modules=lora.target_modules,
        lora_dropout=lora.lora_dropout, quantized=quant is not None, optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing, loss_chunk_tokens=loss_chunk_tokens, compute_dtype=str(dtype).removeprefix("torch."),
        world_size=world_size, fsdp=fsdp, device=device, params_total=a.total + n_lora,
        params_quantized=quantized_params, params_16bit=n16, params_trainable=n_lora, quantized_weights=q_bytes,
        weights_16bit=w16_bytes, lora_params=lora_resident * lora_b, lora_grads=grads, optimizer_states=opt,
        optimizer_pageable=opt if optimizer.startswith("paged") and not fsdp else 0, activations=saved + block_phase,
        logits=logits, framework_overhead=overhead, peak_phase=phase, detail=detail, host_load_bytes=host_load)


# ---- budgets and fitting ---------------------------------------------------------------------------

def _squash(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).lower()


def parse_budget(budget: str | int | float) -> int:
    """Bytes from "24GB" (10⁹), "24GiB" (2³⁰), "1500MiB", a GPU name from GPU_MEMORY ("RTX4090") or a number."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        if budget <= 0 or not math.isfinite(budget):
            raise ConfigError(f"memory budget {budget!r} must be a positive number of bytes", "memory budget")
        return int(budget)
    if not isinstance(budget, str):
        raise ConfigError(f"memory budget must be a size or a GPU name, not {type(budget).__name__}", "memory budget")
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", budget)
    if match and match.group(2).lower() in _UNITS and float(match.group(1)) > 0:
        return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    gpus = {_squash(k): v for k, v in GPU_MEMORY.items()}
    if _squash(budget) in gpus:
        return gpus[_squash(budget)]
    if match:
        raise ConfigError(f"memory budget {budget!r}: give a positive size with a unit, e.g. '24GB' or '24GiB'",
                          "memory budget")
    close = difflib.get_close_matches(_squash(budget), list(gpus), n=3, cutoff=0.5)
    names = [k for k in GPU_MEMORY if _squash(k) in close]
    hint = f" (did you mean {' or '.join(names)}?)" if names else ""
    raise ConfigError(f"unknown GPU {budget!r}{hint}; known GPUs: {', '.join(GPU_MEMORY)}; "
                      "or give a size such as '24GB' or '24GiB'", "memory budget")


@dataclass(frozen=True)
class FitResult:
    """The largest `varied` value (batch_size or seq_len) whose estimate fits the budget."""

    budget_bytes: int
    varied: Literal["batch_size", "seq_len"]
    value: int
    step: int
    estimate: MemoryEstimate
    next_estimate: MemoryEstimate  # value + step: does not fit (unless `capped`)
    capped: bool = False


def fit_to_budget(config: Any, budget_bytes: int | str, *, seq_len: int | None = None,
                  batch_size: int | None = None, max_batch_size: int = 1 << 16, max_seq_len: int = 1 << 20,
                  **kwargs: Any) -> FitResult:
    """With `seq_len` fixed, the largest batch size; with `batch_size` fixed, the largest seq_len (multiple of 64).

    Doubling, then bisection. Other keywords go to `estimate_memory`. Raises MemoryBudgetError
    (a ValueError) when even batch 1 / seq 64 does not fit, saying what would.
    """
    budget = parse_budget(budget_bytes)
    if (seq_len is None) == (batch_size is None):
        raise ConfigError("give exactly one of seq_len (to fit the batch size) or batch_size (to fit seq_len)",
                          "fit_to_budget")
    if seq_len is not None:
        varied, step, limit = "batch_size", 1, max_batch_size

        def at(units: int) -> MemoryEstimate:
            return estimate_memory(config, seq_len=seq_len, batch_size=units, **kwargs)
    else:
        varied, step, limit = "seq_len", 64, max(1, max_seq_len // 64)

        def at(units: int) -> MemoryEstimate:
            return estimate_memory(config, seq_len=64 * units, batch_size=batch_size, **kwargs)

    first = at(1)
    if first.total_bytes > budget:
        raise _budget_error(config, budget, first, kwargs)
    good, bad = 1, None
    while bad is None and good < limit:
        probe = min(2 * good, limit)
        if at(probe).total_bytes <= budget:
            good = probe
        else:
            bad = probe
    capped = bad is None
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if at(mid).total_bytes <= budget else (good, mid)
    return FitResult(budget, varied, good * step, step, at(good), at(good + 1), capped)


def _budget_error(config: Any, budget: int, first: MemoryEstimate, kwargs: dict[str, Any]) -> MemoryBudgetError:
    over = first.total_bytes - budget
    base = dict(kwargs, seq_len=first.seq_len, batch_size=first.batch_size)
    lora = kwargs.get("lora", LoraConfig())

    def fits(**change: Any) -> MemoryEstimate | None:
        est = estimate_memory(config, **{**base, **change})
        return est if est.total_bytes <= budget else None

    ideas: list[str] = []
    for r in (8, 4, 1):
        if r < lora.r and (est := fits(lora=dataclasses.replace(lora, r=r))):
            ideas.append(f"LoRA rank r={r} ({est.total_bytes / GiB:.2f} GiB)")
            break
    if kwargs.get("optimizer", "paged_adamw_32bit") != "paged_adamw_8bit" and (est := fits(optimizer="paged_adamw_8bit")):
        ideas.append(f"optimizer='paged_adamw_8bit' ({est.total_bytes / GiB:.2f} GiB)")
    if not kwargs.get("gradient_checkpointing", True) and (est := fits(gradient_checkpointing=True)):
        ideas.append(f"gradient checkpointing ({est.total_bytes / GiB:.2f} GiB)")
    if first.seq_len > 64 and fits(seq_len=64):
        best = fit_to_budget(config, budget, batch_size=first.batch_size, max_seq_len=first.seq_len, **kwargs)
        ideas.append(f"seq_len {best.value} at batch {first.batch_size}")
    for n in (2, 4, 8, 16, 32, 64):
        if (est := fits(world_size=n, fsdp=True)):
            ideas.append(f"FSDP over {n} GPUs ({est.total_bytes / GiB:.2f} GiB each)")
            break
    static = first.quantized_weights + first.weights_16bit + first.framework_overhead
    advice = "; ".join(ideas) if ideas else f"nothing smaller fits: the frozen weights alone need {static / GiB:.2f} GiB"
    message = (f"{first.model} needs {first.total_bytes / GiB:.2f} GiB at seq_len {first.seq_len} × batch "
               f"{first.batch_size}, {over / GiB:.2f} GiB over the {budget / GiB:.2f} GiB budget. What would fit: {advice}")
    return MemoryBudgetError(message, first.total_bytes, budget, ideas)


# ---- report -----------------------------------------------------------------------------------

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


def memory_report(model: str, seq_len: int = 2048, batch_size: int = 1, rank: int = 16, gpu: str | None = None,
                  optimizer: Optimizer = "paged_adamw_32bit", world_size: int = 1, fsdp: bool = False,
                  json_output: bool = False, plot: str | None = None) -> str:
    """The body of `qlora-lite memory`: the breakdown table, and for a GPU whether it fits and the
    largest batch and seq_len that do. `json_output` returns JSON; `plot` writes a PNG there."""
    kwargs: dict[str, Any] = {"lora": LoraConfig(r=rank, lora_alpha=2 * rank), "optimizer": optimizer,
                              "world_size": world_size, "fsdp": fsdp}
    est = estimate_memory(model, seq_len=seq_len, batch_size=batch_size, **kwargs)
    result: dict[str, Any] = {"estimate": est.to_dict()}
    lines = [est.to_table()]
    capacity = parse_budget(gpu) if gpu else None
    if capacity is not None:
        margin = capacity - est.total_bytes
        verdict = (f"fits {gpu} ({capacity / GiB:.0f} GiB) with {margin / GiB:.2f} GiB to spare" if margin >= 0
                   else f"does NOT fit {gpu} ({capacity / GiB:.0f} GiB): {-margin / GiB:.2f} GiB over")
        result.update(gpu=gpu, capacity_bytes=capacity, fits=margin >= 0)
        lines.append(verdict)
        positions = getattr(load_model_config(model)[0], "max_position_embeddings", None)
        for fixed, name in (({"seq_len": seq_len}, "batch_size"), ({"batch_size": batch_size}, "seq_len")):
            (key, value), = fixed.items()
            try:
                fit = fit_to_budget(model, capacity, **fixed, **kwargs)
            except MemoryBudgetError as exc:
                result[f"max_{name}"] = None
                lines.append(f"largest {name} at {key} {value}: none fits. {exc}")
                continue
            result[f"max_{name}"] = fit.value
            beyond = name == "seq_len" and positions and fit.value > positions
            lines.append(f"largest {name} at {key} {value}: {fit.value} ({fit.estimate.total_bytes / GiB:.2f} GiB)"
                         + (" (search limit)" if fit.capped else "")
                         + (f" (beyond the model's {positions} positions)" if beyond else ""))
    if plot:
        plot_estimate(est, plot, capacity_bytes=capacity, capacity_label=gpu or "capacity")
        result["plot"] = str(plot)
        lines.append(f"plot written to {plot}")
    return json.dumps(result, indent=2) if json_output else "\n".join(lines)
