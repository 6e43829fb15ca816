"""The ops around the matmuls, with fewer launches: PyTorch-only lean ops; Liger's fused kernels; compile.

In eager PyTorch a Llama decoder layer's RMSNorm is ~8 kernels forward (an fp32 upcast, square, mean,
add, rsqrt, two multiplies, a downcast) and ~12 backward, RoPE 5 per tensor forward and 7 backward,
SwiGLU 2–3, each reading and writing a full activation (benchmarks/step_cost.py counts them).

Lean ops (`lean_ops: auto`, on CUDA by default; PyTorch only, the model's own rounding kept):

    every *RMSNorm module   forward = weight * F.rms_norm(x, eps)   one PyTorch kernel each way on CUDA
                                                                    (`_fused_rms_norm`, fp32 inside); the
                                                                    weight outside, as the model rounds
    every attention module  RoPE = x·cos + roll(x)·sin±             4 ops each way per tensor; the signed
                                                                    sin tables built once per forward

Liger Kernel (`fused_kernels`, opt-in; Triton, used by axolotl, LLaMA-Factory and TRL) does each of
RMSNorm, RoPE and SwiGLU in one kernel per pass, but a Triton launch costs the host more than an ATen
one, which at 2048 tokens per step is what limits (docs/benchmarks.md):

    model ──► every *RMSNorm module     forward = liger_rms_norm   (Llama casting: fp32 inside, as HF)
              every MLP with gate/up/down and SiLU: down(liger_swiglu(gate(x), up(x)))
              every attention module    RoPE = liger_rope while this module runs

The patches are per instance (the model's classes and other models are untouched); Liger's fall back
to the original code for a tensor that is not on CUDA; `remove_fused_kernels` undoes all of them.
The LM head's loss stays qlora-lite's chunked loss (loss.py). Liger is an optional dependency
(`pip install 'qlora-lite[gpu]'`).
"""

from __future__ import annotations

import contextvars
import importlib
import types
import weakref
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

__all__ = ["FUSED_FAMILIES", "liger_available", "fused_kernels_plan", "apply_fused_kernels", "lean_ops_plan",
           "apply_lean_ops", "lean_rope", "remove_fused_kernels", "decoder_layers", "compile_decoder_layers",
           "apply_speedups"]

# transformers model families whose norm, MLP and RoPE have Llama's exact semantics.
FUSED_FAMILIES = ("llama", "mistral", "qwen2")
FusedKernels = bool | Literal["auto"]
LeanOps = bool | Literal["auto"]
# which RoPE the family's apply_rotary_pos_emb runs while a patched attention module runs: None (its own),
# "liger" or "lean"
_ROPE_ACTIVE: contextvars.ContextVar[str | None] = contextvars.ContextVar("qlora_lite_rope", default=None)
_PATCHED = "_qlora_lite_fused"


def liger_available() -> bool:
    try:
        importlib.import_module("liger_kernel.ops")
    except Exception:  # ImportError, or triton failing to initialise without a GPU
        return False
    return True


def fused_kernels_plan(model: nn.Module, setting: FusedKernels, device: torch.device) -> str | None:
    """None if the fused kernels apply, else why not. `setting=True` turns every reason into an error."""
    if setting is False:
        return "fused_kernels is off"
    family = getattr(getattr(model, "config", None), "model_type", None)
    if device.type != "cuda":
        why = f"the device is {device.type}, and the fused kernels run on CUDA only"
    elif family not in FUSED_FAMILIES:
        why = f"model type {family!r} is not one of {FUSED_FAMILIES}"
    elif not liger_available():
        why = "liger-kernel is not installed (pip install 'qlora-lite[gpu]')"
    else:
        return None
    if setting is True:
        raise ConfigError(f"fused_kernels=true but {why}; set fused_kernels: auto (use them where they apply) "
                          "or false", "fused_kernels")
    return why


def apply_fused_kernels(model: nn.Module, setting: FusedKernels = "auto",
                        device: torch.device | str | None = None) -> dict[str, int]:
    """Patch `model`'s norms, MLPs and attention RoPE with Liger's kernels where `fused_kernels_plan` allows.

    Returns how many modules of each kind were patched (all zero when nothing applies).
    """
    if device is None:
        device = next(model.parameters()).device
    counts = {"rms_norm": 0, "swiglu": 0, "rope": 0}
    if fused_kernels_plan(model, setting, torch.device(device)) is not None:
        return counts
    from liger_kernel.transformers.functional import liger_rms_norm, liger_swiglu

    _install_rope_dispatch(model.config.model_type)
    for module in model.modules():
        kind = _kind(module)
        if kind is None or getattr(module, _PATCHED, False):
            continue
        original = module.forward
        if kind == "rms_norm":
            def forward(self, hidden, _original=original):
                if not hidden.is_cuda:
                    return _original(hidden)
                return liger_rms_norm(hidden, self.weight, self.variance_epsilon, 0.0, "llama", False)
        elif kind == "swiglu":
            def forward(self, x, _original=original):
                if not x.is_cuda:
                    return _original(x)
                return self.down_proj(liger_swiglu(self.gate_proj(x), self.up_proj(x)))
        else:
            forward = _attention_forward(original, "liger")
        module.forward = types.MethodType(forward, module)
        setattr(module, _PATCHED, True)
        counts[kind] += 1
    return counts


def lean_ops_plan(model: nn.Module, setting: LeanOps, device: torch.device) -> str | None:
    """None if the lean ops apply to `model`, else why not.

    `auto` uses them on CUDA only: on CPU PyTorch runs `rms_norm` as the model's own ops, so only RoPE
    would change, and the CPU path stays the model's own code. `True` applies them on any device (a model
    of another family is still refused: its norm or RoPE may not be Llama's).
    """
    if setting is False:
        return "lean_ops is off"
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in FUSED_FAMILIES:
        why = f"model type {family!r} is not one of {FUSED_FAMILIES}"
        if setting is True:
            raise ConfigError(f"lean_ops=true but {why}; set lean_ops: auto or false", "lean_ops")
        return why
    if setting == "auto" and device.type != "cuda":
        return f"the device is {device.type}, where the model's own ops are kept"
    return None


def apply_lean_ops(model: nn.Module, setting: LeanOps = "auto", device: torch.device | str | None = None,
                   rope: bool = True) -> dict[str, int]:
    """PyTorch's fused RMSNorm for every Llama-style norm and the lean RoPE for every attention module of
    `model` that Liger did not take (`rope=False`: the norms only). Returns how many of each were patched
    (all zero where `lean_ops_plan` says no)."""
    if device is None:
        device = next(model.parameters()).device
    counts = {"rms_norm": 0, "rope": 0}
    if lean_ops_plan(model, setting, torch.device(device)) is not None:
        return counts
    if rope:
        _install_rope_dispatch(model.config.model_type)
    for module in model.modules():
        kind = _kind(module)
        if kind not in counts or (kind == "rope" and not rope) or getattr(module, _PATCHED, False):
            continue
        forward = _rms_norm_forward if kind == "rms_norm" else _attention_forward(module.forward, "lean")
        module.forward = types.MethodType(forward, module)
        setattr(module, _PATCHED, True)
        counts[kind] += 1
    return counts


def _rms_norm_forward(self: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    # rms_norm computes in fp32 and rounds once to the input dtype, as the model's `.to(input_dtype)`
    # does; multiplying by the weight afterwards keeps the model's second rounding (and its dtype promotion).
    return self.weight * F.rms_norm(hidden, (hidden.shape[-1],), None, self.variance_epsilon)


def _attention_forward(original, rope: str):
    def forward(self, *args, **kwargs):
        token = _ROPE_ACTIVE.set(rope)  # read by the family's apply_rotary_pos_emb while this runs
        try:
            return original(*args, **kwargs)
        finally:
            _ROPE_ACTIVE.reset(token)
    return forward


class _LeanRope(torch.autograd.Function):
    """x·cos + rotate_half(x)·sin with rotate_half(x)·sin = roll(x, d/2)·sin± (sin± = [-sin₁, sin₂]; a negation
    is exact, so every product and sum rounds as the model's): 4 launches forward, 4 backward, where the
    model's autograd graph runs 5 (neg, cat, two multiplies, add) and 7. Backward needs no activation:
    rotate_halfᵀ(g·sin) = roll(g, d/2)·sinᵀ with sinᵀ = [sin₂, -sin₁]."""

    @staticmethod
    def forward(ctx, x, cos, sin_signed, sin_transposed):
        ctx.save_for_backward(cos, sin_transposed)
        return (x * cos).add_(torch.roll(x, x.shape[-1] // 2, -1) * sin_signed)

    @staticmethod
    def backward(ctx, grad):
        cos, sin_transposed = ctx.saved_tensors
        rotated = torch.roll(grad, grad.shape[-1] // 2, -1) * sin_transposed
        return (grad * cos).add_(rotated), None, None, None


_SIGN_TABLES: list = [None]  # (weakref to the last sin seen, its version, sin±, sinᵀ)


def _sign_tables(sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Every layer of one forward (and its checkpointed recompute) gets the same sin tensor from the
    # model's rotary embedding, so its signed tables are built once per forward, not per layer.
    cached = _SIGN_TABLES[0]
    if cached is not None and cached[0]() is sin and cached[1] == sin._version:
        return cached[2], cached[3]
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    transposed = torch.roll(signed, half, -1)
    _SIGN_TABLES[0] = (weakref.ref(sin), sin._version, signed, transposed)
    return signed, transposed


def lean_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `apply_rotary_pos_emb` (Llama's rotate-half RoPE), equal to it to the bit, in fewer ops."""
    signed, transposed = _sign_tables(sin)
    cos, signed, transposed = (t.unsqueeze(unsqueeze_dim) for t in (cos, signed, transposed))
    return _LeanRope.apply(q, cos, signed, transposed), _LeanRope.apply(k, cos, signed, transposed)


def remove_fused_kernels(model: nn.Module) -> int:
    """Undo `apply_fused_kernels` and `apply_lean_ops` on `model`; returns how many modules were restored."""
    restored = 0
    for module in model.modules():
        if getattr(module, _PATCHED, False):
            del module.forward, module._qlora_lite_fused  # the class's forward shows through again
            restored += 1
    return restored


def _kind(module: nn.Module) -> str | None:
    name = type(module).__name__
    if name.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor) and hasattr(
            module, "variance_epsilon"):
        return "rms_norm"
    if all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")) and type(
            getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"):
        return "swiglu"
    if name.endswith("Attention") and hasattr(module, "q_proj"):
        return "rope"
    return None


def _install_rope_dispatch(family: str) -> None:
    """Route the family's module-level `apply_rotary_pos_emb` to Liger's or the lean RoPE while a patched
    attention module runs.

    transformers' attention calls the module-level function, so an instance patch cannot reach it;
    the dispatcher keeps the original for every call outside a patched module, for CPU tensors under
    Liger, and where the lean RoPE would not be the model's to the bit (see `_lean_rope_applies`).
    """
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    if getattr(modeling.apply_rotary_pos_emb, _PATCHED, False):
        return
    original = modeling.apply_rotary_pos_emb

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        rope = _ROPE_ACTIVE.get()
        if rope == "liger" and q.is_cuda:
            from liger_kernel.transformers.functional import liger_rope

            return liger_rope(q, k, cos, sin, None, *args, **kwargs)
        if rope == "lean" and _lean_rope_applies(q, k, cos):
            return lean_rope(q, k, cos, sin, *args, **kwargs)
        return original(q, k, cos, sin, *args, **kwargs)

    setattr(apply_rotary_pos_emb, _PATCHED, True)
    apply_rotary_pos_emb.__wrapped__ = original
    modeling.apply_rotary_pos_emb = apply_rotary_pos_emb


def _lean_rope_applies(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor) -> bool:
    # the whole head rotated (no partial rotary), and one dtype: with fp32 tables and bf16 q the model's
    # backward rounds each path's gradient to bf16 before summing, the lean one after
    return cos.shape[-1] == q.shape[-1] == k.shape[-1] and q.shape[-1] % 2 == 0 and q.dtype == k.dtype == cos.dtype


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def compile_decoder_layers(model: nn.Module, backend: str = "inductor") -> int:
    """Regional compilation: `torch.compile` each decoder layer in place (one graph, reused by every layer).

    Compiling the repeated block instead of the whole model keeps the compile time of one layer and
    leaves the embedding, head and chunked loss eager. The state dict is unchanged. Returns the count.
    """
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)


def apply_speedups(model: nn.Module, fused_kernels: FusedKernels, compile: bool, device: torch.device,
                   log=print, lean_ops: LeanOps = "auto") -> None:
    """train's one call: Liger's kernels where they apply (`fused_kernels`), the lean ops for what Liger did
    not take (`lean_ops`; the norms only under `compile`, whose compiler fuses RoPE itself), then
    regional compilation."""
    why_not = fused_kernels_plan(model, fused_kernels, device)
    if why_not is None:
        counts = apply_fused_kernels(model, fused_kernels, device)
        log("fused kernels (Liger): " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
    elif fused_kernels == "auto" and device.type == "cuda":
        log(f"note: no fused kernels: {why_not}")
    counts = apply_lean_ops(model, lean_ops, device, rope=not compile)
    if any(counts.values()):
        log("lean ops (PyTorch): " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
    if compile:
        log(f"torch.compile: {compile_decoder_layers(model)} decoder layers (compiled at the first step)")
