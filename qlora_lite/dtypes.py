"""Dtype names, in one place: the names configs and the CLI accept, the canonical names files record
(config.json's `dtype`, bitsandbytes' quant-state JSON), and safetensors' header codes.

The lowest module with nf4: it imports nothing of the package.
"""

from __future__ import annotations

import torch

__all__ = ["FLOAT_DTYPES", "DTYPE_BY_NAME", "dtype_name", "dtype_from_name", "SAFETENSORS_DTYPES",
           "safetensors_code"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what we compute and store weights in

DTYPE_BY_NAME = {  # accepted in configs and on the CLI
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}

_CANONICAL = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name files record ("float32", "float16", "bfloat16")."""
    return _CANONICAL[dtype]


def dtype_from_name(name: object) -> torch.dtype | None:
    """The float dtype a recorded or configured name means, or None for anything else."""
    return DTYPE_BY_NAME.get(name) if isinstance(name, str) else None


def safetensors_code(dtype: torch.dtype) -> str:
    """The safetensors header code of `dtype` ("BF16", "U8", ...)."""
    return _SAFETENSORS_CODES[dtype]
