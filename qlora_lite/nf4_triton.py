"""NF4 dequantize on CUDA in one Triton kernel launch, byte-identical to bitsandbytes' CUDA kernels.

    packed  uint8 (ceil(n/2))   byte b: value 2b in the high nibble, value 2b+1 in the low one
    absmax  uint8 (blocks)     ─┐
    nested  fp32 (blocks/256)   ├─► scale[k] = dynamic[absmax[k]] · nested[k // 256] + offset
    offset  fp32 (1)           ─┘   (each product and sum rounded to fp32; without double
                                     quantization absmax is fp32 and is the scale itself)
        ▼
    out[i] = NF4[nibble i] · scale[i // blocksize]  (fp32, rounded), then one rounding to the
             output dtype (bf16, fp16: to nearest even; fp32: as is)

bitsandbytes does the same with double quantization in three launches: its 8-bit blockwise
dequantize of the absmax codes (`code[q] * absmax` in fp32), `absmax += offset` (a torch add) and
its 4-bit dequantize (`lut[nibble] * absmax` in fp32, converted to the output type with
round-to-nearest-even). Every product and sum here is rounded to fp32 in that same order; the
kernel is compiled with `enable_fp_fusion=False`, since an FMA contraction of `a * b + offset` would
skip one rounding and change last bits.

`NF4Weight.dequantize` imports this module lazily (on CUDA only). The kernel is registered as the
custom op `qlora_lite::nf4_dequantize`: opaque to `torch.compile` (its launch options stay ours), and
seen as one op by dispatch-level counters (benchmarks/step_cost.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nf4 import NESTED_BLOCKSIZE, _table_on

__all__ = ["dequantize_nf4_triton"]

_VALUES_PER_PROGRAM = 2048  # 1024 packed bytes: 8 in and 16 values out per thread at 4 warps


@triton.jit
def _dequantize_kernel(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, dynamic_ptr, nf4_ptr, out_ptr, n,
                       BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, NESTED: tl.constexpr,
                       DOUBLE_QUANT: tl.constexpr):
    # One program: ROWS whole quantization blocks as a (ROWS, BLOCKSIZE/2) tile of packed bytes, so each
    # block's scale is loaded and decoded once, not once per value. int64: weights past 2**31 values.
    # Only builtins inside (no tl.cdiv, tl.interleave): a jitted helper would not run under the CPU
    # interpreter unless the interpreter was on before triton was imported.
    block = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    byte = block[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    codes = tl.load(packed_ptr + byte, mask=byte < (n + 1) // 2, other=0)
    block_in_range = block < (n + BLOCKSIZE - 1) // BLOCKSIZE  # the last block may be ragged
    if DOUBLE_QUANT:
        absmax_code = tl.load(absmax_ptr + block, mask=block_in_range, other=0).to(tl.int32)
        scale = tl.load(dynamic_ptr + absmax_code) * tl.load(nested_ptr + block // NESTED, mask=block_in_range,
                                                             other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=block_in_range, other=0.0)
    high = tl.load(nf4_ptr + (codes >> 4).to(tl.int32)) * scale[:, None]
    low = tl.load(nf4_ptr + (codes & 15).to(tl.int32)) * scale[:, None]
    # (ROWS, BLOCKSIZE/2, 2) -> (ROWS, BLOCKSIZE) in memory order, high nibble first: one contiguous store
    values = tl.reshape(tl.join(high, low), (ROWS, BLOCKSIZE))
    if out_ptr.dtype.element_ty == tl.bfloat16:
        # Round to nearest even in integers, as CUDA's __float2bfloat16_rn: the interpreter's own fp32->bf16
        # cast truncates, so this keeps the tested bytes the GPU's (values are finite: the loader checks)
        bits = values.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        values = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        values = values.to(out_ptr.dtype.element_ty)  # fp16: round to nearest even on the GPU and in numpy
    index = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + index, values, mask=index < n)


def _launch(kernel, packed: torch.Tensor, absmax: torch.Tensor, nested: torch.Tensor | None,
            offset: torch.Tensor | None, n: int, blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """Run `kernel` (the jitted one, or the same function under Triton's CPU interpreter in tests)."""
    out = torch.empty(n, dtype=dtype, device=packed.device)
    double_quant = nested is not None
    rows = max(1, _VALUES_PER_PROGRAM // blocksize)  # blocksize 4096: one block (4096 values) per program
    grid = (triton.cdiv(triton.cdiv(n, blocksize), rows),)
    kernel[grid](packed, absmax, nested if double_quant else absmax, offset if double_quant else absmax,
                 _table_on("dynamic", packed.device), _table_on("nf4", packed.device), out, n,
                 BLOCKSIZE=blocksize, ROWS=rows, NESTED=NESTED_BLOCKSIZE, DOUBLE_QUANT=double_quant,
                 num_warps=4, enable_fp_fusion=False)
    return out


@torch.library.custom_op("qlora_lite::nf4_dequantize", mutates_args=(), device_types="cuda")
def _nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, nested: torch.Tensor | None,
                    offset: torch.Tensor | None, n: int, blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    with torch.cuda.device(packed.device):  # Triton launches on the current device, not the tensors'
        return _launch(_dequantize_kernel, packed, absmax, nested, offset, n, blocksize, dtype)


@_nf4_dequantize.register_fake
def _(packed, absmax, nested, offset, n, blocksize, dtype):
    return packed.new_empty(n, dtype=dtype)


def dequantize_nf4_triton(packed: torch.Tensor, absmax: torch.Tensor, nested: torch.Tensor | None,
                          offset: torch.Tensor | None, shape: torch.Size, blocksize: int,
                          dtype: torch.dtype) -> torch.Tensor:
    """The weight of `shape` in `dtype` from NF4 codes and block scales on one CUDA device, in one launch.

    `absmax`: uint8 codes with `nested` (fp32, one per 256 blocks) and `offset` (fp32, one value), or the
    fp32 block scales themselves with `nested` and `offset` None.
    """
    n = shape.numel()
    nested, offset = (None, None) if nested is None else (nested.contiguous(), offset.reshape(1))
    return _nf4_dequantize(packed.reshape(-1), absmax.contiguous(), nested, offset, n, blocksize, dtype).view(shape)
