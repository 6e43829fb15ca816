"""Which kernels compute the NF4 format (nf4.py): bitsandbytes', our one-launch Triton dequantize, or pure torch.

    backend   quantize                          dequantize on CUDA                 dequantize on CPU
    torch     pure torch (bitsandbytes' CPU     pure torch                         pure torch
              bytes)
    bitsandbytes  bitsandbytes (pure torch on   bitsandbytes: 3 launches with      bitsandbytes where exact,
              CPU: the same bytes, faster)      double quantization                else pure torch
    triton    as bitsandbytes                   nf4_triton: 1 launch               as bitsandbytes

All give the same bytes; `auto` picks triton wherever triton imports, else bitsandbytes, else torch.
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal

import torch

__all__ = ["Backend", "Resolved", "bitsandbytes_available", "triton_available", "resolve_backend",
           "runs_bitsandbytes", "triton_kernel_usable", "give_up_triton"]

Backend = Literal["auto", "bitsandbytes", "triton", "torch"]
Resolved = Literal["bitsandbytes", "triton", "torch"]


@functools.cache
def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes.functional  # noqa: F401
    except Exception:  # an import failure of any kind means "not usable here"
        return False
    return True


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: Backend, device: torch.device) -> Resolved:
    """'auto' picks triton wherever triton imports, else bitsandbytes wherever it imports, else torch.

    "triton" is bitsandbytes' path (or the pure-torch one where bitsandbytes is missing) with the CUDA
    dequantize done by our one-launch kernel; on CPU it computes exactly as "bitsandbytes". It is a
    property of the weight, not of the device it is made on: a weight made on CPU and moved to a GPU
    (offloaded bases) takes the one-launch path there. "bitsandbytes" keeps bitsandbytes' own kernels.
    """
    if backend == "torch":
        return "torch"
    if backend == "bitsandbytes":
        if not bitsandbytes_available():
            raise RuntimeError("backend='bitsandbytes' but bitsandbytes cannot be imported; "
                               "pip install bitsandbytes, or use backend='torch'")
        return "bitsandbytes"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' but triton cannot be imported; pip install triton, "
                               "or use backend='auto'")
        return "triton"
    if device.type not in ("cuda", "cpu"):
        return "torch"
    return "triton" if triton_available() else "bitsandbytes" if bitsandbytes_available() else "torch"


_TRITON_FAILED: list[str] = []  # why the one-launch kernel failed in this process (then it is not tried again)


def triton_kernel_usable() -> bool:
    """False once the kernel has failed in this process (`give_up_triton`)."""
    return not _TRITON_FAILED


def give_up_triton(exc: Exception) -> None:
    """The kernel is only a faster route to the same bytes: where this process's triton cannot build or
    launch it, say so once and dequantize with bitsandbytes' kernels (or the torch path) from then on."""
    _TRITON_FAILED.append(f"{type(exc).__name__}: {exc}")
    warnings.warn(f"qlora-lite: the one-launch Triton NF4 dequantize failed ({_TRITON_FAILED[0][:300]}); "
                  "dequantizing with bitsandbytes' kernels instead (the same bytes, three launches). "
                  "quant.backend: bitsandbytes skips the attempt.", RuntimeWarning, stacklevel=3)


def runs_bitsandbytes(backend: Resolved) -> bool:
    """Whether a weight of this backend uses bitsandbytes' kernels (the triton one's, where it imports)."""
    return backend == "bitsandbytes" or (backend == "triton" and bitsandbytes_available())
