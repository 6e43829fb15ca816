"""DoRA (use_dora): the layer against PEFT's DoRA on the same (dequantized NF4) base, in both
directions of the file format, gradients included, and the exact merge through its formula.

Every comparison randomizes B and the magnitude m (at initialisation B = 0 and m = ‖W0‖, which
makes DoRA the identity: comparisons there would hold trivially).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_lite.adapter import load_adapter, read_adapter, save_adapter
from qlora_lite.config import LoraConfig, QuantConfig
from qlora_lite.errors import CheckpointError
from qlora_lite.inject import inject_lora, lora_layers
from qlora_lite.layers import LoRALinear4bit
from qlora_lite.load import load_model
from qlora_lite.merge import merge, merge_adapter, unmerge_adapter
from qlora_lite.nf4 import NF4Weight
from conftest import tiny_llama_config

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def tiny_model(seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=False)).eval()


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Random B (std 0.05) and m scaled by 1 ± 0.2 per row, for PEFT's and our names alike."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * (2 * torch.rand(param.shape, generator=generator) - 1))


def dequantized_base(original: torch.nn.Module, ours: torch.nn.Module) -> torch.nn.Module:
    base = copy.deepcopy(original)
    for path, layer in lora_layers(ours).items():
        base.get_submodule(path).weight.data = layer.base_weight(torch.float32).clone()
    return base


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def dora_config(**extra) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, use_dora=True, **extra)


@pytest.mark.parametrize("quantized", [True, False])
def test_dora_with_b_zero_computes_the_base_and_m_starts_at_the_row_norms(quantized):
    torch.manual_seed(0)
    w0, bias, x = torch.randn(48, 64), torch.randn(48), torch.randn(3, 5, 64)
    base = NF4Weight.from_tensor(w0, 64, True, "torch") if quantized else w0
    layer = LoRALinear4bit(base, bias, r=4, lora_alpha=8, use_dora=True).eval()
    dense = layer.base_weight(torch.float32)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"], dense.norm(dim=1), atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, dense, bias), atol=1e-5, rtol=0)
        layer.lora_magnitude_vector["default"].mul_(2.0)  # and m does act: every output row doubles
        torch.testing.assert_close(layer(x), 2 * torch.nn.functional.linear(x, dense) + bias, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["kaiming", "loftq"])
def test_an_initialised_dora_model_computes_what_lora_computes(init):
    """Whole model, before training: DoRA with m = ‖W‖ computes the same logits as plain LoRA on the same
    NF4 base: W0 + s·B·A for B = 0 (kaiming), and LoftQ's Q + s·B·A with B ≠ 0 (m from the row norms of
    that sum, not of W0 or Q alone)."""
    original = tiny_model()
    models = {}
    for use_dora in (False, True):
        model = copy.deepcopy(original)
        torch.manual_seed(3)  # the same kaiming A in both
        inject_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                                      init_lora_weights=init, use_dora=use_dora), quant=QuantConfig(backend="torch"))
        models[use_dora] = model
    plain = logits(models[False])
    assert (plain - logits(original)).abs().max() > 1e-3  # NF4 (and LoftQ) did change the model
    torch.testing.assert_close(logits(models[True]), plain, atol=1e-5, rtol=0)


def test_layer_output_and_gradients_equal_peft_dora_on_the_dequantized_base():
    """NF4 layer vs PEFT's DoRA Linear on nn.Linear(dequantize(W0)), in train mode with dropout (the same
    mask: both draw it once from the same seed): output and the gradients of x, A, B and m."""
    torch.manual_seed(0)
    w0, bias = torch.randn(48, 64) * 0.1, torch.randn(48)
    ours = LoRALinear4bit(NF4Weight.from_tensor(w0, 64, True, "torch"), bias, r=4, lora_alpha=8, lora_dropout=0.25,
                          use_dora=True).train()
    linear = torch.nn.Linear(64, 48)
    linear.weight.data, linear.bias.data = ours.base_weight(torch.float32).clone(), bias.clone()
    wrapped = peft.get_peft_model(torch.nn.ModuleDict({"proj": linear}), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.25, target_modules=["proj"], use_dora=True))
    theirs = wrapped.base_model.model["proj"].train()
    perturb(ours, seed=1)
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A["default"])
        theirs.lora_B["default"].weight.copy_(ours.lora_B["default"])
        theirs.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector["default"])
    x = torch.randn(2, 7, 64)
    outputs, grads = [], []
    for layer, params in ((ours, [ours.lora_A["default"], ours.lora_B["default"], ours.lora_magnitude_vector["default"]]),
                          (theirs, [theirs.lora_A["default"].weight, theirs.lora_B["default"].weight,
                                    theirs.lora_magnitude_vector["default"].weight])):
        torch.manual_seed(5)
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outputs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in params])
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=0)
    for name, ours_grad, peft_grad in zip(["x", "A", "B", "m"], *grads):
        torch.testing.assert_close(ours_grad, peft_grad, atol=1e-5, rtol=1e-5, msg=f"grad of {name}")


def test_our_dora_adapter_loads_in_peft_with_equal_logits(tmp_path):
    original = tiny_model()
    ours = copy.deepcopy(original)
    inject_lora(ours, dora_config(), quant=QuantConfig())
    perturb(ours, seed=1)
    save_adapter(ours, tmp_path / "adapter")
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sum(k.endswith(".lora_magnitude_vector") for k in keys) == 6  # PEFT's key, no ".weight"

    peft_model = peft.PeftModel.from_pretrained(dequantized_base(original, ours), str(tmp_path / "adapter")).eval()
    assert peft_model.peft_config["default"].use_dora is True
    torch.testing.assert_close(logits(peft_model), logits(ours), atol=1e-5, rtol=0)


def test_peft_dora_adapter_loads_here_with_equal_logits(tmp_path):
    original = tiny_model()
    original.save_pretrained(tmp_path / "base")
    ours, _ = load_model(tmp_path / "base", QuantConfig(), lora=None, device="cpu", compute_dtype=torch.float32,
                         with_tokenizer=False)
    # PEFT initialises m from the base it wraps: give it ours, so its m is what training on NF4 starts from
    trained = peft.get_peft_model(dequantized_base(original, ours), peft.LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, use_dora=True, task_type="CAUSAL_LM"))
    perturb(trained, seed=2)
    trained.save_pretrained(str(tmp_path / "peft_adapter"))

    adapter = load_adapter(ours, tmp_path / "peft_adapter")
    assert adapter.use_dora and len(adapter.magnitude) == 6
    torch.testing.assert_close(logits(ours.eval()), logits(trained.eval()), atol=1e-5, rtol=0)
    save_adapter(ours, tmp_path / "resaved")  # and back: the same tensors, byte for byte
    assert {k: v.tolist() for k, v in load_file(tmp_path / "resaved" / "adapter_model.safetensors").items()} == \
           {k: v.tolist() for k, v in load_file(tmp_path / "peft_adapter" / "adapter_model.safetensors").items()}


def test_streaming_merge_of_a_dora_adapter_equals_peft_merge_and_verifies(tmp_path):
    original = tiny_model()
    original.save_pretrained(tmp_path / "base", max_shard_size="100KB")
    model, _ = load_model(tmp_path / "base", QuantConfig(), dora_config(), device="cpu",
                          compute_dtype=torch.float32, with_tokenizer=False)
    perturb(model, seed=3)
    save_adapter(model, tmp_path / "adapter")
    report = merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", dtype="float32", progress=False,
                   verify=True)
    assert report.verification is not None
    merged_by_peft = peft.PeftModel.from_pretrained(dequantized_base(original, model),
                                                    str(tmp_path / "adapter")).merge_and_unload()
    ours = {}
    for file in sorted((tmp_path / "out").glob("*.safetensors")):
        ours.update(load_file(file))
    for key, value in merged_by_peft.state_dict().items():
        torch.testing.assert_close(ours[key], value, atol=2e-6, rtol=0, msg=key)


def test_in_memory_merge_and_unmerge_of_dora_on_a_16bit_base():
    model = tiny_model()
    inject_lora(model, dora_config(), quant=None)
    perturb(model, seed=4)
    want = logits(model)
    assert len(merge_adapter(model)) == 6
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=0)
    assert len(unmerge_adapter(model)) == 6
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=0)


def test_only_a_b_and_m_train():
    model = tiny_model()
    inject_lora(model, dora_config(), quant=QuantConfig())
    trained = {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"lora_A", "lora_B", "lora_magnitude_vector"}


@pytest.mark.parametrize("problem", ["missing", "shape", "flag"])
def test_bad_dora_adapters_are_refused(tmp_path, problem):
    model = tiny_model()
    inject_lora(model, dora_config(), quant=None)
    save_adapter(model, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("lora_magnitude_vector"))
    if problem == "missing":
        del tensors[key]
    elif problem == "shape":
        tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, weights)
    if problem == "flag":
        config = tmp_path / "adapter" / "adapter_config.json"
        config.write_text(config.read_text().replace('"use_dora": true', '"use_dora": false'))
    with pytest.raises(CheckpointError, match="lora_magnitude_vector"):
        read_adapter(tmp_path / "adapter")
