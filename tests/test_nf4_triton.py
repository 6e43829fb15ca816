"""The one-launch Triton NF4 dequantize (qlora_lite/nf4_triton.py) against the pure-torch reference and
bitsandbytes' CUDA kernels.

On CPU the very same kernel function runs under Triton's interpreter (TRITON_INTERPRET=1 while it is
decorated; numpy underneath) and must give the bytes of `dequantize_nf4`, which tests/test_nf4.py proves
identical to bitsandbytes' CPU kernel. On a GPU (`-m gpu`): the bytes of bitsandbytes' CUDA
`dequantize_4bit` for the same weight, in one kernel launch where bitsandbytes takes three.
"""

from __future__ import annotations

import pytest
import torch

from qlora_lite.config import QuantConfig
from qlora_lite.nf4 import NF4Weight, dequantize_nf4, resolve_backend

triton = pytest.importorskip("triton")
nf4_triton = pytest.importorskip("qlora_lite.nf4_triton")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(scope="module")
def interpreted():
    """The module's kernel function decorated again with the interpreter on (read at decoration)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        return triton.jit(nf4_triton._dequantize_kernel.fn)


def _random_storage(n: int, blocksize: int, double_quant: bool, seed: int) -> NF4Weight:
    """Any bytes the format can hold: every packed byte and absmax code value, random scales and offset."""
    g = torch.Generator().manual_seed(seed)
    blocks = -(-n // blocksize)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, generator=g)
    if not double_quant:
        return NF4Weight(packed, torch.randn(blocks, generator=g), (1, n), torch.float32, blocksize)
    codes = torch.randint(0, 256, (blocks,), dtype=torch.uint8, generator=g)
    nested = torch.rand(-(-blocks // 256), generator=g) * 4
    return NF4Weight(packed, codes, (1, n), torch.float32, blocksize, nested, torch.tensor(0.37), "torch")


def _edge_weight() -> torch.Tensor:
    """Zero blocks, an fp32 extreme (past fp16's range), subnormal-sized blocks, mixed signs. (Two blocks
    near fp32's maximum would overflow the double-quant offset, a mean: inf scales, NaN values.)"""
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(11))
    w[0] = 0.0
    w[1] = 3.0e38
    w[2, ::2] = -2.0e37
    w[3] = 1e-40
    w[4, :32] = -70000.0  # rounds to -inf in fp16 as it does on the GPU
    w[5, 7] = 1e-30
    return w


def _assert_same_bytes(interpreted, q: NF4Weight, dtype: torch.dtype, absmax=None, nested=None, offset=None):
    absmax, nested, offset = ((q.absmax, q.nested_absmax, q.offset) if absmax is None else (absmax, nested, offset))
    ours = nf4_triton._launch(interpreted, q.packed.reshape(-1), absmax, nested, offset, q.numel, q.blocksize, dtype)
    reference = dequantize_nf4(q.packed, q.block_absmax(), q.shape, q.blocksize, dtype)
    assert torch.equal(ours.view(torch.uint8), reference.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, blocksize, double_quant", [
    ((64, 96), 64, True),     # blocks straddle rows
    ((7, 33), 32, True),      # odd count: a ragged last block and a half-used last byte
    ((64, 1024), 32, True),   # 2048 blocks: eight nested scales
    ((3, 4096), 4096, True),  # one block per program
    ((3, 5000), 4096, True),  # ... the last one ragged
    ((9, 1000), 512, True),   # four blocks per program, the last program part-filled
    ((5, 9), 64, False),      # one ragged block, fp32 absmax
    ((33, 128), 128, False),
])
def test_interpreted_kernel_equals_the_torch_reference(interpreted, shape, blocksize, double_quant, dtype):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape) + blocksize))
    _assert_same_bytes(interpreted, NF4Weight.from_tensor(w, blocksize, double_quant, backend="torch"), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_interpreted_kernel_equals_the_reference_on_any_stored_bytes(interpreted, double_quant, dtype):
    _assert_same_bytes(interpreted, _random_storage(3 * 2048 + 37, 64, double_quant, seed=5), dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy's fp16 inf
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_interpreted_kernel_on_zero_and_extreme_blocks(interpreted, double_quant, dtype):
    _assert_same_bytes(interpreted, NF4Weight.from_tensor(_edge_weight(), 64, double_quant, backend="torch"), dtype)


def test_interpreted_kernel_takes_the_decoded_absmax(interpreted):
    """With `cache_absmax` the decoded fp32 scales go in as they are (the no-double-quant branch)."""
    q = NF4Weight.from_tensor(torch.randn(40, 320, generator=torch.Generator().manual_seed(2)), backend="torch")
    _assert_same_bytes(interpreted, q, torch.bfloat16, q.block_absmax(), None, None)


def test_the_weight_hands_the_op_its_codes_or_its_cached_scales(interpreted):
    """`NF4Weight`'s CUDA path, through the op `qlora_lite::nf4_dequantize`, lent the interpreted kernel
    as its CPU kernel for the test: argument order, the cached-scales branch and the output shape."""
    w = torch.randn(48, 200, generator=torch.Generator().manual_seed(8))
    q = NF4Weight.from_tensor(w, backend="triton")
    scales_passed = []

    def kernel(packed, absmax, *args):
        scales_passed.append(absmax.dtype)
        return nf4_triton._launch(interpreted, packed, absmax, *args)

    with torch.library._scoped_library("qlora_lite", "IMPL") as lib:
        lib.impl("nf4_dequantize", kernel, "CPU")
        for cache_absmax in (False, True):
            q.cache_absmax = cache_absmax
            for dtype in DTYPES:
                expected = dequantize_nf4(q.packed, q.block_absmax(), q.shape, q.blocksize, dtype)
                assert torch.equal(q._dequantize_triton(dtype).view(torch.uint8), expected.view(torch.uint8))
    assert scales_passed == [torch.uint8] * 3 + [torch.float32] * 3  # codes decoded inside, or the cached scales


def test_auto_picks_triton_where_it_imports_and_the_setting_can_refuse_it(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "triton"
    assert resolve_backend("bitsandbytes", cpu) == "bitsandbytes"
    assert resolve_backend("auto", torch.device("meta")) == "torch"
    QuantConfig(backend="triton")  # a valid setting
    from qlora_lite import nf4_backends

    monkeypatch.setattr(nf4_backends, "triton_available", lambda: False)
    assert resolve_backend("auto", cpu) == "bitsandbytes"
    with pytest.raises(RuntimeError, match="backend='triton' but triton cannot be imported"):
        resolve_backend("triton", cpu)


def test_triton_backend_on_cpu_computes_as_bitsandbytes():
    """Off CUDA the triton backend is bitsandbytes' path: same bytes as a bitsandbytes-backend weight."""
    pytest.importorskip("bitsandbytes")
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(4))
    ours, theirs = NF4Weight.from_tensor(w, backend="triton"), NF4Weight.from_tensor(w, backend="bitsandbytes")
    assert ours.backend == "triton" and torch.equal(ours.packed, theirs.packed)
    for dtype in DTYPES:
        assert torch.equal(ours.dequantize(dtype), theirs.dequantize(dtype))


# ---- on a GPU ----------------------------------------------------------------------------------

GPU_CASES = [((4096, 4096), 64, True), ((11008, 4096), 64, True), ((4096, 11008), 64, False),
             ((1000, 1001), 128, True)]  # the last: an odd count, blocks straddling rows


@pytest.mark.gpu
@pytest.mark.parametrize("shape, blocksize, double_quant", GPU_CASES)
def test_triton_bytes_equal_bitsandbytes_cuda(shape, blocksize, double_quant):
    pytest.importorskip("bitsandbytes")
    w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0])).cuda()
    theirs = NF4Weight.from_tensor(w, blocksize, double_quant, backend="bitsandbytes")  # bitsandbytes' CUDA bytes
    ours = theirs.with_backend("triton")
    cached = theirs.with_backend("triton")
    cached.cache_absmax = True
    for dtype in DTYPES:  # the kernel itself, not `dequantize` (which would fall back to bitsandbytes' bytes)
        expected = theirs.dequantize(dtype).view(torch.uint8)
        assert torch.equal(ours._dequantize_triton(dtype).view(torch.uint8), expected), dtype
        assert torch.equal(cached._dequantize_triton(dtype).view(torch.uint8), expected), dtype


def _cuda_kernels(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn()  # compiled and warm
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@pytest.mark.gpu
def test_auto_dequantize_is_one_kernel_launch_on_cuda():
    pytest.importorskip("bitsandbytes")
    w = torch.randn(4096, 4096, device="cuda")
    ours = NF4Weight.from_tensor(w)
    assert ours.backend == "triton"
    assert _cuda_kernels(lambda: ours.dequantize(torch.bfloat16)) == 1
    # what it replaces: 8-bit absmax decode, `+ offset`, 4-bit dequantize
    assert _cuda_kernels(lambda: ours.with_backend("bitsandbytes").dequantize(torch.bfloat16)) == 3


def test_a_kernel_that_cannot_run_falls_back_to_the_same_bytes_once(monkeypatch):
    """Where the process's triton cannot build the kernel (another version, a driver), dequantize warns once
    and gives bitsandbytes' bytes from then on; running out of memory is not such a failure."""
    from qlora_lite import nf4_backends

    weight = NF4Weight.from_tensor(torch.randn(64, 128, generator=torch.Generator().manual_seed(5)), backend="triton")
    expected = weight.with_backend("bitsandbytes").dequantize(torch.bfloat16)
    calls = []

    def broken(dtype=None):
        calls.append(dtype)
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(nf4_backends, "_TRITON_FAILED", [])
    monkeypatch.setattr(NF4Weight, "_uses_triton_kernel", lambda self: True)
    monkeypatch.setattr(weight, "_dequantize_triton", broken)
    with pytest.warns(RuntimeWarning, match="PassManager::run failed.*bitsandbytes' kernels instead"):
        assert torch.equal(weight.dequantize(torch.bfloat16), expected)
    assert torch.equal(weight.dequantize(torch.bfloat16), expected) and len(calls) == 1  # not tried again

    def out_of_memory(dtype=None):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(nf4_backends, "_TRITON_FAILED", [])
    monkeypatch.setattr(weight, "_dequantize_triton", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        weight.dequantize(torch.bfloat16)
