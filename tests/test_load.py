"""Streaming load: architectures, pre-quantized checkpoints, host memory, real model, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from qlora_lite.config import LoraConfig, QuantConfig
from qlora_lite.errors import CheckpointError, ConfigError
from qlora_lite.inject import lora_layers
from qlora_lite.load import load_model
from qlora_lite.nf4 import NF4Weight
from conftest import HANG_S, TINY

TINY_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
}


def _tiny(arch: str, directory, tie=False, max_shard_size="2GB"):
    import transformers

    config_cls, model_cls, extra = TINY_ARCHS[arch]
    config = getattr(transformers, config_cls)(**(TINY | {"vocab_size": 256, "tie_word_embeddings": tie} | extra))
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    model.save_pretrained(str(directory), max_shard_size=max_shard_size)
    return model


def _dequantized_reference(model, loaded):
    """The 16-bit model with every NF4 linear replaced by its dequantized weight."""
    reference = type(model)(model.config).eval()
    reference.load_state_dict(model.state_dict())
    for name, layer in lora_layers(loaded).items():
        reference.get_submodule(name).weight.data = layer.weight.dequantize(torch.float32)
    return reference


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_architectures_load_by_construction(arch, tmp_path):
    model = _tiny(arch, tmp_path, tie=arch == "gemma")
    loaded, _ = load_model(tmp_path, QuantConfig(backend="torch"), LoraConfig(r=4), device="cpu",
                           compute_dtype="float32", with_tokenizer=False)
    layers = lora_layers(loaded)
    assert layers and all(l.quantized for l in layers.values())
    assert isinstance(loaded.lm_head, torch.nn.Linear)  # the head stays 16-bit
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ours = loaded(ids).logits
        ref = _dequantized_reference(model, loaded)(ids).logits
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_sharded_checkpoint_and_tied_embeddings(tmp_path):
    _tiny("llama", tmp_path, tie=True, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    loaded, _ = load_model(tmp_path, QuantConfig(backend="torch"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                           device="cpu", compute_dtype="float32", with_tokenizer=False)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    adapted = [n for n, l in lora_layers(loaded).items() if l.adapters]
    assert adapted and all(n.endswith(("q_proj", "v_proj")) for n in adapted)
    assert len(lora_layers(loaded)) == 14  # all linears are NF4, adapters only on the targets


def test_transformers_bitsandbytes_checkpoint_loads_without_requantizing(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _tiny("llama", tmp_path / "fp")
    bnb_model = AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "fp"), device_map="cpu", dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    bnb_model.save_pretrained(str(tmp_path / "bnb"))
    from safetensors.torch import load_file

    written = load_file(str(tmp_path / "bnb" / "model.safetensors"))
    loaded, _ = load_model(tmp_path / "bnb", QuantConfig(), LoraConfig(r=4), device="cpu", compute_dtype="float32",
                           with_tokenizer=False)
    import bitsandbytes.functional as bnbf
    from bitsandbytes.functional import QuantState

    for name, layer in lora_layers(loaded).items():
        prefix = f"{name}.weight"
        ours = layer.weight.state_dict(prefix=prefix + ".")
        assert all(torch.equal(ours[k], written[k]) for k in ours), name  # re-serializes to identical bytes
        theirs = {k[len(prefix) + 1:]: v for k, v in written.items() if k.startswith(prefix + ".")}
        state = QuantState.from_dict(theirs, device=torch.device("cpu"))
        torch.testing.assert_close(layer.weight.dequantize(torch.float32),
                                   bnbf.dequantize_4bit(written[prefix], state).float(), atol=0, rtol=0)
    ids = torch.randint(0, 256, (2, 10))
    bnb_model.train()  # eval()+no-grad would make bitsandbytes repack its CPU weights (see design.md)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, bnb_model(ids).logits, atol=2e-3, rtol=2e-3)


def test_quantize_command_output_loads_to_the_same_bytes(tmp_path):
    from qlora_lite.quantize import write_quantized

    _tiny("llama", tmp_path / "fp")
    write_quantized(tmp_path / "fp", tmp_path / "nf4")
    direct, _ = load_model(tmp_path / "fp", QuantConfig(backend="torch"), LoraConfig(r=4), device="cpu",
                           with_tokenizer=False)
    pre, _ = load_model(tmp_path / "nf4", QuantConfig(backend="torch"), LoraConfig(r=4), device="cpu",
                        with_tokenizer=False)
    for name, layer in lora_layers(direct).items():
        a, b = layer.weight.state_dict(), lora_layers(pre)[name].weight.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_streaming_load_peak_memory_stays_near_one_shard(tmp_path):
    """A ~300 MB fp32 checkpoint in 3 shards: RSS growth while loading (the kernel's exact peak, VmHWM, in a
    fresh process) stays < 2x the largest shard."""
    import transformers

    config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                                      num_attention_heads=16, num_key_value_heads=16, vocab_size=8192)
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    from safetensors.torch import save_file

    shards, shard, size, index = [], {}, 0, {}
    for name, param in skeleton.state_dict().items():
        shard[name] = torch.randn(param.shape) * 0.02 if param.dim() > 1 else torch.ones(param.shape)
        size += shard[name].numel() * 4
        if size > 95e6:
            shards.append(shard)
            shard, size = {}, 0
    shards.append(shard)
    total = 0
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(tmp_path / fname))
        index.update({k: fname for k in tensors})
        total += sum(t.numel() * 4 for t in tensors.values())
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                       "weight_map": index}))
    config.save_pretrained(str(tmp_path))
    largest = max(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    del shards, shard, skeleton
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        import transformers, accelerate, safetensors
        from qlora_lite.load import load_model, build_skeleton
        from qlora_lite.config import QuantConfig, LoraConfig
        from qlora_lite.rss import PeakRSS
        from pathlib import Path
        build_skeleton(Path({str(tmp_path)!r}), torch.bfloat16)  # imports the model code before measuring
        with PeakRSS() as rss:
            model, _ = load_model({str(tmp_path)!r}, QuantConfig(backend="torch"), LoraConfig(r=8), device="cpu",
                                  compute_dtype="bfloat16", with_tokenizer=False)
        assert rss.exact, "the kernel's peak RSS (VmHWM) could not be read"
        print(rss.peak - rss.baseline)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 0, out.stderr[-2000:]
    growth = int(out.stdout.strip().splitlines()[-1])
    print(f"checkpoint {total / 1e6:.0f} MB, largest shard {largest / 1e6:.0f} MB, RSS growth {growth / 1e6:.0f} MB")
    assert growth < 2 * largest


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "nope", with_tokenizer=False)
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(tmp_path, with_tokenizer=False)
    _tiny("llama", tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "weights.bak")
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(tmp_path / "m", with_tokenizer=False)
    (tmp_path / "m" / "weights.bak").rename(tmp_path / "m" / "model.safetensors")
    # a config that contradicts the tensors
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(CheckpointError, match="config.json implies"):
        load_model(tmp_path / "m", with_tokenizer=False)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    # a truncated file
    data = (tmp_path / "m" / "model.safetensors").read_bytes()
    (tmp_path / "m" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        load_model(tmp_path / "m", with_tokenizer=False)
    (tmp_path / "m" / "model.safetensors").write_bytes(data)
    with pytest.raises(ConfigError, match="linear layers are named"):
        load_model(tmp_path / "m", QuantConfig(), LoraConfig(target_modules=["qkv_proj"]), with_tokenizer=False)
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_model(tmp_path / "m")


@pytest.fixture(scope="module")
def real_losses(embedded_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_dir))
    ids = tokenizer(PARAGRAPH, return_tensors="pt")["input_ids"]
    out = {}
    for label, quant in (("nf4", QuantConfig()), ("16bit", None)):
        model, _ = load_model(embedded_dir, quant, LoraConfig(r=8) if quant is None else None, device="cpu",
                              compute_dtype="float32", with_tokenizer=False)
        with torch.no_grad():
            out[label] = model(input_ids=ids, labels=ids).loss.item()
        del model
    return out


PARAGRAPH = ("The printing press changed how knowledge moved through Europe. Before it, books were copied by "
             "hand, which made them rare and expensive. Within a few decades of its invention, printers in many "
             "cities were producing pamphlets, bibles and scientific works, and ideas could travel faster than "
             "ever before.")


def test_real_model_quantization_costs_under_5_percent_loss(real_losses):
    print(real_losses)
    assert real_losses["nf4"] == pytest.approx(real_losses["16bit"], rel=0.05)
    assert real_losses["nf4"] != real_losses["16bit"]  # the NF4 path really ran


@pytest.mark.parametrize("double_quant", [True, False])
def test_skeleton_has_the_loaded_models_names_shapes_and_buffers(tiny_model_dir, double_quant):
    """What FSDP's rank-0 broadcast relies on: the meta skeleton other processes build matches the
    loaded model tensor for tensor (NF4 storage included) and reads no weights."""
    from qlora_lite.load import load_skeleton

    quant, lora = QuantConfig(backend="torch", double_quant=double_quant), LoraConfig(r=4, target_modules="all-linear")
    loaded, _ = load_model(tiny_model_dir, quant, lora, device="cpu", compute_dtype=torch.float32)
    skeleton, tokenizer = load_skeleton(tiny_model_dir, quant, lora, device="cpu", compute_dtype=torch.float32)
    assert tokenizer is not None

    def registered(model):
        return {**dict(model.named_parameters()), **dict(model.named_buffers())}

    want, got = registered(loaded), registered(skeleton)
    assert list(got) == list(want) and any(k.endswith(".weight.packed") for k in got)
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in want.items()}
    assert list(skeleton.state_dict()) == list(loaded.state_dict())  # bitsandbytes' keys on both
    assert all(p.is_meta for p in skeleton.parameters())
    for name, buffer in loaded.named_buffers():  # computed at init (rotary frequencies), not loaded
        if not name.endswith("offset_raw"):
            torch.testing.assert_close(dict(skeleton.named_buffers())[name], buffer, atol=0, rtol=0)
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight  # tied as in the loaded model
    assert not any(p.requires_grad for n, p in skeleton.named_parameters() if "lora_" not in n)


def test_nf4_empty_has_the_shapes_from_tensor_makes():
    for shape in [(6, 7), (64, 64), (3, 100), (300, 1000)]:
        for double_quant in (True, False):
            made = NF4Weight.from_tensor(torch.randn(shape), 64, double_quant, "torch")
            empty = NF4Weight.empty(shape, torch.float32, 64, double_quant, "torch")
            for got, want in [(empty.packed, made.packed), (empty.absmax, made.absmax),
                              (empty.nested_absmax, made.nested_absmax), (empty.offset, made.offset)]:
                assert (got is None and want is None) or (got.shape, got.dtype) == (want.shape, want.dtype)
