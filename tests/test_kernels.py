"""The hot path's launches and the optional fast paths (kernels.py): parity with the unfused reference."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qlora_lite import kernels
from qlora_lite.config import LoraConfig, QuantConfig, TrainConfig
from qlora_lite.errors import ConfigError
from qlora_lite.inject import inject_lora
from qlora_lite.layers import LoRALinear4bit
import conftest

TINY = conftest.TINY | dict(max_position_embeddings=64, vocab_size=97, tie_word_embeddings=False)


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _dense_lora_layer(lora_dtype: torch.dtype) -> LoRALinear4bit:
    torch.manual_seed(0)
    layer = LoRALinear4bit(torch.randn(48, 32, dtype=torch.bfloat16), r=4, lora_alpha=8,
                           lora_dtype=lora_dtype)
    with torch.no_grad():
        layer.lora_B["default"].normal_(0, 0.1)
    return layer


@pytest.mark.parametrize("lora_dtype, casts", [(torch.bfloat16, 0), (torch.float32, 4)])
def test_lora_layer_launches_no_scaling_ops_and_casts_adapters_once(lora_dtype, casts):
    """s rides in the GEMMs' alpha; fp32 adapters are cast to the compute dtype once per forward (A, B)
    and their two gradients back once; bf16 adapters are never cast."""
    layer = _dense_lora_layer(lora_dtype)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16, requires_grad=True)
    log = OpLog()
    with log:
        y = layer(x)
        y.backward(torch.ones_like(y))
    assert not {"mul", "mul_", "div", "div_"} & set(log.ops), log.ops
    assert log.ops.count("_to_copy") == casts, log.ops
    # and the result is still the reference: x·W0ᵀ + s·x·Aᵀ·Bᵀ, gradients included
    A = layer.lora_A["default"].detach().float().requires_grad_(True)
    B = layer.lora_B["default"].detach().float().requires_grad_(True)
    x_ref = x.detach().float().requires_grad_(True)
    y_ref = x_ref @ layer.weight.float().t() + layer.scaling * (x_ref @ A.t()) @ B.t()
    y_ref.backward(torch.ones_like(y_ref))
    torch.testing.assert_close(y.float(), y_ref, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(x.grad.float(), x_ref.grad, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(layer.lora_A["default"].grad.float(), A.grad, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(layer.lora_B["default"].grad.float(), B.grad, atol=5e-2, rtol=2e-2)


def _tiny(model_type: str = "llama", dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TINY)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, lora_dtype="float32"),
                QuantConfig(backend="torch"))
    for layer in model.modules():
        if isinstance(layer, LoRALinear4bit) and layer.active_adapter:
            with torch.no_grad():
                layer.lora_B["default"].normal_(0, 0.02)  # non-zero B: every gradient path is exercised
    return model.to(device).train()


def _loss_and_grads(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_fused_kernels_are_refused_cleanly_without_cuda():
    model = _tiny()
    assert "cpu" in kernels.fused_kernels_plan(model, "auto", torch.device("cpu"))
    assert kernels.apply_fused_kernels(model, "auto", "cpu") == {"rms_norm": 0, "swiglu": 0, "rope": 0}
    assert not any("forward" in vars(m) for m in model.modules())
    with pytest.raises(ConfigError, match="fused_kernels=true but the device is cpu"):
        kernels.apply_fused_kernels(model, True, "cpu")
    assert kernels.fused_kernels_plan(model, False, torch.device("cuda")) == "fused_kernels is off"
    with pytest.raises(ConfigError, match="fused_kernels"):
        TrainConfig(fused_kernels="yes")


def test_patched_modules_keep_plain_torch_for_cpu_tensors_and_come_off(monkeypatch):
    """The patching itself, on CPU: Liger is never called for a CPU tensor, the result is unchanged to the
    bit, and remove_fused_kernels restores every module."""
    from transformers.models.llama import modeling_llama

    def never(*args, **kwargs):
        raise AssertionError("a Liger kernel was called for a CPU tensor")

    fake = types.ModuleType("liger_kernel.transformers.functional")
    fake.liger_rms_norm = fake.liger_swiglu = fake.liger_rope = never
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", fake)
    monkeypatch.setattr(kernels, "fused_kernels_plan", lambda *a: None)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)  # restored after
    model = _tiny()
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    counts = kernels.apply_fused_kernels(model, True, "cpu")
    assert counts == {"rms_norm": 2 * TINY["num_hidden_layers"] + 1, "swiglu": 2, "rope": 2}
    loss, grads = _loss_and_grads(model, ids)
    assert torch.equal(loss, loss_ref) and grads.keys() == grads_ref.keys()
    assert all(torch.equal(grads[n], grads_ref[n]) for n in grads)
    assert kernels.remove_fused_kernels(model) == sum(counts.values())
    assert not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lean_ops_keep_the_models_own_rounding(model_type, dtype):
    """The lean norm (weight · rms_norm(x)) and RoPE (x·cos + roll(x)·sin±) round as the model's own code:
    on CPU, where rms_norm runs as plain ops, the loss and every gradient are equal to the bit. (The weight
    inside the fused op would round once instead of twice, and an addcmul for RoPE would skip a rounding:
    both differ in bf16.)"""
    model = _tiny(model_type, dtype)
    torch.manual_seed(3)
    with torch.no_grad():  # trained-looking norm weights (fresh ones are all 1, and 1·x rounds to nothing)
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.normal_(1.0, 0.3)
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(2))
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    counts = kernels.apply_lean_ops(model, True, "cpu")
    assert counts == {"rms_norm": 2 * TINY["num_hidden_layers"] + 1, "rope": TINY["num_hidden_layers"]}
    log = OpLog()
    with log:
        loss, grads = _loss_and_grads(model, ids)
    assert log.ops.count("roll") >= 4 * TINY["num_hidden_layers"] and "neg" not in log.ops[log.ops.index("roll"):]
    assert torch.equal(loss, loss_ref) and grads.keys() == grads_ref.keys()
    assert all(torch.equal(grads[n], grads_ref[n]) for n in grads)
    assert kernels.remove_fused_kernels(model) == sum(counts.values())
    assert not any("forward" in vars(m) for m in model.modules())
    loss_again, _ = _loss_and_grads(model, ids)  # the family's RoPE dispatcher stays, inert outside patched modules
    assert torch.equal(loss_again, loss_ref)


def test_the_lean_rope_is_transformers_rope_in_four_ops_each_way():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 6, 16, generator=g).bfloat16().requires_grad_(True)
    k = torch.randn(2, 2, 6, 16, generator=g).bfloat16().requires_grad_(True)
    angles = torch.randn(2, 6, 8, generator=g)
    cos, sin = (torch.cat((f(angles), f(angles)), -1).bfloat16() for f in (torch.cos, torch.sin))
    q_ref, k_ref = (t.detach().clone().requires_grad_(True) for t in (q, k))
    reference = (apply_rotary_pos_emb.__wrapped__ if hasattr(apply_rotary_pos_emb, "__wrapped__")
                 else apply_rotary_pos_emb)
    outs_ref = reference(q_ref, k_ref, cos, sin)
    grads = [torch.randn(o.shape, generator=g).bfloat16() for o in outs_ref]
    kernels.lean_rope(q.detach(), k.detach(), cos, sin)  # builds sin's signed tables, once
    log = OpLog()
    with log:
        outs = kernels.lean_rope(q, k, cos, sin)
        forward_ops = [op for op in log.ops if op != "unsqueeze"]
        torch.autograd.backward(outs, grads)
    torch.autograd.backward(outs_ref, grads)
    assert forward_ops == ["mul", "roll", "mul", "add_"] * 2, forward_ops
    assert [op for op in log.ops if op not in ("unsqueeze", "detach")][8:] == ["roll", "mul", "mul", "add_"] * 2, log.ops
    assert all(torch.equal(a, b) for a, b in zip(outs, outs_ref))
    assert torch.equal(q.grad, q_ref.grad) and torch.equal(k.grad, k_ref.grad)
    # the signed tables follow sin: written in place, they are rebuilt
    with torch.no_grad():
        sin.mul_(0.5)
    assert all(torch.equal(a, b) for a, b in zip(kernels.lean_rope(q, k, cos, sin), reference(q, k, cos, sin)))


def test_lean_norms_run_as_one_op_each_way_where_torch_has_the_kernel():
    """What CUDA runs: `_fused_rms_norm` forward, `_fused_rms_norm_backward` backward, and the weight multiply
    (the model's own norm is ~20 ops). CPU has no kernel for them, so the test lends it one for the call."""
    model = _tiny("llama", torch.bfloat16)
    norm = model.model.norm
    x = torch.randn(2, 5, TINY["hidden_size"], dtype=torch.bfloat16, requires_grad=True)
    expected = norm(x)
    with torch.library._scoped_library("aten", "IMPL") as lib:
        lib.impl("_fused_rms_norm", _reference_fused_rms_norm, "CPU")
        lib.impl("_fused_rms_norm_backward", _reference_fused_rms_norm_backward, "CPU")
        kernels.apply_lean_ops(model, True, "cpu", rope=False)
        log = OpLog()
        with log:
            y = norm(x)
            y.backward(torch.ones_like(y))
    kernels.remove_fused_kernels(model)
    launched = [op for op in log.ops if op not in ("detach", "ones_like", "expand")]
    assert launched == ["_fused_rms_norm", "mul", "mul", "_fused_rms_norm_backward"], log.ops
    assert torch.equal(y, expected)


def _reference_fused_rms_norm(x, normalized_shape, weight, eps):
    dims = tuple(range(-len(normalized_shape), 0))
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + eps)
    return (xf * rstd).to(x.dtype), rstd


def _reference_fused_rms_norm_backward(grad, x, normalized_shape, rstd, weight, output_mask):
    dims = tuple(range(-len(normalized_shape), 0))
    normed = x.float() * rstd
    g = grad.float()
    return (rstd * (g - normed * (g * normed).mean(dims, keepdim=True))).to(x.dtype), None


def test_lean_ops_plan_and_settings():
    model = _tiny()
    assert "cpu" in kernels.lean_ops_plan(model, "auto", torch.device("cpu"))
    assert kernels.lean_ops_plan(model, "auto", torch.device("cuda")) is None
    assert kernels.lean_ops_plan(model, True, torch.device("cpu")) is None
    assert kernels.lean_ops_plan(model, False, torch.device("cuda")) == "lean_ops is off"
    kernels.apply_speedups(model, False, False, torch.device("cpu"), log=lambda msg: None)  # train's defaults
    assert not any("forward" in vars(m) for m in model.modules())
    logs: list[str] = []
    kernels.apply_speedups(model, False, True, torch.device("cpu"), logs.append, lean_ops=True)
    assert logs[0] == "lean ops (PyTorch): 5 rms_norm, 0 rope"  # under compile the compiler fuses RoPE itself
    kernels.remove_fused_kernels(model)
    model.config.model_type = "gemma"  # (1 + weight) norms: not Llama's
    assert "gemma" in kernels.lean_ops_plan(model, "auto", torch.device("cuda"))
    with pytest.raises(ConfigError, match="lean_ops=true but model type 'gemma'"):
        kernels.apply_lean_ops(model, True, "cpu")
    with pytest.raises(ConfigError, match="lean_ops"):
        TrainConfig(lean_ops="yes")


def test_what_liger_took_is_left_to_it(monkeypatch):
    fake = types.ModuleType("liger_kernel.transformers.functional")
    fake.liger_rms_norm = fake.liger_swiglu = fake.liger_rope = None
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", fake)
    monkeypatch.setattr(kernels, "fused_kernels_plan", lambda model, setting, device: None if setting else "off")
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)
    model = _tiny()
    logs: list[str] = []
    kernels.apply_speedups(model, True, False, torch.device("cpu"), logs.append, lean_ops=True)
    assert logs == ["fused kernels (Liger): 5 rms_norm, 2 swiglu, 2 rope"]  # nothing left for the lean ops
    kernels.remove_fused_kernels(model)
    kernels.apply_speedups(model, False, False, torch.device("cpu"), logs.append, lean_ops=True)
    assert logs[-1] == "lean ops (PyTorch): 5 rms_norm, 2 rope"


def test_regional_compile_matches_eager_forward_and_gradients():
    """torch.compile of each decoder layer (the tracing and autograd: backend aot_eager keeps CPU fast)
    with checkpointing on, as train runs it."""
    from qlora_lite.train import enable_checkpointing

    torch._dynamo.reset()
    if torch.cuda.is_available():  # the checkpoint refuses a CUDA context first created inside its forward
        torch.cuda.init()
    model = _tiny()
    enable_checkpointing(model)
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    assert kernels.compile_decoder_layers(model, backend="aot_eager") == TINY["num_hidden_layers"]
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * 7 * TINY["num_hidden_layers"]
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_liger_kernels_match_plain_torch_on_cuda(model_type):
    pytest.importorskip("liger_kernel")
    model = _tiny(model_type, torch.bfloat16, "cuda")
    ids = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0)).cuda()
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    counts = kernels.apply_fused_kernels(model, True, "cuda")
    assert counts == {"rms_norm": 2 * TINY["num_hidden_layers"] + 1, "swiglu": 2, "rope": 2}
    log = OpLog()
    with log:
        loss, grads = _loss_and_grads(model, ids)
    assert "rsqrt" not in log.ops and "silu" not in log.ops  # the norms and SwiGLU ran in Liger's kernels
    torch.testing.assert_close(loss, loss_ref, atol=2e-2, rtol=1e-2)
    for name in grads_ref:
        scale = grads_ref[name].float().abs().max().item() + 1e-6
        torch.testing.assert_close(grads[name].float() / scale, grads_ref[name].float() / scale, atol=3e-2, rtol=0)
    kernels.remove_fused_kernels(model)
    loss_again, _ = _loss_and_grads(model, ids)
    assert torch.equal(loss_again, loss_ref)


@pytest.mark.gpu
def test_regional_compile_with_inductor_matches_eager_on_cuda():
    from qlora_lite.train import enable_checkpointing

    torch._dynamo.reset()
    model = _tiny("llama", torch.bfloat16, "cuda")
    enable_checkpointing(model)
    ids = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1)).cuda()
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    kernels.compile_decoder_layers(model)
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, loss_ref, atol=2e-2, rtol=1e-2)
    for name in grads_ref:
        scale = grads_ref[name].float().abs().max().item() + 1e-6
        torch.testing.assert_close(grads[name].float() / scale, grads_ref[name].float() / scale, atol=3e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_lean_ops_match_the_models_own_on_cuda(model_type):
    """PyTorch's CUDA RMSNorm kernel and the lean RoPE: the loss and every gradient as the model's own code
    (within the kernel's reduction order), one `_fused_rms_norm` per norm and no `neg` of RoPE's."""
    model = _tiny(model_type, torch.bfloat16, "cuda")
    ids = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0)).cuda()
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    counts = kernels.apply_lean_ops(model, "auto", "cuda")
    assert counts == {"rms_norm": 2 * TINY["num_hidden_layers"] + 1, "rope": TINY["num_hidden_layers"]}
    log = OpLog()
    with log:
        loss, grads = _loss_and_grads(model, ids)
    assert "rsqrt" not in log.ops and log.ops.count("_fused_rms_norm") == counts["rms_norm"]
    assert "neg" not in log.ops[log.ops.index("roll"):]
    torch.testing.assert_close(loss, loss_ref, atol=1e-2, rtol=1e-2)
    for name in grads_ref:
        scale = grads_ref[name].float().abs().max().item() + 1e-6
        torch.testing.assert_close(grads[name].float() / scale, grads_ref[name].float() / scale, atol=2e-2, rtol=0)
    kernels.remove_fused_kernels(model)
