"""What one training step costs around the matmuls, counted on CPU: ours vs transformers + bitsandbytes + PEFT.

    a Llama checkpoint at a real width (--width 7b: hidden 4096, MLP 11008, 32 heads) with --layers
    decoder layers (default 2), random bf16, written once into --cache
        ▼
    ours  load_model(NF4, LoRA r on all seven projections, compute bf16) + non-reentrant checkpointing
          + the chunked loss, exactly as train runs it (bench_train._load_ours)
    peer  from_pretrained(bnb NF4 + double quant, compute bf16) + prepare_model_for_kbit_training
          + PEFT LoRA, stepped under torch.autocast("cpu", bf16) as on a GPU (bench_train._load_peer)
        ▼
    one step (forward with labels → backward), recorded by a TorchDispatchMode, op by op (matmuls and
    attention return zeros of their output's shape instead of computing it: every figure below depends
    on shapes only, and the tiny width gives the same figures either way; --compute-heavy runs them):
      launches   aten ops executed; views and allocation-only ops excluded (each remaining op is one
                 GPU kernel launch in eager mode; a bitsandbytes op counts once, as on CUDA)
      bytes      read + written by every non-matmul op (tensor inputs + outputs)
      FLOPs      of matmuls and attention (torch.utils.flop_counter's formulas)
    attributed to the decoder layer that runs them: forward hooks in the forward pass, gradient hooks
    on each layer's output in the backward pass (which also holds the checkpoint's recompute); the rest
    (embedding, final norm, head, loss) is "outside". A second forward without checkpointing counts each
    layer's saved activations (saved_tensors_hooks; storages counted once, parameters excluded): what
    one layer holds during its recompute in backward.
        ▼
    an H100 estimate per op: max(FLOPs / 790 TFLOP/s, bytes / 3.0 TB/s, --floor-us), matmuls and
    attention at the FLOP rate, the rest at the byte rate; summed per layer, and scaled to the full
    7B (32 layers) as outside + 32 × per-layer (--full-layers).

The figures depend on shapes and code only, not on the machine or its load: compare them across
commits. Usage (the 7B width at seq 2048 writes a 1.3 GB checkpoint once, then quantizes ~0.4 B parameters
and counts one step per side: 70 s on 2 idle cores; --width tiny: 12 s):

    python benchmarks/step_cost.py                         # the issue's shape: 7B width, 2 layers, seq 2048
    python benchmarks/step_cost.py --width tiny --seq 256  # the same op graph at a small width
    python benchmarks/step_cost.py --side ours --top 25    # one side, its most frequent ops per layer
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _checkpoint import write_sharded  # noqa: E402
from _env import versions  # noqa: E402
from bench_train import SHAPES, _load_ours, _load_peer  # noqa: E402

from qlora_lite.kernels import decoder_layers  # noqa: E402

aten = torch.ops.aten
H100 = {"matmul_flops": 790e12, "bytes_per_s": 3.0e12}
# Ops that allocate or relabel memory without running a kernel.
NO_KERNEL = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
             aten.new_empty.default, aten.new_empty_strided.default, aten._unsafe_view.default,
             aten.lift_fresh.default, aten.set_.source_Storage_storage_offset, aten.resize_.default,
             aten._local_scalar_dense.default, aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default}
MATMUL = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.addmm_, aten.baddbmm_}
# In-place matmuls (ours adds the LoRA product into the base output with addmm_), with the formula of
# their out-of-place form.
FLOP_FORMULA = {aten.addmm_: aten.addmm, aten.baddbmm_: aten.baddbmm}
# CPU attention ops, counted with the FLOP formula of their CUDA counterpart (same arguments up front).
ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu: aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: aten._scaled_dot_product_flash_attention_backward,
    aten._scaled_dot_product_flash_attention: aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_flash_attention_backward: aten._scaled_dot_product_flash_attention_backward,
    aten._scaled_dot_product_efficient_attention: aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_efficient_attention_backward: aten._scaled_dot_product_efficient_attention_backward,
}
GEMM_4BIT = torch.ops.bitsandbytes.gemm_4bit
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
WRITE_ONLY_SELF = {aten.copy_, aten.fill_, aten.zero_, aten.normal_, aten.uniform_}


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def op_kind(func, args, kwargs) -> str:
    packet = func._overloadpacket
    if packet in MATMUL:
        return "matmul"
    if packet in ATTENTION:
        return "attention"
    if func.namespace in ("bitsandbytes", "qlora_lite"):  # a dequantize kernel each (qlora_lite: nf4_triton)
        return "dequantize"
    if packet is aten._to_copy:
        return "cast" if kwargs.get("dtype", args[0].dtype) != args[0].dtype else "copy"
    if packet in (aten.copy_, aten.clone, aten.contiguous, aten.cat, aten.stack, aten.index_select, aten.gather,
                  aten.scatter_add_, aten.slice_scatter, aten.select_scatter):
        return "copy"
    return "elementwise"


@dataclass
class Tally:
    launches: int = 0
    bytes: int = 0
    flops: int = 0
    h100_s: float = 0.0
    by_kind: Counter = field(default_factory=Counter)        # launches per kind
    kind_s: Counter = field(default_factory=Counter)         # estimated H100 seconds per kind
    by_op: Counter = field(default_factory=Counter)

    def add(self, other: Tally, scale: float = 1.0) -> None:
        self.launches += other.launches * scale
        self.bytes += other.bytes * scale
        self.flops += other.flops * scale
        self.h100_s += other.h100_s * scale
        for mine, theirs in ((self.by_kind, other.by_kind), (self.kind_s, other.kind_s), (self.by_op, other.by_op)):
            for key, value in theirs.items():
                mine[key] += value * scale

    def as_dict(self, top: int = 0) -> dict:
        out = {"launches": self.launches, "non_matmul_bytes": self.bytes, "matmul_flops": self.flops,
               "h100_ms": 1e3 * self.h100_s, "launches_by_kind": dict(self.by_kind),
               "h100_ms_by_kind": {k: 1e3 * v for k, v in self.kind_s.items()}}
        if top:
            out["top_ops"] = self.by_op.most_common(top)
        return out


class StepRecorder(TorchDispatchMode):
    """Tallies every op into `self.tallies[region]`; `region` is a layer index or "outside"."""

    def __init__(self, floor_s: float, compute_heavy: bool = True):
        super().__init__()
        self.floor_s = floor_s
        self.compute_heavy = compute_heavy
        self.region: int | str = "outside"
        self.backward = False
        self.tallies: dict[int | str, Tally] = defaultdict(Tally)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet, kind = func._overloadpacket, op_kind(func, args, kwargs)
        out = shaped_zeros(func, args, kwargs) if not self.compute_heavy and _heavy(func, kind) else func(*args, **kwargs)
        if func.is_view or func in NO_KERNEL:
            return out
        if packet is GEMM_4BIT:
            self._gemm_4bit(args, kwargs, out)
        elif kind in ("matmul", "attention"):
            formula = ATTENTION.get(packet) or FLOP_FORMULA.get(packet, packet)
            flops = flop_registry[formula](*args, **kwargs, out_val=out)
            self._launch(str(packet), kind, flops=flops, moved=sum(_nbytes(t) for t in _tensors((args, kwargs, out))))
        else:
            inputs = _tensors((args[1:], kwargs)) if packet in WRITE_ONLY_SELF else _tensors((args, kwargs))
            self._launch(str(packet), kind, moved=sum(_nbytes(t) for t in inputs + _tensors(out)))
        return out

    def _launch(self, name: str, kind: str, flops: int = 0, moved: int = 0) -> None:
        tally = self.tallies[self.region]
        tally.launches += 1
        tally.by_kind[kind] += 1
        tally.by_op[name.removeprefix("aten.")] += 1
        if kind in ("matmul", "attention"):
            tally.flops += flops
            seconds = max(flops / H100["matmul_flops"], moved / H100["bytes_per_s"])
        else:
            tally.bytes += moved
            seconds = moved / H100["bytes_per_s"]
        seconds = max(seconds, self.floor_s)
        tally.h100_s += seconds
        tally.kind_s[kind] += seconds

    def _gemm_4bit(self, args, kwargs, out) -> None:
        """bitsandbytes' training forward: on an H100 at these M, one dequantize kernel, then cuBLAS."""
        a, packed, (n, k) = args[0], args[1], args[2]
        weight_bytes = n * k * a.element_size()
        absmax = sum(_nbytes(t) for t in _tensors((args[3:], kwargs)))
        self._launch("bitsandbytes.dequantize_4bit (in gemm_4bit)", "dequantize",
                     moved=_nbytes(packed) + absmax + weight_bytes)
        self._launch("mm (in gemm_4bit)", "matmul", flops=2 * a.numel() * n,
                     moved=_nbytes(a) + weight_bytes + _nbytes(out))


def _heavy(func, kind: str) -> bool:
    """The ops whose FLOPs make the 7B width slow on CPU, and whose values no figure here depends on."""
    return kind in ("matmul", "attention") or func._overloadpacket is GEMM_4BIT


def shaped_zeros(func, args, kwargs):
    """What `func` returns, as zeros: its output's shapes, dtypes and strides from its meta kernel, without
    the FLOPs. In-place ops (addmm_) zero their `self`, which they return written."""
    if func._schema.is_mutable:
        return args[0].zero_()
    to_meta = functools.partial(torch.utils._pytree.tree_map_only, torch.Tensor, lambda t: t.to("meta"))
    meta_out = func(*to_meta(args), **to_meta(kwargs))
    return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: torch.zeros_like(t, device="cpu"), meta_out)


class HeavyOpsAsZeros(TorchDispatchMode):
    """Matmuls and attention return zeros of their output's shape instead of computing it (the pass that
    counts saved activations, unless --compute-heavy)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        return shaped_zeros(func, args, kwargs) if _heavy(func, op_kind(func, args, kwargs)) else func(*args, **kwargs)


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    found = _tensors(args) or _tensors(kwargs.get("hidden_states"))
    return found[0] if found else None


def attribute_layers(model: torch.nn.Module, set_region) -> list:
    """Hooks that call `set_region(i)` while layer i runs, forward and backward, "outside" otherwise.

    Forward hooks sit outside transformers' checkpoint (they do not run in the recompute); in the
    backward pass a gradient hook on layer i's output marks where its backward (recompute included)
    begins, and one on layer 0's input (when it needs a gradient) where the layers end.
    """
    handles, layers = [], decoder_layers(model)
    state = {"backward": False}

    def pre(i):
        def hook(module, args, kwargs):
            if state["backward"]:
                return
            set_region(i)
            hidden = _first_tensor(args, kwargs)
            if i == 0 and hidden is not None and hidden.requires_grad:
                hidden.register_hook(lambda g: set_region("outside"))
        return hook

    def post(i):
        def hook(module, args, kwargs, output):
            if state["backward"]:
                return
            set_region("outside")
            hidden = _first_tensor((output,), {})
            if hidden is not None and hidden.requires_grad:
                hidden.register_hook(lambda g: set_region(i))
        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post(i), with_kwargs=True))
    return handles, state


def saved_activation_bytes(model: torch.nn.Module, ids: torch.Tensor, autocast: torch.dtype | None,
                           compute_heavy: bool = True) -> dict:
    """Bytes each decoder layer saves for backward (one forward, checkpointing off), storages counted once."""
    region: list[int | str] = ["outside"]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int | str, dict[int, int]] = defaultdict(dict)

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.nbytes():
            seen[region[0]][storage.data_ptr()] = storage.nbytes()
        return t

    layers = decoder_layers(model)
    checkpointed = [layer.gradient_checkpointing for layer in layers]
    handles, _ = attribute_layers(model, lambda r: region.__setitem__(0, r))
    try:
        for layer in layers:
            layer.gradient_checkpointing = False
        with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(autocast),
              contextlib.nullcontext() if compute_heavy else HeavyOpsAsZeros()):
            loss = model(input_ids=ids, labels=ids).loss
        del loss
    finally:
        for handle in handles:
            handle.remove()
        for layer, flag in zip(layers, checkpointed):
            layer.gradient_checkpointing = flag
    return {key: sum(v.values()) for key, v in seen.items()}


def _autocast(dtype: torch.dtype | None):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def record_step(model, ids: torch.Tensor, autocast: torch.dtype | None, floor_s: float,
                compute_heavy: bool = True) -> dict[int | str, Tally]:
    recorder = StepRecorder(floor_s, compute_heavy)
    handles, state = attribute_layers(model, lambda r: setattr(recorder, "region", r))
    try:
        with recorder:
            with _autocast(autocast):
                loss = model(input_ids=ids, labels=ids).loss
            state["backward"] = True
            recorder.region = "outside"
            loss.backward()
            recorder.region = "outside"
    finally:
        for handle in handles:
            handle.remove()
    return recorder.tallies


# ---- the checkpoint and the two sides ---------------------------------------------------------------

def write_checkpoint(width: str, layers: int, directory: Path, seed: int = 0) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    if (directory / ".complete").is_file():
        return
    config = LlamaConfig(**{**SHAPES[width], "num_hidden_layers": layers}, max_position_embeddings=4096,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(tmp)
    generator = torch.Generator().manual_seed(seed)

    def random_tensor(_: str, dims: tuple[int, ...]) -> torch.Tensor:
        t = torch.empty(dims, dtype=torch.bfloat16)
        return t.fill_(1.0) if len(dims) == 1 else t.normal_(0.0, 0.02, generator=generator)

    write_sharded(tmp, shapes, 2 * 10**9, random_tensor)
    (tmp / ".complete").write_text("{}")
    tmp.rename(directory)


def as_on_cuda(model: torch.nn.Module, cache_absmax: bool) -> None:
    """Make ours dequantize as it does on CUDA, not as on this CPU: the decoded block scales are not
    cached there (`NF4Weight.cache_absmax`, default on CPU only), so every dequantize also decodes them
    (bitsandbytes' 8-bit dequantize + the offset add); the pure-torch dequantize runs in one pass, not
    in cache-sized chunks, into a fresh tensor rather than the CPU's reused buffer. Weights of the triton
    backend (auto wherever triton imports) dequantize on CUDA in one launch, scales decoded inside: the op
    `qlora_lite::nf4_dequantize`, lent a CPU kernel here (the torch reference) and recorded as one op, its
    inputs and output as the bytes it moves."""
    from qlora_lite import layers, nf4

    nf4._DEQUANTIZE_CHUNK = 1 << 62
    layers._dense_for_matmul = layers._dense  # fresh memory each time: CUDA's caching allocator, not CPU's buffer
    for module in model.modules():
        if isinstance(module, nf4.NF4Weight):
            module.cache_absmax = cache_absmax
            if module.backend == "triton":
                _lend_nf4_dequantize_a_cpu_kernel()
                module.dequantize = module._dequantize_triton


@functools.cache
def _lend_nf4_dequantize_a_cpu_kernel() -> None:
    from qlora_lite import nf4, nf4_triton  # noqa: F401 (defines the op)

    def dequantize(packed, absmax, nested, offset, n, blocksize, dtype):
        if nested is not None:
            absmax = nf4.decode_double_quant_absmax(absmax, nested, offset)
        return nf4.dequantize_nf4(packed, absmax, torch.Size([n]), blocksize, dtype)

    torch.library.register_kernel("qlora_lite::nf4_dequantize", "cpu", dequantize)


@contextlib.contextmanager
def lean_ops_as_on_cuda(model: torch.nn.Module, enabled: bool):
    """Ours as train runs it on CUDA (`lean_ops: auto`): the lean RoPE, and the norms through `F.rms_norm`,
    which is PyTorch's `_fused_rms_norm` kernel forward and `_fused_rms_norm_backward` backward there.
    CPU has no kernel for those two and decomposes them into ~8 and ~12 ops, so this lends it one for the
    measurement (the same math, recorded as the one op CUDA launches)."""
    from qlora_lite.kernels import apply_lean_ops, remove_fused_kernels

    if not enabled:
        yield
        return

    def forward(x, normalized_shape, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (xf * rstd).to(x.dtype), rstd

    def backward(grad, x, normalized_shape, rstd, weight, output_mask):
        normed, g = x.float() * rstd, grad.float()
        return (rstd * (g - normed * (g * normed).mean(-1, keepdim=True))).to(x.dtype), None

    with torch.library._scoped_library("aten", "IMPL") as lib:
        lib.impl("_fused_rms_norm", forward, "CPU")
        lib.impl("_fused_rms_norm_backward", backward, "CPU")
        apply_lean_ops(model, True, "cpu")
        try:
            yield
        finally:
            remove_fused_kernels(model)


def measure_side(side: str, path: Path, opts) -> dict:
    torch.manual_seed(opts.seed)
    load_opts = SimpleNamespace(r=opts.r, warmup=1, steps=1, rows=[(opts.seq, opts.batch)],
                                loss_chunk_tokens=opts.loss_chunk_tokens, mlp_chunk_tokens=0,
                                offload_activations=False)
    loader = _load_ours if side == "ours" else _load_peer
    t0 = time.perf_counter()
    model, trainable, _, _, _ = loader(path, load_opts, torch.device("cpu"), torch.bfloat16)
    if side == "ours":  # as LoraConfig(lora_dtype=...) would create them
        for p in trainable:
            p.data = p.data.to(DTYPES[opts.ours_lora_dtype])
        as_on_cuda(model, opts.ours_cache_absmax)
    autocast = torch.bfloat16 if side == "peer" else None  # the peer's GPU recipe: HF Trainer bf16=True
    vocab = SHAPES[opts.width]["vocab_size"]
    ids = torch.randint(0, vocab, (opts.batch, opts.seq), generator=torch.Generator().manual_seed(opts.seed))
    t1 = time.perf_counter()
    with lean_ops_as_on_cuda(model, side == "ours" and opts.ours_lean_ops):
        tallies = record_step(model, ids, autocast, opts.floor_us * 1e-6, opts.compute_heavy)
        t2 = time.perf_counter()
        saved = saved_activation_bytes(model, ids, autocast, opts.compute_heavy)
    layers = sorted(k for k in tallies if isinstance(k, int))
    per_layer = Tally()
    for i in layers:
        per_layer.add(tallies[i], 1 / len(layers))
    outside = tallies.get("outside", Tally())
    full = Tally()
    full.add(outside)
    full.add(per_layer, opts.full_layers)
    saved_layers = [saved.get(i, 0) for i in layers]
    out = {
        "side": side, "load_s": t1 - t0, "step_s": t2 - t1,
        "layers": {str(i): tallies[i].as_dict() for i in layers},
        "per_layer": per_layer.as_dict(opts.top),
        "outside": outside.as_dict(opts.top),
        "full_model": {**full.as_dict(), "layers": opts.full_layers},
        "saved_bytes_per_layer": sum(saved_layers) / len(saved_layers) if saved_layers else 0,
        "saved_bytes_outside": saved.get("outside", 0),
    }
    del model
    gc.collect()
    return out


# ---- report -------------------------------------------------------------------------------------

PEER_MEASURED = {"launches_per_layer": 14_807 / 32, "elementwise_share": 200.8 / 380.7, "kernel_ms": 380.7}
KINDS = ("matmul", "attention", "dequantize", "cast", "copy", "elementwise")


def _share(t: dict, kinds) -> float:
    total = t["h100_ms"]
    return sum(t["h100_ms_by_kind"].get(k, 0.0) for k in kinds) / total if total else 0.0


def report(summary: dict) -> str:
    c = summary["config"]
    lines = [f"{c['width']} width, {c['layers']} layers, seq {c['seq']} x batch {c['batch']}, LoRA r={c['r']} on 7 "
             f"projections, bf16 (ours: {c['ours_lora_dtype']} A/B); H100 model: {H100['matmul_flops'] / 1e12:.0f} TFLOP/s matmul, "
             f"{H100['bytes_per_s'] / 1e12:.1f} TB/s other, floor {c['floor_us']} µs/launch"]
    head = (f"{'per decoder layer':<18}{'launches':>9}" + "".join(f"{k:>11}" for k in KINDS)
            + f"{'bytes MB':>10}{'GFLOP':>9}{'saved MB':>10}{'H100 ms':>9}{'elem %':>8}")
    lines.append(head)
    sides = [s for s in ("ours", "peer") if s in summary]
    for side in sides:
        r, p = summary[side], summary[side]["per_layer"]
        kinds = "".join(f"{p['launches_by_kind'].get(k, 0):>11.0f}" for k in KINDS)
        elem = 100 * _share(p, ("cast", "copy", "elementwise", "dequantize"))
        lines.append(f"{side:<18}{p['launches']:>9.0f}{kinds}{p['non_matmul_bytes'] / 1e6:>10.1f}"
                     f"{p['matmul_flops'] / 1e9:>9.1f}{r['saved_bytes_per_layer'] / 1e6:>10.1f}{p['h100_ms']:>9.3f}"
                     f"{elem:>7.1f}%")
    for side in sides:
        o, f = summary[side]["outside"], summary[side]["full_model"]
        lines.append(f"{side}: outside the layers {o['launches']:.0f} launches, {o['non_matmul_bytes'] / 1e6:.1f} MB, "
                     f"{o['h100_ms']:.3f} ms; full {f['layers']}-layer model {f['launches']:.0f} launches, "
                     f"{f['h100_ms']:.1f} ms on the H100 model "
                     f"({100 * _share(f, ('cast', 'copy', 'elementwise', 'dequantize')):.0f}% non-matmul)")
    if "ratios" in summary:
        q = summary["ratios"]
        lines.append(f"ours/peer per layer: launches {q['launches']:.3f}, non-matmul bytes {q['non_matmul_bytes']:.3f}, "
                     f"saved bytes {q['saved_bytes']:.3f}, H100 ms {q['h100_ms']:.3f} (full model {q['full_h100_ms']:.3f})")
    if "peer" in summary:
        p = summary["peer"]["per_layer"]
        lines.append(f"peer vs its H100 profile (issue 17, 7B 2048x1): {p['launches']:.0f} vs "
                     f"{PEER_MEASURED['launches_per_layer']:.0f} launches/layer (forward+backward only here)")
    for side in sides:
        if summary[side]["per_layer"].get("top_ops"):
            lines.append(f"{side}, most frequent ops per layer: " + ", ".join(
                f"{op} {n:g}" for op, n in summary[side]["per_layer"]["top_ops"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", choices=sorted(SHAPES), default="7b", help="the layer shape (vocab included)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers built and run")
    parser.add_argument("--full-layers", type=int, default=32, help="layers of the full model the totals scale to")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--loss-chunk-tokens", type=int, default=1024, help="ours: as train's default")
    parser.add_argument("--ours-cache-absmax", action="store_true",
                        help="ours: keep the decoded block scales (CPU's default; CUDA decodes them per dequantize)")
    parser.add_argument("--ours-lora-dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="ours: LoRA A/B dtype (bfloat16: no per-call casts; float32: today's CPU default)")
    parser.add_argument("--no-ours-lean-ops", dest="ours_lean_ops", action="store_false",
                        help="ours: the model's own RMSNorm and RoPE ops (train's lean_ops: false)")
    parser.add_argument("--compute-heavy", action="store_true",
                        help="run the matmuls and attention (default: zeros of their output's shape, which every "
                             "figure here depends on; the 7B width at seq 2048 then takes minutes, not hours)")
    parser.add_argument("--floor-us", type=float, default=2.0, help="least device time of one kernel launch")
    parser.add_argument("--side", choices=["ours", "peer", "both"], default="both")
    parser.add_argument("--top", type=int, default=12, help="most frequent ops per layer to list (0: none)")
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    cache = (opts.cache or Path.home() / ".cache" / "qlora-lite" / "bench" / f"{opts.width}-{opts.layers}l").expanduser()
    write_checkpoint(opts.width, opts.layers, cache, opts.seed)
    summary = {"config": {k: getattr(opts, k) for k in ("width", "layers", "full_layers", "seq", "batch", "r",
                                                        "loss_chunk_tokens", "ours_lora_dtype", "ours_cache_absmax", "ours_lean_ops",
                                                        "compute_heavy", "floor_us", "seed")},
               "versions": versions(("torch", "transformers", "peft", "bitsandbytes", "qlora-lite")),
               "command": " ".join(["python"] + sys.argv)}
    for side in (["ours", "peer"] if opts.side == "both" else [opts.side]):
        print(f"measuring {side} ...", file=sys.stderr)
        summary[side] = measure_side(side, cache, opts)
    if "ours" in summary and "peer" in summary:
        o, p = summary["ours"], summary["peer"]
        summary["ratios"] = {
            "launches": o["per_layer"]["launches"] / p["per_layer"]["launches"],
            "non_matmul_bytes": o["per_layer"]["non_matmul_bytes"] / p["per_layer"]["non_matmul_bytes"],
            "saved_bytes": o["saved_bytes_per_layer"] / p["saved_bytes_per_layer"],
            "h100_ms": o["per_layer"]["h100_ms"] / p["per_layer"]["h100_ms"],
            "full_h100_ms": o["full_model"]["h100_ms"] / p["full_model"]["h100_ms"],
        }
    print(json.dumps(summary, indent=2) if opts.json else report(summary))
    return summary


if __name__ == "__main__":
    main()
