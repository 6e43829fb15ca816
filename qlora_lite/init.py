"""Quantization-aware LoRA initialisations: LoftQ and PiSSA. Pure functions of one weight.

Both return the NF4 base the model then trains on together with A and B, such that

    dequantize(Q) + s·B·A ≈ W0        before any training step

- LoftQ (Li et al. 2023, PEFT's `loftq_init`): alternate Q = NF4(W0 - s·B·A) and the rank-r SVD of
  W0 - dequantize(Q), `loftq_iter` times (PEFT's default 1: Q = NF4(W0), the adapter absorbs the
  top-r part of the quantization error).
- PiSSA (Meng et al. 2024, PEFT's `pissa_init`): s·B·A = W0's top-r singular part, Q = NF4 of the
  residual. "pissa_niter_N" uses the randomized fast SVD (torch.svd_lowrank, N subspace iterations).

The split of the singular values follows PEFT: A = √(Σ/s)·Vᵀ, B = U·√(Σ/s), so s·B·A is the rank-r
term whatever lora_alpha is (PEFT's LoftQ omits the 1/s, which matters only for s ≠ 1).

The trained base is Q, not NF4(W0), and an SVD's last bits depend on the LAPACK build and thread
count, so Q is not recomputed later: it is saved beside the adapter (adapter.BASE_NAME, bitsandbytes'
layout) and what merge, verify and generate compute with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .nf4 import NF4Weight

__all__ = ["INIT_METHODS", "Initialised", "needs_weight", "loftq", "pissa", "initialise"]

INIT_METHODS = ("kaiming", "gaussian", "loftq", "pissa", "pissa_niter_<N>")
_PISSA_FAST = re.compile(r"pissa_niter_(\d+)")


@dataclass
class Initialised:
    """The NF4 base to train on and the LoRA factors (fp32) that go with it."""

    base: NF4Weight
    lora_A: torch.Tensor  # (r, in)
    lora_B: torch.Tensor  # (out, r)


def needs_weight(init_lora_weights: str) -> bool:
    """Whether the initialisation is computed from W0 (and so replaces the quantized base)."""
    return init_lora_weights in ("loftq", "pissa") or _PISSA_FAST.fullmatch(init_lora_weights) is not None


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    root = torch.sqrt(s / scaling)
    return root.unsqueeze(1) * vh, u * root.unsqueeze(0)  # A, B


def _quantize(w: torch.Tensor, like: torch.Tensor, blocksize: int, double_quant: bool, backend: str,
              name: str) -> NF4Weight:
    # quantize in W0's dtype, as a plain NF4 load of that checkpoint would
    return NF4Weight.from_tensor(w.to(like.dtype), blocksize, double_quant, backend, name=name)


@torch.no_grad()
def loftq(w0: torch.Tensor, r: int, scaling: float, blocksize: int = 64, double_quant: bool = True,
          backend: str = "auto", num_iter: int = 1, name: str = "weight") -> Initialised:
    w = w0.float()
    residual = w
    for step in range(num_iter):
        base = _quantize(residual, w0, blocksize, double_quant, backend, name)
        u, s, vh = torch.linalg.svd(w - base.dequantize(torch.float32), full_matrices=False)
        lora_A, lora_B = _split(u[:, :r], s[:r], vh[:r], scaling)
        if step + 1 < num_iter:
            residual = w - scaling * (lora_B @ lora_A)
    return Initialised(base, lora_A, lora_B)


@torch.no_grad()
def pissa(w0: torch.Tensor, r: int, scaling: float, blocksize: int = 64, double_quant: bool = True,
          backend: str = "auto", niter: int | None = None, name: str = "weight") -> Initialised:
    w = w0.float()
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
        vh = v.t()
    lora_A, lora_B = _split(u, s, vh, scaling)
    base = _quantize(w - scaling * (lora_B @ lora_A), w0, blocksize, double_quant, backend, name)
    return Initialised(base, lora_A, lora_B)


def initialise(w0: torch.Tensor, init_lora_weights: str, r: int, scaling: float, blocksize: int, double_quant: bool,
               backend: str = "auto", loftq_iter: int = 1, name: str = "weight") -> Initialised:
    """The LoftQ or PiSSA initialisation `init_lora_weights` names (see `needs_weight`)."""
    if init_lora_weights == "loftq":
        return loftq(w0, r, scaling, blocksize, double_quant, backend, loftq_iter, name)
    fast = _PISSA_FAST.fullmatch(init_lora_weights)
    if init_lora_weights == "pissa" or fast:
        return pissa(w0, r, scaling, blocksize, double_quant, backend, None if fast is None else int(fast[1]), name)
    raise ValueError(f"init_lora_weights={init_lora_weights!r} is not computed from the weight")
