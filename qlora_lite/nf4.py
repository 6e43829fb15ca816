"""The NF4 weight format, byte-compatible with bitsandbytes.

    W (out×in, 16/32-bit)
      │ flatten row-major, blocks of `blocksize` (64) values
      ▼
    absmax_b = max|W_b|  ──► idx = nearest NF4 code of W_b / absmax_b  ──► packed: 2 codes/byte, first = high nibble
      │ double quantization (optional)
      ▼
    absmax - mean (offset) ──► 8-bit dynamic-map codes in blocks of 256 + one fp32 scale per 256 block

Stored per parameter: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits.

Three backends share the format: bitsandbytes' kernels (CUDA; CPU where bitsandbytes runs), a
pure-torch reference that reproduces bitsandbytes' CPU path bit for bit (same reciprocal-multiply
scaling, same midpoint comparison rule for 4-bit codes, same nearest-left rule for the 8-bit
absmax codes), and "triton": bitsandbytes' kernels except the CUDA dequantize, which is one Triton
launch (qlora_lite.nf4_triton) where bitsandbytes needs three with double quantization, same bytes.
Quantization is always an explicit `NF4Weight.from_tensor`; moving an `NF4Weight` never changes its
dtype or its bytes.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Literal

import torch
from torch import nn

from .dtypes import FLOAT_DTYPES, dtype_from_name, dtype_name
from .nf4_backends import (Backend, Resolved, bitsandbytes_available, give_up_triton, resolve_backend,
                           runs_bitsandbytes, triton_available, triton_kernel_usable)

__all__ = [
    "NF4_CODE",
    "NESTED_BLOCKSIZE",
    "SUPPORTED_BLOCKSIZES",
    "NF4Weight",
    "dynamic_map",
    "bitsandbytes_available",
    "triton_available",
    "resolve_backend",
    "quantize_nf4",
    "dequantize_nf4",
    "decode_double_quant_absmax",
    "nf4_nbytes",
]

# Quantiles of N(0, 1) normalised to [-1, 1] with an exact zero (QLoRA paper, appendix E).
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)
_NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for the double-quantized absmax
SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`), rebuilt without bitsandbytes.

    Dynamic exponent + fraction: 127 magnitudes from 1e-6 to ~0.99 per sign, plus 0 and 1.
    Built with the same float32 linspace and float32 products so the table matches to the bit.
    """
    values: list[float] = []
    exponent_bits, non_sign_bits = 7, 7
    for i in range(exponent_bits):
        fraction_items = 2 ** (i + non_sign_bits - exponent_bits) + 1
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(exponent_bits - 1) + i)
        values += (scale * means).tolist() + (-scale * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# pure-torch reference kernels
# --------------------------------------------------------------------------------------------

def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].reshape(-1, blocksize).abs().amax(dim=1)
    if full < n:
        absmax = torch.cat([absmax, flat[full:].abs().amax().reshape(1)])
    return absmax


_QUANTIZE_CHUNK = 1 << 18  # values per pass: the 15 comparisons then run in cache (2.8x faster on CPU)


def _pack_codes(scaled: torch.Tensor) -> torch.Tensor:
    """Values in [-1, 1] (even count) -> packed NF4 bytes, first value in the high nibble."""
    # Count the midpoints strictly below each value: bucketize's rule, 2.8x faster on CPU.
    idx = torch.zeros(scaled.shape, dtype=torch.uint8, device=scaled.device)
    for bound in _NF4_BOUNDS.tolist():
        idx += scaled > bound
    return (idx[0::2] << 4) | idx[1::2]


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize to packed NF4 codes (uint8 [ceil(n/2), 1]) and fp32 absmax per block.

    Mirrors bitsandbytes' reference kernel: full blocks are scaled by the reciprocal of their
    absmax, the ragged tail block by division; a value exactly on a midpoint takes the lower code.
    Works through the weight in chunks of whole blocks, so no full-size temporary is ever made.
    """
    flat = weight.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    chunk = max(blocksize, _QUANTIZE_CHUNK // blocksize * blocksize)
    for start in range(0, full, chunk):
        stop = min(full, start + chunk)
        blocks = flat[start:stop].float().view(-1, blocksize)
        block_absmax = blocks.abs().amax(dim=1)
        absmax[start // blocksize:stop // blocksize] = block_absmax
        scaled = (blocks * (1.0 / block_absmax.clamp(min=1e-38)).view(-1, 1)).clamp_(-1, 1).view(-1)
        packed[start // 2:stop // 2] = _pack_codes(scaled)
    if full < n:
        tail = flat[full:].float()
        absmax[-1] = tail.abs().amax()
        scaled = (tail / absmax[-1].clamp(min=1e-38)).clamp(-1, 1)
        packed[full // 2:] = _pack_codes(torch.nn.functional.pad(scaled, (0, scaled.numel() % 2)))
    return packed.unsqueeze(1), absmax


@functools.cache
def _table_on(name: Literal["nf4", "dynamic", "byte_pairs"], device: torch.device) -> torch.Tensor:
    """The format's constant tables, built once per device and never written to.

    Every dequantize needs one; a fresh host-to-GPU copy per call would be a synchronising copy
    (PyTorch waits for the stream to drain before a copy from pageable memory), so the GPU would
    idle at each of the 21 dequantizes per decoder layer and step.
    `byte_pairs` is (256, 2): the two NF4 values a packed byte holds, high nibble first.
    """
    if name == "nf4":
        table = NF4_CODE
    elif name == "dynamic":
        table = dynamic_map()
    else:
        table = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)
    return table.to(device)


_DEQUANTIZE_CHUNK = 1 << 18  # values per pass on CPU: each pass's gathered fp32 values (1 MB) are scaled in cache


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size, blocksize: int,
                   dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of `quantize_nf4`: code * absmax in fp32, then one rounding to `dtype`; into `out` (contiguous,
    `shape`, `dtype`) when given.

    Each byte gathers its two fp32 values at once, as one 8-byte element of the 256-entry table
    (a 1-D gather of int64 is ~4.5x faster on CPU than gathering 2-wide rows, and ~8x faster
    than unpacking nibbles). On CPU the weight goes through in chunks of whole blocks, so each
    chunk's indices and codes are scaled while still in cache and written once, in `dtype`
    (benchmarks/bench_nf4.py; docs/benchmarks.md).
    """
    n = math.prod(shape)
    table = _table_on("byte_pairs", packed.device)
    pairs = table.view(torch.int64).reshape(-1)  # the same bytes: entry b = (high value, low value) of byte b
    codes = packed.reshape(-1)
    if out is None:
        out = torch.empty(n, dtype=dtype, device=packed.device)
    else:
        _check_out(out, shape, dtype, packed.device)
        out = out.view(-1)
    full = n - n % blocksize
    # on a GPU one pass is fastest (a launch per chunk would cost more than cache misses)
    chunk = full if packed.device.type != "cpu" else max(blocksize, _DEQUANTIZE_CHUNK // blocksize * blocksize)
    scratch = None if dtype == torch.float32 or full == 0 else torch.empty(min(chunk, full), device=packed.device)
    for start in range(0, full, max(chunk, 1)):
        stop = min(full, start + chunk)
        values = out[start:stop] if scratch is None else scratch[: stop - start]
        torch.index_select(pairs, 0, codes[start // 2:stop // 2].int(), out=values.view(torch.int64))
        torch.mul(values.view(-1, blocksize), absmax[start // blocksize:stop // blocksize].view(-1, 1),
                  out=out[start:stop].view(-1, blocksize))
    if full < n:  # the ragged last block (its odd last byte holds one value in the high nibble)
        out[full:] = table.index_select(0, codes[full // 2:].int()).reshape(-1)[: n - full] * absmax[-1]
    return out.view(shape)


def _check_out(out: torch.Tensor, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
    if out.shape != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(shape)} {dtype} tensor on {device}; got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}{'' if out.is_contiguous() else ', strided'}")


def decode_double_quant_absmax(codes: torch.Tensor, nested: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The fp32 block scales of double-quantized storage: dynamic[code] · nested[block // 256] + offset."""
    return _dequantize_blockwise_8bit(codes, nested, NESTED_BLOCKSIZE) + offset


@functools.cache
def _dynamic_lookup_table() -> torch.Tensor:
    """Nearest dynamic-map code for each of 65536 evenly spaced points of [-1, 1].

    bitsandbytes' CPU kernel quantizes the 8-bit absmax codes through such a table rather than by
    an exact nearest search (measured: it agrees with this table on every probe, while an exact
    search differs near code midpoints), so we use the same table to stay byte-identical.
    """
    code = dynamic_map().double()
    points = torch.arange(65536, dtype=torch.float64) / 65535 * 2 - 1
    left = (torch.searchsorted(code, points, right=True) - 1).clamp(0, code.numel() - 1)
    right = (left + 1).clamp(max=code.numel() - 1)
    go_right = (points - code[right]).abs() < (points - code[left]).abs()
    return torch.where(go_right, right, left).to(torch.uint8)


def _quantize_blockwise_8bit(values: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit dynamic-map blockwise quantization, as bitsandbytes' CPU kernel does it (fp32 math)."""
    absmax = _blockwise_absmax(values, blocksize)
    scale = absmax.repeat_interleave(blocksize)[: values.numel()]
    # x * (1/absmax), not x / absmax: the two differ in the last bit, and bitsandbytes multiplies.
    normed = torch.where(scale > 0, values * (1.0 / scale), torch.zeros_like(values))
    # A subnormal scale has an infinite reciprocal (0·inf = NaN): keep such blocks in range.
    normed = torch.nan_to_num(normed, nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1, 1)
    slot = torch.floor((normed * 0.5 + 0.5) * 65535 + 0.5).long()
    codes = _dynamic_lookup_table().to(values.device)[slot]
    # An all-zero block is 0/0 in bitsandbytes' kernel, which lands on code 0; any code decodes to 0 there.
    return torch.where(scale > 0, codes, torch.zeros_like(codes)), absmax


def _dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    scale = absmax.repeat_interleave(blocksize)[: codes.numel()]
    return _table_on("dynamic", codes.device)[codes.long()] * scale


# --------------------------------------------------------------------------------------------
# the storage
# --------------------------------------------------------------------------------------------

def nf4_nbytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of one NF4 weight of `numel` values, exactly as `NF4Weight.nbytes` counts them: packed codes
    ceil(n/2) + per block an 8-bit absmax code with double quantization (plus an fp32 scale per 256 blocks
    and one fp32 offset) or an fp32 absmax without. The planner and the analysis count with this."""
    blocks = -(-numel // blocksize)
    if double_quant:
        return -(-numel // 2) + blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4
    return -(-numel // 2) + 4 * blocks


def _bits(t: torch.Tensor) -> torch.Tensor:
    """An fp32 tensor as its int32 bit pattern (a zero-copy view); uint8 codes stay as they are."""
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class NF4Weight(nn.Module):
    """A frozen 2-D weight stored as NF4 with bitsandbytes' layout: one module, registered tensors.

    Registered (what `.to(device)`, FSDP2's `fully_shard` and parameter iteration see):
      `packed`             uint8 (ceil(n/2), 1)  frozen parameter, 2 codes per byte
      `absmax_raw`         frozen parameter: the block scales, fp32, or with double quantization
                           their uint8 codes
      `nested_absmax_raw`  frozen parameter, fp32, one per 256 blocks (double quantization only)
      `offset_raw`         buffer of one fp32 (double quantization only)
    fp32 tensors are held as their int32 bit pattern: PyTorch's dtype casts (`.half()`,
    `.to(torch.bfloat16)`) touch floating tensors only, so a model-wide cast leaves the format
    alone with no override, exactly as it leaves the uint8 bytes. `absmax`, `nested_absmax` and
    `offset` are the fp32 views (no copy). Shape, dtype and block size are Python attributes.

    `state_dict()` writes bitsandbytes' keys for a `Linear4bit` named by the prefix (registered as a
    layer's `weight`: `weight`, `weight.absmax`, `weight.quant_map`, ...; standalone: "weight");
    `load_state_dict` reads them (or the registered names, which `torch.distributed.checkpoint`
    hands back when FSDP broadcasts a model).
    """

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...] | torch.Size,
                 dtype: torch.dtype, blocksize: int = 64, nested_absmax: torch.Tensor | None = None,
                 offset: torch.Tensor | None = None, backend: Resolved = "torch",
                 cache_absmax: bool | None = None):
        super().__init__()
        self.shape, self.dtype, self.blocksize, self.backend = torch.Size(shape), dtype, blocksize, backend
        # None: cache the decoded block scales on CPU only (see `block_absmax`)
        self.cache_absmax = cache_absmax
        self._absmax_cache: tuple | None = None
        self.packed = _frozen(packed)
        self.absmax_raw = _frozen(_bits(absmax))
        if nested_absmax is None:
            self.register_parameter("nested_absmax_raw", None)
            self.register_buffer("offset_raw", None)
        else:
            self.nested_absmax_raw = _frozen(_bits(nested_absmax))
            # (1,), not 0-d: a broadcast (fsdp.load_sharded) then sends it to the device as a tensor
            self.register_buffer("offset_raw", _bits(offset.reshape(1)))

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def from_tensor(cls, weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                    backend: Backend = "auto", name: str = "weight") -> NF4Weight:
        """Quantize `weight` (2-D, fp32/fp16/bf16, finite) on its own device."""
        _validate_weight(weight, blocksize, name)
        chosen = resolve_backend(backend, weight.device)
        # On CPU our kernel writes bitsandbytes' exact bytes 2.6x faster than its own (tested), so the
        # bitsandbytes backend quantizes with it there and keeps bitsandbytes' kernels for dequantizing.
        if runs_bitsandbytes(chosen) and weight.device.type != "cpu":
            import bitsandbytes.functional as bnbf

            packed, state = bnbf.quantize_4bit(weight.contiguous(), blocksize=blocksize,
                                               compress_statistics=double_quant, quant_type="nf4")
            if double_quant:
                return cls(packed, state.absmax, weight.shape, weight.dtype, blocksize,
                           state.state2.absmax, state.offset.float().reshape(()), chosen)
            return cls(packed, state.absmax, weight.shape, weight.dtype, blocksize, backend=chosen)

        packed, absmax = quantize_nf4(weight, blocksize)
        if not double_quant:
            return cls(packed, absmax, weight.shape, weight.dtype, blocksize, backend=chosen)
        offset = absmax.mean()
        codes, nested = _quantize_blockwise_8bit(absmax - offset, NESTED_BLOCKSIZE)
        return cls(packed, codes, weight.shape, weight.dtype, blocksize, nested, offset.reshape(()), chosen)

    @classmethod
    def empty(cls, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, blocksize: int = 64,
              double_quant: bool = True, backend: Resolved = "torch",
              device: str | torch.device = "meta") -> NF4Weight:
        """Uninitialised storage of the shapes `from_tensor` gives (a skeleton that a load fills in)."""
        n = math.prod(shape)
        blocks = -(-n // blocksize)
        packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=device)
        if not double_quant:
            return cls(packed, torch.empty(blocks, device=device), shape, dtype, blocksize, backend=backend)
        return cls(packed, torch.empty(blocks, dtype=torch.uint8, device=device), shape, dtype, blocksize,
                   torch.empty(-(-blocks // NESTED_BLOCKSIZE), device=device), torch.empty((), device=device), backend)

    # ---- properties ----------------------------------------------------------------------
    @property
    def absmax(self) -> torch.Tensor:
        """fp32 block scales, or with double quantization their uint8 codes."""
        raw = self.absmax_raw
        return raw if raw.dtype == torch.uint8 else raw.view(torch.float32)

    @property
    def nested_absmax(self) -> torch.Tensor | None:
        return None if self.nested_absmax_raw is None else self.nested_absmax_raw.view(torch.float32)

    @property
    def offset(self) -> torch.Tensor | None:
        return None if self.offset_raw is None else self.offset_raw.view(torch.float32).reshape(())

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax_raw is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes this weight occupies (the shared 16- and 256-entry code tables excluded)."""
        return sum(t.numel() * t.element_size() for t in (*self.parameters(), *self.buffers()))

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.numel

    # ---- compute --------------------------------------------------------------------------
    def block_absmax(self) -> torch.Tensor:
        """fp32 absmax per block (decoding the double quantization if present).

        The decoded scales never change while the base is frozen, yet every dequantize (forward,
        and backward for grad_x) would decode them again. They are cached where that pays and costs
        little: on CPU by default (`cache_absmax=None`), where the decode is a gather plus a
        repeat_interleave per call; not on GPU, where the triton backend decodes them inside its one
        kernel (bitsandbytes: two small kernels) and the fp32 copy would cost 0.5 bit/param of GPU
        memory (12% of the 4.127-bit format). `cache_absmax` True/False forces it. The cache is
        keyed by the storages and versions it came from, so a move, a load or an in-place write
        recomputes it.
        """
        if not self.double_quant:
            return self.absmax
        if not self._absmax_cached():
            self._absmax_cache = None
            return self._decode_absmax()
        sources = (self.absmax_raw, self.nested_absmax_raw, self.offset_raw)
        key = tuple((t.data_ptr(), t._version, t.device) for t in sources)
        if self._absmax_cache is None or self._absmax_cache[0] != key:
            # the aliases keep the source storages alive, so their addresses cannot be reused by others
            self._absmax_cache = (key, self._decode_absmax(), [t.detach() for t in sources])
        return self._absmax_cache[1]

    def _decode_absmax(self) -> torch.Tensor:
        return decode_double_quant_absmax(self.absmax, self.nested_absmax, self.offset)

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The full weight in `dtype` (default: the dtype it was quantized from); written into `out` (a
        contiguous tensor of the weight's shape and `dtype`, through the pure-torch kernel) when given."""
        dtype = dtype or self.dtype
        if out is not None:
            return dequantize_nf4(self.packed, self.block_absmax(), self.shape, self.blocksize, dtype, out)
        if self._uses_triton_kernel() and triton_kernel_usable():
            try:
                return self._dequantize_triton(dtype)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # a triton or driver that cannot build or launch the kernel
                give_up_triton(exc)
        if runs_bitsandbytes(self.backend) and self._bitsandbytes_dequant_is_exact():
            import bitsandbytes.functional as bnbf

            return bnbf.dequantize_4bit(self.packed, self._quant_state(dtype), quant_type="nf4")
        return dequantize_nf4(self.packed, self.block_absmax(), self.shape, self.blocksize, dtype)

    def _uses_triton_kernel(self) -> bool:
        return self.backend == "triton" and self.device.type == "cuda"

    def _dequantize_triton(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        from .nf4_triton import dequantize_nf4_triton  # imports triton: only where it runs

        dtype = dtype or self.dtype
        if self._absmax_cached():  # the decoded fp32 scales: the kernel reads them as they are
            return dequantize_nf4_triton(self.packed, self.block_absmax(), None, None, self.shape, self.blocksize,
                                         dtype)
        return dequantize_nf4_triton(self.packed, self.absmax, self.nested_absmax, self.offset, self.shape,
                                     self.blocksize, dtype)

    def _absmax_cached(self) -> bool:
        """Whether `block_absmax` keeps the decoded double-quant scales (see there)."""
        by_default = self.cache_absmax is None and self.device.type == "cpu"
        return self.double_quant and bool(self.cache_absmax or by_default)

    def _bitsandbytes_dequant_is_exact(self) -> bool:
        # Measured with bitsandbytes 0.50.2: its CPU NF4 dequantize kernel returns wrong values when
        # a row's length is not a multiple of the block size (blocks straddling rows, e.g. 128x96),
        # and odd row lengths go through a torch.compile fallback. Those shapes use the torch path.
        # Off CPU and CUDA (e.g. meta) bitsandbytes has no kernel.
        if self.device.type == "cpu":
            return self.shape[-1] % self.blocksize == 0
        return self.device.type == "cuda"

    def _quant_state(self, dtype: torch.dtype):
        from bitsandbytes.functional import QuantState

        code = _table_on("nf4", self.device)
        if self._absmax_cached():
            # the cached decoded scales: bitsandbytes then skips its own absmax decode
            return QuantState(absmax=self.block_absmax(), shape=self.shape, code=code, blocksize=self.blocksize,
                              quant_type="nf4", dtype=dtype)
        state2 = None
        if self.double_quant:
            state2 = QuantState(absmax=self.nested_absmax, code=_table_on("dynamic", self.device),
                                blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        return QuantState(absmax=self.absmax, shape=self.shape, code=code, blocksize=self.blocksize,
                          quant_type="nf4", dtype=dtype, offset=self.offset, state2=state2)

    def with_backend(self, backend: Backend) -> NF4Weight:
        """The same tensors (shared, not copied) dequantized through another backend."""
        return NF4Weight(self.packed.detach(), self.absmax.detach(), self.shape, self.dtype, self.blocksize,
                         None if self.nested_absmax is None else self.nested_absmax.detach(),
                         None if self.offset is None else self.offset.detach(),
                         resolve_backend(backend, self.device), self.cache_absmax)

    # ---- serialization: bitsandbytes' keys --------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        name = prefix[:-1] or "weight"  # as a layer's `weight`; standalone, named like one
        meta: dict = {"quant_type": "nf4", "blocksize": self.blocksize,
                      "dtype": dtype_name(self.dtype), "shape": list(self.shape)}

        def value(t: torch.Tensor) -> torch.Tensor:
            return t if keep_vars else t.detach()

        destination[name] = value(self.packed)
        destination[f"{name}.absmax"] = value(self.absmax)
        destination[f"{name}.quant_map"] = NF4_CODE.to(self.device).clone()
        if self.double_quant:
            destination[f"{name}.nested_absmax"] = value(self.nested_absmax)
            destination[f"{name}.nested_quant_map"] = dynamic_map().to(self.device).clone()
            meta.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32",
                         # a meta skeleton has no values to save
                         "nested_offset": None if self.offset.is_meta else self.offset.item()})
        blob = json.dumps(meta).encode("utf-8")
        destination[f"{name}.quant_state.bitsandbytes__nf4"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        name = prefix[:-1] or "weight"
        # bitsandbytes' keys: the packed bytes are `name` itself, which PyTorch hands to the parent;
        # a `LoRALinear4bit` passes them on as `packed` (standalone, they are here as "weight")
        packed = state_dict.get(prefix + "packed", state_dict.get(name))
        if prefix + "absmax_raw" not in state_dict and packed is not None:
            own = {name: packed, **{k: v for k, v in state_dict.items() if k.startswith(name + ".")}}
            own.pop(prefix + "packed", None)
            try:
                loaded = NF4Weight.from_state_dict(own, name, backend="torch")
            except ValueError as exc:
                error_msgs.append(str(exc))
                return
            mine, theirs = self._format(), loaded._format()
            if mine != theirs:
                error_msgs.append(f"{name}: the checkpoint stores {theirs}, this model {mine}")
                return
            state_dict = {prefix + k: v for k, v in loaded._named_raw().items()}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._absmax_cache = None

    def _format(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "blocksize": self.blocksize,
                "double_quant": self.double_quant}

    def _named_raw(self) -> dict[str, torch.Tensor]:
        return {**dict(self.named_parameters()), **dict(self.named_buffers())}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], prefix: str = "weight",
                        backend: Backend = "auto") -> NF4Weight:
        """Rebuild from a bitsandbytes-format state dict, without re-quantizing; validates every key."""
        meta_key = f"{prefix}.quant_state.bitsandbytes__nf4"
        missing = [k for k in (prefix, f"{prefix}.absmax", meta_key) if k not in tensors]
        if missing:
            fp4 = f"{prefix}.quant_state.bitsandbytes__fp4" in tensors
            hint = " (this is an FP4 checkpoint; only NF4 is supported)" if fp4 else ""
            raise ValueError(f"{prefix}: missing quantization keys {missing}{hint}")
        try:
            meta = json.loads(bytes(tensors[meta_key].cpu().numpy()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{meta_key}: unreadable quant-state JSON ({exc})") from None
        problems = []
        if meta.get("quant_type") != "nf4":
            problems.append(f"quant_type={meta.get('quant_type')!r}, expected 'nf4'")
        blocksize = meta.get("blocksize")
        if blocksize not in SUPPORTED_BLOCKSIZES:
            problems.append(f"blocksize={blocksize!r} is not one of {SUPPORTED_BLOCKSIZES}")
        dtype = dtype_from_name(meta.get("dtype"))
        if dtype is None:
            problems.append(f"dtype={meta.get('dtype')!r} is not float32/float16/bfloat16")
        shape = meta.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
            problems.append(f"shape={shape!r} is not a 2-D shape")
        if problems:
            raise ValueError(f"{prefix}: " + "; ".join(problems))
        shape = torch.Size(shape)
        n = math.prod(shape)
        packed, absmax = tensors[prefix], tensors[f"{prefix}.absmax"]
        expected = {prefix: ((n + 1) // 2, torch.uint8), f"{prefix}.absmax": (-(-n // blocksize), None)}
        nested = offset = None
        if "nested_offset" in meta:
            nested = tensors.get(f"{prefix}.nested_absmax")
            if nested is None:
                raise ValueError(f"{prefix}: quant state says double-quantized but {prefix}.nested_absmax is missing")
            offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=absmax.device)
            expected[f"{prefix}.absmax"] = (-(-n // blocksize), torch.uint8)
            expected[f"{prefix}.nested_absmax"] = (-(-expected[f"{prefix}.absmax"][0] // NESTED_BLOCKSIZE),
                                                   torch.float32)
        else:
            expected[f"{prefix}.absmax"] = (-(-n // blocksize), torch.float32)
        for key, (count, want_dtype) in expected.items():
            t = tensors[key]
            if t.numel() != count or (want_dtype is not None and t.dtype != want_dtype):
                raise ValueError(f"{key}: expected {count} values of {want_dtype}, found {t.numel()} of {t.dtype} "
                                 f"(shape {list(shape)}, blocksize {blocksize}); the checkpoint does not match")
        packed = packed.reshape(-1, 1)
        return cls(packed, absmax.reshape(-1), shape, dtype, blocksize,
                   None if nested is None else nested.reshape(-1), offset,
                   resolve_backend(backend, packed.device))

    def extra_repr(self) -> str:
        return (f"shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, backend={self.backend}, bits_per_param={self.bits_per_param:.3f}")


def _validate_weight(weight: torch.Tensor, blocksize: int, name: str) -> None:
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{name}: NF4 stores 2-D linear weights; got shape {tuple(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: dtype {weight.dtype} cannot be quantized; use float32, float16 or bfloat16")
    if weight.numel() == 0:
        raise ValueError(f"{name}: empty weight of shape {tuple(weight.shape)}")
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"{name}: blocksize {blocksize} is not supported; use one of {SUPPORTED_BLOCKSIZES}")
    if weight.device.type != "meta" and not all(math.isfinite(v) for v in map(float, torch.aminmax(weight))):
        raise ValueError(f"{name}: contains inf or NaN; NF4 cannot represent them (check the checkpoint)")
