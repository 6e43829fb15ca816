"""LoftQ and PiSSA initialisation: the model before training is closer to the 16-bit model than
plain NF4, PiSSA's factors are PEFT's, the base trained on travels with the adapter, and merge,
load and verification use that base (not NF4(W0))."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from qlora_lite.adapter import BASE_NAME, load_adapter, save_adapter
from qlora_lite.config import LoraConfig, QuantConfig
from qlora_lite.errors import CheckpointError, ConfigError
from qlora_lite.init import loftq, pissa
from qlora_lite.inject import inject_lora, lora_layers
from qlora_lite.load import load_model
from qlora_lite.merge import merge
from qlora_lite.nf4 import NF4Weight
from qlora_lite.settings import RunSettings
from conftest import tiny_llama_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def tiny_model(seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=False)).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def lora(init: str, **extra) -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=init, **extra)


@pytest.mark.parametrize("init", ["loftq", "pissa", "pissa_niter_4"])
def test_before_training_the_model_is_closer_to_16bit_than_plain_nf4(init):
    original = tiny_model()
    want = logits(original)
    errors = {}
    for method in ("kaiming", init):
        model = copy.deepcopy(original)
        inject_lora(model, lora(method), QuantConfig())
        errors[method] = (logits(model) - want).abs().mean().item()
    print(f"\n{init}: mean |Δlogit| vs the 16-bit model {errors[init]:.5f}, plain NF4 {errors['kaiming']:.5f} "
          f"({errors[init] / errors['kaiming']:.2f}x)")
    assert errors[init] < 0.9 * errors["kaiming"]


def test_loftq_iterations_reduce_the_weight_error():
    model = tiny_model()
    w0 = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    errors = []
    for iters in (1, 3):
        layer = copy.deepcopy(model)
        inject_lora(layer, lora("loftq", loftq_iter=iters), QuantConfig())
        errors.append((lora_layers(layer)["model.layers.0.mlp.down_proj"].merged_weight() - w0).norm().item())
    plain = (NF4Weight.from_tensor(w0, 64, True, "torch").dequantize(torch.float32) - w0).norm().item()
    assert errors[1] < errors[0] < plain


def test_pissa_factors_and_residual_are_peft_pissa():
    """Tensor by tensor: PEFT's PiSSA on the 16-bit layer gives our A and B, and our base is NF4 of its residual."""
    peft = pytest.importorskip("peft")
    original = tiny_model()
    theirs = peft.get_peft_model(copy.deepcopy(original), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj"], init_lora_weights="pissa"))
    peft_layer = theirs.base_model.model.model.layers[1].self_attn.q_proj
    w0 = original.model.layers[1].self_attn.q_proj.weight.detach()
    ours = pissa(w0, 8, 2.0, 64, True, "torch")
    torch.testing.assert_close(ours.lora_A, peft_layer.lora_A["default"].weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.lora_B, peft_layer.lora_B["default"].weight, atol=1e-6, rtol=0)
    residual = NF4Weight.from_tensor(peft_layer.base_layer.weight.detach(), 64, True, "torch")
    assert torch.equal(ours.base.packed, residual.packed) and torch.equal(ours.base.absmax_raw, residual.absmax_raw)


@pytest.mark.gpu
def test_loftq_equals_peft_loftq_on_cuda():
    """PEFT's loftq_init runs on CUDA only (its compute device is hard-coded), so the tensor-by-tensor check
    waits for a GPU. PEFT quantizes without double quantization and leaves out the 1/s, so s = 1 here: the
    NF4 base is then NF4(W0) byte for byte (one iteration), and s·B·A equals PEFT's B·A (an SVD's signs and
    last bits differ between devices; the product does not, to float error)."""
    from peft.utils.loftq_utils import loftq_init as peft_loftq_init

    torch.manual_seed(0)
    w0 = torch.randn(96, 128) * 0.05
    for iters in (1, 3):
        dequantized, peft_a, peft_b = peft_loftq_init(w0.cuda(), num_bits=4, reduced_rank=8, num_iter=iters)
        ours = loftq(w0, r=8, scaling=1.0, blocksize=64, double_quant=False, backend="torch", num_iter=iters)
        ours_base = ours.base.dequantize(torch.float32)
        if iters == 1:
            assert torch.equal(ours_base, dequantized.float().cpu())
        else:  # Q depends on the previous SVD: a code at a rounding boundary may differ; the fit may not
            ours_err = (ours_base + ours.lora_B @ ours.lora_A - w0).norm()
            peft_err = (dequantized.float().cpu() + (peft_b @ peft_a).cpu() - w0).norm()
            assert abs(ours_err / peft_err - 1) < 0.01
        if iters == 1:
            torch.testing.assert_close(ours.lora_B @ ours.lora_A, (peft_b @ peft_a).float().cpu(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("init, use_dora", [("loftq", False), ("pissa", False), ("pissa_niter_4", False),
                                             ("pissa", True)])
def test_adapter_carries_its_base_and_merge_verifies_on_it(tmp_path, init, use_dora):
    original = tiny_model()
    original.save_pretrained(tmp_path / "base", max_shard_size="100KB")
    config = lora(init, use_dora=use_dora)
    model, _ = load_model(tmp_path / "base", QuantConfig(), config, device="cpu", compute_dtype=torch.float32,
                          with_tokenizer=False)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # as after training: B moved
        for layer in lora_layers(model).values():
            layer.lora_B["default"].add_(torch.randn(layer.lora_B["default"].shape, generator=generator) * 0.02)
            if use_dora:  # and m: magnitudes that differ from the row norms they started at
                layer.lora_magnitude_vector["default"].mul_(1.1)
    save_adapter(model, tmp_path / "adapter", settings=RunSettings.for_run(tmp_path / "base", QuantConfig(), config,
                                                                             torch.float32))
    stored = load_file(tmp_path / "adapter" / BASE_NAME)
    assert sum(k.endswith(".weight.absmax") for k in stored) == 14

    fresh, _ = load_model(tmp_path / "base", QuantConfig(), None, device="cpu", compute_dtype=torch.float32,
                          with_tokenizer=False)
    load_adapter(fresh, tmp_path / "adapter")  # the stored base replaces NF4(W0)
    torch.testing.assert_close(logits(fresh), logits(model), atol=1e-5, rtol=0)

    report = merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", dtype="float32", progress=False,
                   verify=True)
    assert report.verification["top1_agreement_up_to_ties"] >= 0.999
    print(f"\n{init}: merge verification max |Δlogit| {report.verification['max_abs_logit_diff']:.2e}")
    merged = load_file(tmp_path / "out" / "model.safetensors") if (tmp_path / "out" / "model.safetensors").is_file() \
        else {k: v for f in sorted((tmp_path / "out").glob("*.safetensors")) for k, v in load_file(f).items()}
    for path, layer in lora_layers(model).items():
        torch.testing.assert_close(merged[f"{path}.weight"], layer.merged_weight(), atol=1e-6, rtol=0)

    (tmp_path / "adapter" / BASE_NAME).unlink()
    with pytest.raises(CheckpointError, match=BASE_NAME):
        merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out2", dtype="float32", progress=False)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="init_lora_weights") as info:
        LoraConfig(init_lora_weights="loft", loftq_iter=0)
    assert "loftq_iter" in str(info.value)
    with pytest.raises(ConfigError, match="needs an NF4 base"):
        inject_lora(tiny_model(), lora("pissa"), quant=None)


def test_a_loftq_dora_training_run_merges_and_verifies(tiny_model_dir, memorize_data, tmp_path):
    """End to end: train() with LoftQ + DoRA saves the base it trained on and the magnitudes; the merge
    (settings read from the adapter directory) reproduces the trained model."""
    from qlora_lite.config import TrainConfig
    from qlora_lite.train import train

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights="loftq", use_dora=True)
    result = train(TrainConfig(model=str(tiny_model_dir), data=str(memorize_data), out_dir=str(tmp_path / "run"),
                               seq_len=64, batch_size=4, max_steps=4, learning_rate=5e-3, warmup_steps=1,
                               eval_fraction=0.1, eval_every=4, save_every=4, progress=False, device="cpu",
                               lora=config, quant=QuantConfig(backend="torch")))
    assert (result.adapter_dir / BASE_NAME).is_file()
    assert any(k.endswith("lora_magnitude_vector") for k in load_file(result.adapter_dir / "adapter_model.safetensors"))
    report = merge(tiny_model_dir, result.adapter_dir, tmp_path / "merged", dtype="float32", progress=False,
                   verify=True)
    assert report.verification["top1_agreement_up_to_ties"] >= 0.999


def test_train_config_refuses_loftq_without_quant_or_with_fsdp():
    from qlora_lite.config import TrainConfig

    with pytest.raises(ConfigError, match="needs quant") as info:
        TrainConfig(quant=None, fsdp=True, lora=lora("loftq"))
    assert "fsdp" in str(info.value)
