"""LoRALinear4bit: gradient parity against a dequantized reference, saved tensors, adapters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlora_lite.layers import LoRALinear4bit
from qlora_lite.nf4 import NF4Weight

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def assert_close_scaled(actual, expected, dtype):
    """fp32: tight. bf16: errors measured against the tensor's scale (bf16 keeps 8 bits of mantissa,
    and the two sides sum in different orders)."""
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, **TOL[dtype])
    else:
        scale = expected.abs().max().item()
        torch.testing.assert_close(actual.float(), expected.float(), atol=2e-2 * scale, rtol=0)


def _layer(out_f=96, in_f=128, r=8, dtype=torch.float32, backend="torch", bias=True, rslora=False, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(out_f, in_f) * 0.05
    b = torch.randn(out_f) * 0.1 if bias else None
    layer = LoRALinear4bit(NF4Weight.from_tensor(w, backend=backend), b, r=r, lora_alpha=16, use_rslora=rslora)
    with torch.no_grad():
        layer.lora_B["default"].normal_(0, 0.1)  # non-zero B so every gradient path is exercised
    return layer


def _reference(layer: LoRALinear4bit, x: torch.Tensor):
    """Plain nn.Linear on dequantize() plus explicit LoRA math, in the same dtype."""
    dtype = x.dtype
    base = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    base.weight.data = layer.weight.dequantize(dtype)
    base.weight.requires_grad_(False)
    if layer.bias is not None:
        base.bias.data = layer.bias.data.to(dtype)
        base.bias.requires_grad_(False)
    A = layer.lora_A["default"].detach().clone().requires_grad_(True)
    B = layer.lora_B["default"].detach().clone().requires_grad_(True)
    y = base(x) + layer.scaling * (x @ A.to(dtype).t()) @ B.to(dtype).t()
    return y, A, B


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "bitsandbytes"])
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_gradients_match_dequantized_reference(dtype, backend, rslora):
    pytest.importorskip("bitsandbytes") if backend == "bitsandbytes" else None
    layer = _layer(backend=backend, rslora=rslora)
    x = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y_ref, A, B = _reference(layer, x_ref)
    assert_close_scaled(y, y_ref, dtype)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert_close_scaled(x.grad, x_ref.grad, dtype)
    assert_close_scaled(layer.lora_A["default"].grad, A.grad, dtype)
    assert_close_scaled(layer.lora_B["default"].grad, B.grad, dtype)
    assert layer.lora_A["default"].grad.dtype == torch.float32  # LoRA params stay fp32 (PEFT's k-bit rule)


def test_scaling_follows_alpha_over_r_and_rslora():
    assert _layer(r=8).scaling == 16 / 8
    assert _layer(r=8, rslora=True).scaling == pytest.approx(16 / 8**0.5)


def test_base_bytes_unchanged_and_no_base_gradient():
    layer = _layer()
    before = {k: v.clone() for k, v in layer.weight.state_dict().items()}
    x = torch.randn(4, 128, requires_grad=True)
    layer(x).pow(2).sum().backward()
    after = layer.weight.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.default", "lora_B.default"}


def test_saved_tensors_hold_no_dense_copy_of_the_base_weight():
    layer = _layer(out_f=192, in_f=256)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(2, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert saved, "the layer must save the LoRA input for its gradients"
    for t in saved:
        assert t.numel() < 192 * 256, f"saved a tensor of shape {tuple(t.shape)}: looks like a dense W0"
    y.sum().backward()


def test_zero_init_b_means_adapter_starts_as_identity_to_base():
    torch.manual_seed(0)
    layer = LoRALinear4bit(NF4Weight.from_tensor(torch.randn(64, 64)), None, r=4, lora_alpha=8)
    x = torch.randn(3, 64)
    with layer.disable_adapter():
        base_only = layer(x)
    torch.testing.assert_close(layer(x), base_only)
    assert not torch.equal(layer.lora_A["default"], torch.zeros_like(layer.lora_A["default"]))


def test_gaussian_init_std():
    torch.manual_seed(0)
    layer = LoRALinear4bit(NF4Weight.from_tensor(torch.randn(512, 2048)), None, r=16, lora_alpha=16,
                           init_lora_weights="gaussian")
    assert abs(layer.lora_A["default"].std().item() - 1 / 16) < 0.005


def test_disable_adapter_and_named_adapters():
    layer = _layer(bias=False)
    x = torch.randn(2, 128)
    y_default = layer(x)
    with layer.disable_adapter():
        torch.testing.assert_close(layer(x), x @ layer.weight.dequantize(torch.float32).t())
    layer.add_adapter("other", r=4, lora_alpha=4)
    with torch.no_grad():
        layer.lora_B["other"].fill_(0.01)
    assert layer.active_adapter == "other"
    assert not torch.allclose(layer(x), y_default)
    layer.set_adapter("default")
    torch.testing.assert_close(layer(x), y_default)
    layer.delete_adapter("other")
    with pytest.raises(KeyError, match="loaded: \\['default'\\]"):
        layer.set_adapter("other")


def test_merged_weight_forward_equals_adapter_forward():
    layer = _layer(bias=False)
    x = torch.randn(6, 128)
    torch.testing.assert_close(x @ layer.merged_weight().t(), layer(x), atol=1e-5, rtol=1e-5)


def test_dtype_casts_leave_the_base_alone():
    layer = _layer()
    bytes_before = layer.weight.packed.clone()
    layer.to(torch.bfloat16)
    assert layer.lora_A["default"].dtype == torch.bfloat16
    assert layer.weight.packed.dtype == torch.uint8 and torch.equal(layer.weight.packed, bytes_before)
    assert layer.weight.nested_absmax.dtype == torch.float32


def test_state_dict_carries_bitsandbytes_keys():
    sd = _layer().state_dict()
    assert {"weight", "weight.absmax", "weight.quant_state.bitsandbytes__nf4", "bias",
            "lora_A.default", "lora_B.default"} <= set(sd)


def test_eval_then_train_still_learns():
    """The bitsandbytes CPU pitfall (an eval pass repacking weights) must not exist here."""
    layer = _layer(backend="bitsandbytes")
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 128))
    layer.train()
    x = torch.randn(4, 128, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    y_ref, _, _ = _reference(layer, x.detach())
    torch.testing.assert_close(layer(x.detach()), y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_gradient_parity(dtype):
    layer = _layer(backend="bitsandbytes").cuda()
    assert layer.weight.device.type == "cuda"
    x = torch.randn(4, 7, 128, dtype=dtype, device="cuda", requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y_ref, A, B = _reference(layer, x_ref)
    torch.testing.assert_close(y, y_ref.cuda(), atol=3e-2, rtol=3e-2)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(layer.lora_A["default"].grad, A.grad, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["bitsandbytes", "torch"])
def test_a_training_step_of_an_nf4_layer_never_makes_the_host_wait_for_the_gpu(backend):
    """A synchronising op (a copy from pageable host memory, .item(), a data-dependent shape) in forward or
    backward drains the GPU queue 21 times per decoder layer and step; sync debug mode makes any an error."""
    layer = _layer(backend=backend).cuda()
    x = torch.randn(4, 7, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    layer(x).sum().backward()  # warm-up: one-off constants may reach the device here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            layer(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_dropout_path_gradients_match_reference():
    torch.manual_seed(0)
    layer = LoRALinear4bit(NF4Weight.from_tensor(torch.randn(48, 64) * 0.1), None, r=4, lora_alpha=8,
                           lora_dropout=0.5)
    with torch.no_grad():
        layer.lora_B["default"].normal_(0, 0.1)
    x = torch.randn(5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    dropped = torch.nn.functional.dropout(x_ref, 0.5, training=True)
    A = layer.lora_A["default"].detach().clone().requires_grad_(True)
    B = layer.lora_B["default"].detach().clone().requires_grad_(True)
    y_ref = x_ref @ layer.weight.dequantize(torch.float32).t() + layer.scaling * (dropped @ A.t()) @ B.t()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_A["default"].grad, A.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].grad, B.grad, atol=1e-5, rtol=1e-5)


def test_adapter_added_to_an_eval_model_applies_no_dropout():
    layer = _layer(bias=False)
    layer.eval()
    layer.add_adapter("late", r=4, lora_alpha=8, lora_dropout=0.5)
    with torch.no_grad():
        layer.lora_B["late"].normal_(0, 0.1)
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), layer(x))  # deterministic: no dropout in eval mode
    torch.testing.assert_close(layer(x), x @ layer.merged_weight("late").t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_steps_dequantize_into_one_reused_buffer_with_the_fresh_results(monkeypatch, dtype):
    """On CPU, forward and backward write W0 into one buffer per dtype and thread (a fresh weight of tens
    of MB costs page faults); a stack of layers of growing and shrinking width gives, to the bit, what
    dequantizing into fresh tensors gives, so no layer ever reads another's weight."""
    from qlora_lite import layers

    def stack():
        torch.manual_seed(0)
        return nn.Sequential(*(_layer(out_f=o, in_f=i, seed=k) for k, (i, o) in enumerate(
            [(128, 320), (320, 64), (64, 512), (512, 128)])))

    def step(model):
        x = torch.randn(4, 128, dtype=dtype, generator=torch.Generator().manual_seed(1), requires_grad=True)
        model(x).float().square().sum().backward()
        return [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]

    monkeypatch.setattr(layers, "_CPU_BUFFERS", layers._DequantizeBuffers())
    outs: list[torch.Tensor | None] = []
    dequantize = NF4Weight.dequantize
    monkeypatch.setattr(NF4Weight, "dequantize", lambda self, dt=None, out=None: (
        outs.append(out), dequantize(self, dt, out))[1])
    reused = step(stack())
    assert len(outs) == 8 and all(o is not None for o in outs)  # 4 forward, 4 backward
    # grown to the 512x128 weight by the fourth dequantize, then only reused
    assert len({o.untyped_storage().data_ptr() for o in outs[3:]}) == 1
    assert layers._CPU_BUFFERS.by_dtype[dtype].numel() == 512 * 128

    monkeypatch.setattr(layers, "_dense_for_matmul", layers._dense)
    outs.clear()
    fresh = step(stack())
    assert outs == [None] * 8
    for a, b in zip(reused, fresh, strict=True):
        assert torch.equal(a, b)
