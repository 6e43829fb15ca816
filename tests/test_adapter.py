"""PEFT-format adapters: interop with the real `peft` package both ways, named adapters, bad input.

Both sides always compute on the same base: PEFT gets the 16-bit model whose linear weights are
replaced by our dequantized NF4 weights. Tolerance: logits within atol=1e-5 (fp32; the two sides
sum the LoRA branch in the same order, so differences are last-bit rounding).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_lite.adapter import (delete_adapter, disable_adapters, list_adapters, load_adapter, read_adapter,
                                save_adapter, set_adapter)
from qlora_lite.config import LoraConfig, QuantConfig
from qlora_lite.errors import CheckpointError
from qlora_lite.inject import inject_lora, lora_layers
from qlora_lite.load import load_model
from conftest import tiny_llama_config

peft = pytest.importorskip("peft")

ATOL = 1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_model(seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=False)).eval()


def randomize_b(model: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Non-zero B (B starts at zero, which would make every comparison trivial)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in sorted(model.named_parameters()):
            if "lora_B" in pname:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def dequantized_base(original: torch.nn.Module, ours: torch.nn.Module) -> torch.nn.Module:
    """A plain 16-bit copy of `original` whose quantized linears hold our dequantized NF4 weights."""
    base = copy.deepcopy(original)
    for path, layer in lora_layers(ours).items():
        base.get_submodule(path).weight.data = layer.weight.dequantize(torch.float32).clone()
    return base


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every byte of every frozen NF4 base."""
    out = {}
    for path, layer in lora_layers(model).items():
        for key, tensor in layer.weight.state_dict(prefix=f"{path}.weight.").items():
            out[key] = tensor.clone()
    return out


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_our_adapter_loads_in_peft_with_equal_logits(tmp_path, use_rslora):
    original = tiny_model()
    ours = copy.deepcopy(original)
    adapted = inject_lora(ours, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj",
                                                                                                "down_proj"],
                                           use_rslora=use_rslora), quant=QuantConfig())
    assert len(adapted) == 6 and len(lora_layers(ours)) == 14  # every linear but lm_head is NF4
    randomize_b(ours, seed=1)
    ours.eval()
    save_adapter(ours, tmp_path / "adapter")

    peft_model = peft.PeftModel.from_pretrained(dequantized_base(original, ours), str(tmp_path / "adapter")).eval()
    assert peft_model.peft_config["default"].use_rslora is use_rslora
    torch.testing.assert_close(logits(peft_model, IDS), logits(ours, IDS), atol=ATOL, rtol=0)
    # the model card: PEFT's metadata (what the Hub indexes), as PEFT's own save writes it
    from huggingface_hub import ModelCard

    peft_model.save_pretrained(tmp_path / "peft_saved")
    theirs = ModelCard.load(tmp_path / "peft_saved" / "README.md").data.to_dict()
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    mine = card.data.to_dict()
    assert {k: mine[k] for k in ("library_name", "pipeline_tag")} == {k: theirs[k] for k in ("library_name",
                                                                                           "pipeline_tag")}
    assert set(theirs["tags"]) - {t for t in theirs["tags"] if t.startswith("base_model:")} <= set(mine["tags"])
    assert "r=4, lora_alpha=8" in card.text

    adapter_bytes = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    original.save_pretrained(tmp_path / "base")
    base_bytes = sum(f.stat().st_size for f in (tmp_path / "base").glob("*.safetensors"))
    print(f"\nadapter file {adapter_bytes:,} B vs base checkpoint {base_bytes:,} B (fp32 tiny Llama): "
          f"{base_bytes / adapter_bytes:.0f}x smaller")


def test_peft_adapter_loads_here_with_equal_logits(tmp_path):
    original = tiny_model()
    trained = peft.get_peft_model(copy.deepcopy(original), peft.LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "o_proj", "up_proj"], task_type="CAUSAL_LM"))
    randomize_b(trained, seed=2)
    trained.save_pretrained(str(tmp_path / "peft_adapter"))
    original.save_pretrained(tmp_path / "base")

    ours, _ = load_model(tmp_path / "base", QuantConfig(), lora=None, device="cpu", compute_dtype=torch.float32,
                         with_tokenizer=False)
    adapter = load_adapter(ours, tmp_path / "peft_adapter")
    assert len(adapter.modules) == 6 and adapter.scaling == 4.0

    peft_model = peft.PeftModel.from_pretrained(dequantized_base(original, ours), str(tmp_path / "peft_adapter"))
    torch.testing.assert_close(logits(ours, IDS), logits(peft_model.eval(), IDS), atol=ATOL, rtol=0)
    with disable_adapters(ours), peft_model.disable_adapter():  # and the bases alone agree too
        torch.testing.assert_close(logits(ours, IDS), logits(peft_model, IDS), atol=ATOL, rtol=0)


def test_rank_and_alpha_patterns_load_save_and_merge_as_peft_does(tmp_path):
    from qlora_lite.merge import merge

    original = tiny_model()
    original.save_pretrained(tmp_path / "base")
    trained = peft.get_peft_model(copy.deepcopy(original), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM",
        rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6}, alpha_pattern={"down_proj": 3.0}))
    randomize_b(trained, seed=3)
    trained.save_pretrained(str(tmp_path / "peft_adapter"))

    adapter = read_adapter(tmp_path / "peft_adapter")
    q0, q1, v, down = (f"model.layers.{i}.{m}" for i, m in ((0, "self_attn.q_proj"), (1, "self_attn.q_proj"),
                                                           (0, "self_attn.v_proj"), (1, "mlp.down_proj")))
    assert [adapter.rank_for(m) for m in (q0, q1, v, down)] == [4, 6, 2, 4]
    assert [adapter.scaling_for(m) for m in (q0, q1, v, down)] == [2.0, 8 / 6, 4.0, 0.75]

    ours, _ = load_model(tmp_path / "base", QuantConfig(), lora=None, device="cpu", compute_dtype=torch.float32,
                         with_tokenizer=False)
    load_adapter(ours, tmp_path / "peft_adapter")
    peft_model = peft.PeftModel.from_pretrained(dequantized_base(original, ours), str(tmp_path / "peft_adapter"))
    torch.testing.assert_close(logits(ours, IDS), logits(peft_model.eval(), IDS), atol=ATOL, rtol=0)

    save_adapter(ours, tmp_path / "resaved")  # the patterns survive our save, and PEFT reads them back
    config = json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {v: 2, "model.layers.1.self_attn.v_proj": 2, q1: 6}
    assert config["lora_alpha"] == 8 and config["alpha_pattern"] == {"model.layers.0.mlp.down_proj": 3.0, down: 3.0}
    again = peft.PeftModel.from_pretrained(dequantized_base(original, ours), str(tmp_path / "resaved"))
    torch.testing.assert_close(logits(again.eval(), IDS), logits(ours, IDS), atol=ATOL, rtol=0)

    merge(tmp_path / "base", tmp_path / "peft_adapter", tmp_path / "merged", dtype="float32", progress=False)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged, IDS), logits(ours, IDS), atol=ATOL, rtol=0)


def test_named_adapters_switch_disable_delete_without_touching_nf4(tmp_path):
    original = tiny_model()
    original.save_pretrained(tmp_path / "base")
    for name, seed, targets in [("a", 3, ["q_proj", "v_proj"]), ("b", 4, TARGETS)]:
        source = copy.deepcopy(original)
        inject_lora(source, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets),
                    quant=QuantConfig())
        randomize_b(source, seed)
        save_adapter(source, tmp_path / name)

    model, _ = load_model(tmp_path / "base", QuantConfig(), lora=None, device="cpu", compute_dtype=torch.float32,
                          with_tokenizer=False)
    before, bases = snapshot(model), {p: l.weight for p, l in lora_layers(model).items()}
    base_out = logits(model, IDS)
    load_adapter(model, tmp_path / "a", name="a")
    load_adapter(model, tmp_path / "b", name="b")
    assert list_adapters(model) == ["a", "b"]
    out_b = logits(model, IDS)  # the last loaded is active
    set_adapter(model, "a")
    out_a = logits(model, IDS)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base_out)

    reference = dequantized_base(original, model)
    for name, out in [("a", out_a), ("b", out_b)]:
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(reference), str(tmp_path / name)).eval()
        torch.testing.assert_close(out, logits(peft_model, IDS), atol=ATOL, rtol=0)

    with disable_adapters(model):
        torch.testing.assert_close(logits(model, IDS), base_out, atol=0, rtol=0)
    torch.testing.assert_close(logits(model, IDS), out_a, atol=0, rtol=0)  # re-enabled on exit
    set_adapter(model, "b")
    torch.testing.assert_close(logits(model, IDS), out_b, atol=0, rtol=0)

    delete_adapter(model, "b")
    assert list_adapters(model) == ["a"]
    with pytest.raises(KeyError):
        set_adapter(model, "b")
    set_adapter(model, "a")
    torch.testing.assert_close(logits(model, IDS), out_a, atol=0, rtol=0)

    after = snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(layer.weight is bases[p] for p, layer in lora_layers(model).items())  # never re-quantized or copied


def _write_adapter(directory: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), {"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("problem", ["r mismatch", "unknown module", "shape mismatch"])
def test_bad_adapters_raise_checkpoint_errors_and_change_nothing(tmp_path, problem):
    original = tiny_model()
    source = copy.deepcopy(original)
    inject_lora(source, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), quant=QuantConfig())
    save_adapter(source, tmp_path / "good")
    tensors = load_file(tmp_path / "good" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    if problem == "r mismatch":
        config["r"] = 8
        expect = "rank 4 but adapter_config.json says r=8"
    elif problem == "unknown module":
        tensors = {k.replace("layers.1.", "layers.9."): v for k, v in tensors.items()}
        expect = "layers.9"
    else:
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        tensors[key] = torch.zeros(4, 32)
        expect = "expects in=32"
    bad = _write_adapter(tmp_path / "bad", tensors, config)

    model = copy.deepcopy(original)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), quant=QuantConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=expect):
        load_adapter(model, bad, name="bad")
    assert list_adapters(model) == ["default"]
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    if problem == "r mismatch":
        with pytest.raises(CheckpointError):
            read_adapter(bad)
    shutil.rmtree(bad)
