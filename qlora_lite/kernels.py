"""Fused CUDA kernels for the ops around the matmuls: PyTorch's own RMSNorm; RMSNorm, RoPE and SwiGLU from Liger.

In eager PyTorch a Llama decoder layer's RMSNorm is ~8 kernels (an fp32 upcast, square, mean, add,
rsqrt, two multiplies, a downcast), RoPE ~10 per tensor and SwiGLU 2–3, each reading and writing a
full activation, forward and backward (benchmarks/step_cost.py counts them). Liger Kernel (Triton;
used by axolotl, LLaMA-Factory and TRL) does each in one kernel per pass, computing in fp32 inside it.

    model ──► every *RMSNorm module     forward = liger_rms_norm   (Llama casting: fp32 inside, as HF)
              every MLP with gate/up/down and SiLU: down(liger_swiglu(gate(x), up(x)))
              every attention module    RoPE = liger_rope while this module runs

The patches are per instance (the model's classes and other models are untouched) and each falls
back to the original code for a tensor that is not on CUDA; `remove_fused_kernels` undoes them.
The LM head's loss stays qlora-lite's chunked loss (loss.py). Liger is an optional dependency
(`pip install 'qlora-lite[gpu]'`); CPU keeps plain torch.

Without Liger (the default: its Triton launches cost the host more than they save at 2048 tokens),
the norms still run fused: `torch.nn.functional.rms_norm` is one PyTorch kernel each way on CUDA
(`_fused_rms_norm`, fp32 inside) instead of ~8 forward and ~12 backward, and the weight multiply stays
outside it so the rounding is the model's own (`weight * normalised.to(input dtype)`):

    every *RMSNorm module     forward = weight * F.rms_norm(x, eps)      (fused_rms_norm: auto = on CUDA)
"""

from __future__ import annotations

import contextvars
import importlib
import types
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

__all__ = ["FUSED_FAMILIES", "liger_available", "fused_kernels_plan", "apply_fused_kernels", "fused_rms_norm_plan",
           "apply_fused_rms_norm", "remove_fused_kernels", "decoder_layers", "compile_decoder_layers",
           "apply_speedups"]

# transformers model families whose norm, MLP and RoPE have Llama's exact semantics.
FUSED_FAMILIES = ("llama", "mistral", "qwen2")
FusedKernels = bool | Literal["auto"]
FusedRMSNorm = bool | Literal["auto"]
_ROPE_ACTIVE = contextvars.ContextVar("qlora_lite_liger_rope", default=False)
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
            def forward(self, *args, _original=original, **kwargs):
                token = _ROPE_ACTIVE.set(True)  # read by the family's apply_rotary_pos_emb while this runs
                try:
                    return _original(*args, **kwargs)
                finally:
                    _ROPE_ACTIVE.reset(token)
        module.forward = types.MethodType(forward, module)
        setattr(module, _PATCHED, True)
        counts[kind] += 1
    return counts


def fused_rms_norm_plan(model: nn.Module, setting: FusedRMSNorm, device: torch.device) -> str | None:
    """None if PyTorch's fused RMSNorm applies to `model`'s norms, else why not.

    `auto` uses it on CUDA only: on CPU PyTorch decomposes `rms_norm` into the same ops as the model's
    own code, so it would change nothing but the order of a sum. `True` applies it on any device (a
    model of another family is still refused: its norm may not be Llama's).
    """
    if setting is False:
        return "fused_rms_norm is off"
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in FUSED_FAMILIES:
        why = f"model type {family!r} is not one of {FUSED_FAMILIES}"
        if setting is True:
            raise ConfigError(f"fused_rms_norm=true but {why}; set fused_rms_norm: auto or false", "fused_rms_norm")
        return why
    if setting == "auto" and device.type != "cuda":
        return f"the device is {device.type}: PyTorch runs rms_norm there as the model's own ops"
    return None


def apply_fused_rms_norm(model: nn.Module, setting: FusedRMSNorm = "auto",
                         device: torch.device | str | None = None) -> int:
    """Route every Llama-style RMSNorm of `model` (not already patched, e.g. by Liger) through
    `torch.nn.functional.rms_norm`; returns how many were patched (0 where `fused_rms_norm_plan` says no).
    """
    if device is None:
        device = next(model.parameters()).device
    if fused_rms_norm_plan(model, setting, torch.device(device)) is not None:
        return 0
    patched = 0
    for module in model.modules():
        if _kind(module) != "rms_norm" or getattr(module, _PATCHED, False):
            continue
        module.forward = types.MethodType(_rms_norm_forward, module)
        setattr(module, _PATCHED, True)
        patched += 1
    return patched


def _rms_norm_forward(self: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    # rms_norm computes in fp32 and rounds once to the input dtype, as the model's `.to(input_dtype)`
    # does; multiplying by the weight afterwards keeps the model's second rounding (and its dtype promotion).
    return self.weight * F.rms_norm(hidden, (hidden.shape[-1],), None, self.variance_epsilon)


def remove_fused_kernels(model: nn.Module) -> int:
    """Undo `apply_fused_kernels` and `apply_fused_rms_norm` on `model`; returns how many modules were restored."""
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
    """Route the family's module-level `apply_rotary_pos_emb` to Liger while a patched attention runs.

    transformers' attention calls the module-level function, so an instance patch cannot reach it;
    the dispatcher keeps the original for every call outside a patched module and for CPU tensors.
    """
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    if getattr(modeling.apply_rotary_pos_emb, _PATCHED, False):
        return
    from liger_kernel.transformers.functional import liger_rope

    original = modeling.apply_rotary_pos_emb

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if _ROPE_ACTIVE.get() and q.is_cuda:
            return liger_rope(q, k, cos, sin, None, *args, **kwargs)
        return original(q, k, cos, sin, *args, **kwargs)

    setattr(apply_rotary_pos_emb, _PATCHED, True)
    apply_rotary_pos_emb.__wrapped__ = original
    modeling.apply_rotary_pos_emb = apply_rotary_pos_emb


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
                   log=print, fused_rms_norm: FusedRMSNorm = "auto") -> None:
    """train's one call: Liger's kernels where they apply (`fused_kernels`), PyTorch's fused RMSNorm for
    the norms Liger did not take (`fused_rms_norm`), then regional compilation."""
    why_not = fused_kernels_plan(model, fused_kernels, device)
    if why_not is None:
        counts = apply_fused_kernels(model, fused_kernels, device)
        log("fused kernels (Liger): " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
    elif fused_kernels == "auto" and device.type == "cuda":
        log(f"note: no fused kernels: {why_not}")
    norms = apply_fused_rms_norm(model, fused_rms_norm, device)
    if norms:
        log(f"fused RMSNorm (PyTorch): {norms} norms")
    if compile:
        log(f"torch.compile: {compile_decoder_layers(model)} decoder layers (compiled at the first step)")
