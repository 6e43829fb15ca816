"""The NF4 format: code table, byte parity with bitsandbytes, error bounds, serialization."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_lite.nf4 import NF4_CODE, NF4Weight, dynamic_map, quantize_nf4

bnbf = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(128, 96), (77, 33), (300, 257), (3, 5), (1000, 999), (64, 64), (1, 1)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_code_tables_equal_bitsandbytes():
    assert torch.equal(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu").float())
    assert torch.equal(dynamic_map(), bnbf.create_dynamic_map())


def test_nibble_order_first_value_in_high_nibble():
    # value 1.0 -> code 15, value -1.0 -> code 0: packed byte 0xF0
    packed, _ = quantize_nf4(torch.tensor([[1.0, -1.0]]), 64)
    ref, _ = bnbf.quantize_4bit(torch.tensor([[1.0, -1.0]]), blocksize=64, quant_type="nf4")
    assert packed.flatten().tolist() == [0xF0] == ref.flatten().tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_torch_backend_bytes_equal_bitsandbytes_cpu(shape, dtype, double_quant):
    g = torch.Generator().manual_seed(100 * SHAPES.index(shape) + DTYPES.index(dtype))  # constant per case
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    w.view(-1)[:: 17] *= 20  # outliers move the absmax around
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    ours = NF4Weight.from_tensor(w, double_quant=double_quant, backend="torch")
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax, state.absmax)
    if double_quant:
        assert torch.equal(ours.nested_absmax, state.state2.absmax)
        assert torch.equal(ours.offset, state.offset)
    # bitsandbytes 0.50.2's CPU dequantize is wrong when blocks straddle rows (see nf4.py);
    # compare values only where its kernel is exact, bytes everywhere.
    if shape[-1] % 64 == 0:
        reference = bnbf.dequantize_4bit(packed, state)
        assert torch.equal(ours.dequantize(dtype), reference)
        for out_dtype in DTYPES:
            assert torch.equal(ours.dequantize(out_dtype), ours.with_backend("bitsandbytes").dequantize(out_dtype))


def test_dequantize_is_correct_where_bitsandbytes_cpu_kernel_is_not():
    w = torch.randn(128, 96)
    q = NF4Weight.from_tensor(w, double_quant=False, backend="bitsandbytes")
    err = (q.dequantize(torch.float32) - w).abs().reshape(-1, 64)
    assert (err <= 0.16 * w.abs().reshape(-1, 64).amax(1, keepdim=True) + 1e-6).all()


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 4096])
def test_other_blocksizes_match_bitsandbytes(blocksize):
    w = torch.randn(96, 200)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    ours = NF4Weight.from_tensor(w, blocksize=blocksize, backend="torch")
    assert torch.equal(ours.packed, packed) and torch.equal(ours.absmax, state.absmax)


def test_bitsandbytes_backend_holds_bitsandbytes_bytes():
    w = torch.randn(256, 320, dtype=torch.bfloat16)
    b = NF4Weight.from_tensor(w, backend="bitsandbytes")  # on CPU quantized by our kernel: must be bnb's bytes
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert b.backend == "bitsandbytes"
    assert torch.equal(b.packed, packed) and torch.equal(b.absmax, state.absmax)
    assert torch.equal(b.nested_absmax, state.state2.absmax) and b.offset.item() == state.offset.item()


@pytest.mark.parametrize("shape", [(3, 174763), (2, 262144), (5, 131072 + 64)])
def test_chunked_quantization_matches_bitsandbytes_across_chunk_boundaries(shape):
    """quantize_nf4 works in chunks of 2**18 values: whole chunks, a ragged last chunk, an odd
    count with a ragged last block, all byte-identical to bitsandbytes."""
    torch.manual_seed(1)
    w = torch.randn(shape) * torch.linspace(0.01, 3, shape[1])
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    ours_packed, ours_absmax = quantize_nf4(w, 64)
    assert torch.equal(ours_packed, packed) and torch.equal(ours_absmax, state.absmax)


@pytest.mark.parametrize("shape", [(3, 5), (7, 64), (40, 48), (96, 688), (9, 1536)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_dequantize_equals_code_times_absmax_across_chunk_boundaries(monkeypatch, shape, dtype):
    """Every value is NF4_CODE[nibble] * absmax of its block in fp32, rounded once to `dtype`, also
    where a chunk boundary, the ragged last block or an odd last byte falls."""
    from qlora_lite import nf4

    monkeypatch.setattr(nf4, "_DEQUANTIZE_CHUNK", 128)  # several chunks even on these small shapes
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    q = NF4Weight.from_tensor(w, double_quant=True, backend="torch")
    n = w.numel()
    nibbles = torch.stack([q.packed.reshape(-1) >> 4, q.packed.reshape(-1) & 15], 1).reshape(-1)[:n].long()
    absmax = q.block_absmax().repeat_interleave(64)[:n]
    expected = (NF4_CODE[nibbles] * absmax).to(dtype).reshape(shape)
    assert torch.equal(nf4.dequantize_nf4(q.packed, q.block_absmax(), q.shape, 64, dtype), expected)


def test_round_trip_error_matches_bitsandbytes_anchor_and_bounds():
    torch.manual_seed(0)
    w = torch.randn(4096, 4096)
    q = NF4Weight.from_tensor(w, backend="torch")
    err = (q.dequantize(torch.float32) - w).abs()
    assert abs(err.mean().item() - 0.0728) < 0.0005
    assert 4.12 < q.bits_per_param < 4.13
    # Each value is off by at most half the widest code gap times its block's absmax
    # (plus the small double-quantization error of that absmax).
    half_gap = ((NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2).item()
    block_absmax = w.reshape(-1, 64).abs().amax(1, keepdim=True)
    bound = half_gap * block_absmax + (q.block_absmax().view(-1, 1) - block_absmax).abs()
    assert (err.reshape(-1, 64) <= bound + 1e-6).all()


def test_dequantize_without_double_quant_is_exact_code_times_absmax():
    w = torch.randn(8, 64)
    q = NF4Weight.from_tensor(w, double_quant=False, backend="torch")
    absmax = w.abs().amax(1, keepdim=True)
    deq = q.dequantize(torch.float32)
    candidates = NF4_CODE.view(1, 1, -1) * absmax.view(-1, 1, 1)  # every representable value per row
    assert (deq.unsqueeze(-1) == candidates).any(-1).all()


def test_state_dict_keys_and_round_trip_identity():
    w = torch.randn(48, 130, dtype=torch.bfloat16)
    q = NF4Weight.from_tensor(w, backend="torch")
    sd = q.state_dict()
    assert sorted(sd) == sorted([
        "weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__nf4",
    ])
    meta = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].numpy()))
    assert meta["shape"] == [48, 130] and meta["dtype"] == "bfloat16" and meta["blocksize"] == 64
    back = NF4Weight.from_state_dict(sd, "weight", backend="torch")
    assert torch.equal(back.dequantize(), q.dequantize())
    again = back.state_dict()
    assert all(torch.equal(sd[k], again[k]) for k in sd)


def test_state_dict_matches_bitsandbytes_quant_state_as_dict():
    w = torch.randn(40, 70, dtype=torch.float16)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    theirs = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    ours = NF4Weight.from_tensor(w, backend="torch").state_dict()
    assert sorted(theirs) == sorted(ours)
    for key in theirs:
        assert torch.equal(theirs[key], ours[key]), key


def test_to_never_changes_bytes_or_dtype():
    q = NF4Weight.from_tensor(torch.randn(64, 64), backend="torch")
    moved = q.to("cpu")
    assert moved is q
    meta = q.to("meta")
    assert meta.packed.device.type == "meta" and meta.packed.dtype == torch.uint8
    assert meta.nested_absmax.dtype == torch.float32


@pytest.mark.parametrize(
    "weight, blocksize, message",
    [
        (torch.randn(4, 4, 4), 64, "2-D"),
        (torch.randint(0, 3, (8, 8)), 64, "dtype"),
        (torch.randn(8, 8), 48, "blocksize"),
        (torch.tensor([[1.0, float("nan")]]), 64, "inf or NaN"),
        (torch.tensor([[1.0, float("inf")]]), 64, "inf or NaN"),
    ],
)
def test_bad_weights_are_named_errors(weight, blocksize, message):
    with pytest.raises(ValueError, match=message) as info:
        NF4Weight.from_tensor(weight, blocksize=blocksize, name="layers.0.q_proj.weight")
    assert "layers.0.q_proj.weight" in str(info.value)


def test_bad_state_dicts_are_named_errors():
    sd = NF4Weight.from_tensor(torch.randn(16, 64), backend="torch").state_dict(prefix="m.weight.")
    missing = {k: v for k, v in sd.items() if not k.endswith("absmax")}
    with pytest.raises(ValueError, match="m.weight.*missing"):
        NF4Weight.from_state_dict(missing, "m.weight")
    wrong = dict(sd, **{"m.weight": sd["m.weight"][:-1]})
    with pytest.raises(ValueError, match="m.weight: expected 512"):
        NF4Weight.from_state_dict(wrong, "m.weight")
    bad_meta = dict(sd, **{"m.weight.quant_state.bitsandbytes__nf4": torch.tensor([1, 2, 255], dtype=torch.uint8)})
    with pytest.raises(ValueError, match="unreadable"):
        NF4Weight.from_state_dict(bad_meta, "m.weight")


@pytest.mark.gpu
def test_cuda_backend_packed_bytes_equal_cpu_reference():
    w = torch.randn(512, 384)
    cpu = NF4Weight.from_tensor(w, backend="torch")
    cuda = NF4Weight.from_tensor(w.cuda(), backend="bitsandbytes")
    assert torch.equal(cuda.packed.cpu(), cpu.packed)
    # Measured difference documented in docs/formats.md: CUDA's 8-bit absmax codes may differ.
    torch.testing.assert_close(cuda.dequantize(torch.float32).cpu(), cpu.dequantize(torch.float32),
                               atol=0.02, rtol=0)
    ours_on_cuda = NF4Weight.from_tensor(w.cuda(), backend="torch")
    assert torch.equal(ours_on_cuda.packed.cpu(), cpu.packed)


def test_large_weight_absmax_codes_match_bitsandbytes_exactly():
    """An llama-7B MLP shape: ~700k absmax codes, where a division instead of bitsandbytes'
    reciprocal multiply would already differ in one code (measured)."""
    w = torch.randn(4096, 11008, generator=torch.Generator().manual_seed(5))
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = NF4Weight.from_tensor(w, backend="torch")
    assert torch.equal(ours.absmax, state.absmax) and torch.equal(ours.packed, packed)


def test_the_cached_absmax_is_the_decoded_one_and_follows_the_storage():
    """On CPU the decoded double-quant absmax is kept between calls; a load or an in-place write
    of the storage must not leave a stale copy behind."""
    g = torch.Generator().manual_seed(3)
    q = NF4Weight.from_tensor(torch.randn(64, 300, generator=g), backend="torch")
    first = q.block_absmax()
    assert q.block_absmax() is first and torch.equal(first, q._decode_absmax())
    other = NF4Weight.from_tensor(torch.randn(64, 300, generator=g) * 3, backend="torch")
    q.load_state_dict(other.state_dict())
    assert torch.equal(q.dequantize(), other.dequantize())
    before = q.block_absmax()
    with torch.no_grad():
        q.absmax_raw.copy_(q.absmax_raw.flip(0))  # in place: same storage, new version
    assert torch.equal(q.block_absmax(), q._decode_absmax()) and not torch.equal(q.block_absmax(), before)
    q.cache_absmax = False
    assert q.block_absmax() is not q.block_absmax()  # decoded on every call


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_nf4_nbytes_counts_what_the_container_holds(blocksize, double_quant):
    from qlora_lite import analysis, memory
    from qlora_lite.nf4 import nf4_nbytes

    for shape in [(3, 5), (77, 33), (300, 257), (128, 96)]:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0]))
        held = NF4Weight.from_tensor(w, blocksize, double_quant, backend="torch").nbytes
        assert nf4_nbytes(w.numel(), blocksize, double_quant) == held, shape
    assert memory.nf4_nbytes is nf4_nbytes and analysis.nf4_bytes is nf4_nbytes  # one copy of the rule


@pytest.mark.parametrize("backend", ["torch", "bitsandbytes"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_into_a_buffer_equals_the_backends_fresh_result(monkeypatch, backend, dtype):
    """`out=` (the pure-torch kernel) writes every value the backend's own dequantize returns, into the
    buffer given, across chunk boundaries; a buffer of the wrong shape, dtype or layout is refused."""
    from qlora_lite import nf4

    if backend == "bitsandbytes":
        pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(nf4, "_DEQUANTIZE_CHUNK", 256)
    for shape in [(96, 640), (40, 48)]:  # bitsandbytes computes the first, the torch path the second
        q = NF4Weight.from_tensor(torch.randn(shape, generator=torch.Generator().manual_seed(5)), backend=backend)
        buffer = torch.full(shape, float("nan"), dtype=dtype)
        assert q.dequantize(dtype, out=buffer).data_ptr() == buffer.data_ptr()
        assert torch.equal(buffer, q.dequantize(dtype))
    for bad in (torch.empty(40, 47, dtype=dtype), torch.empty(40, 48, dtype=torch.float64),
                torch.empty(48, 40, dtype=dtype).t()):
        with pytest.raises(ValueError, match="out must be a contiguous"):
            q.dequantize(dtype, out=bad)
