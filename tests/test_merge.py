"""Streaming merge: algebra, export format, real-model agreement, crash safety, validation, memory.

Tolerances stated here:
- single layer, fp32: merged-weight forward == LoRALinear4bit forward within atol=rtol=1e-5
  (same weight, different summation order); the merged fp32 weight equals merged_weight() bit for bit.
- single layer, fp16 output: |Δy| <= 2^-11·(|x|·|W|ᵀ) + 1e-5, the bound one fp16 rounding of W allows.
- tiny model: fp32 merge, logits within atol=1e-5 of the adapter model on the quantized base;
  fp16 merge within atol=2e-3, bf16 within 2e-2 (logits of this random model are ~0.1-1).
- embedded SmolLM2-135M, fp16 merge: top-1 agreement >= 99.9% over ~1000 tokens of fixed text, max |Δlogit| < 0.5.
- peak RSS of a streaming merge of a ~340 MB, 4-shard checkpoint: < 2x the largest input shard and < 0.4x the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qlora_lite import merge as merge_mod
from qlora_lite.adapter import save_adapter
from qlora_lite.config import LoraConfig, QuantConfig
from qlora_lite.errors import CheckpointError, QLoraLiteError
from qlora_lite.fsutil import OutputExistsError
from qlora_lite.inject import inject_lora, lora_layers
from qlora_lite.layers import LoRALinear4bit
from qlora_lite.load import load_model
from qlora_lite.merge import (MergeError, MergeOverflowError, VerificationError, merge, merge_adapter, merge_weight,
                              unmerge_adapter)
from qlora_lite.verify import top1_flips, verify_merge
from qlora_lite.nf4 import NF4Weight
from conftest import HANG_S, tiny_llama_config

TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny_model(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**({"tie_word_embeddings": False} | overrides))).eval()


def adapter_model(base_dir: Path, adapter_dir: Path, seed: int = 1, std: float = 0.05, targets=TARGETS):
    """The adapter model as training has it (NF4 base, every linear quantized), B non-zero; saved in PEFT format."""
    model, _ = load_model(base_dir, QuantConfig(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                              target_modules=targets),
                          device="cpu", compute_dtype=torch.float32, with_tokenizer=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for b in layer.lora_B.values():
                b.copy_(torch.randn(b.shape, generator=generator) * std)
    save_adapter(model, adapter_dir)
    return model


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # conftest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 5-shard tiny Llama checkpoint (fp32) and an adapter on q/v/down with random B."""
    root = tmp_path_factory.mktemp("tiny")
    tiny_model().save_pretrained(root / "base", max_shard_size="100KB")
    model = adapter_model(root / "base", root / "adapter")
    return root / "base", root / "adapter", model


def read_dir(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def digest(directory: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(directory.iterdir())}


def load_clean(path: Path, caplog, dtype=torch.float32):
    """from_pretrained, asserting transformers reports no missing/unexpected keys and logs no warning."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING, logger="transformers"):
            caplog.clear()
            model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
    finally:
        transformers.utils.logging.disable_propagation()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not [r for r in caplog.records if r.name.startswith("transformers") and r.levelno >= logging.WARNING]
    return model.eval()


# ---- algebra ---------------------------------------------------------------------------------------

def test_single_layer_merge_algebra():
    torch.manual_seed(0)
    w0 = (torch.randn(96, 128) * 0.05).to(torch.bfloat16)
    bias = torch.randn(96) * 0.1
    layer = LoRALinear4bit(NF4Weight.from_tensor(w0, backend="torch"), bias, r=8, lora_alpha=16)
    with torch.no_grad():
        layer.lora_B["default"].normal_(0, 0.1)
    x = torch.randn(4, 7, 128)

    w = merge_weight(w0, layer.delta_weight())
    assert torch.equal(w, layer.merged_weight())  # what training computed with, bit for bit
    y = layer(x)
    torch.testing.assert_close(torch.nn.functional.linear(x, w, bias), y, atol=1e-5, rtol=1e-5)

    w16 = w.half()
    y16 = torch.nn.functional.linear(x, w16.float(), bias)
    bound = 2.0 ** -11 * (x.abs() @ w.abs().t()) + 1e-5
    assert bool(((y16 - y).abs() <= bound).all()), ((y16 - y).abs() - bound).max()

    original = merge_weight(w0, layer.delta_weight(), base="original")
    assert torch.equal(original, w0.float() + layer.delta_weight())


# ---- the export format and agreement with the adapter model --------------------------------------

@pytest.mark.parametrize("dtype, atol, top1",
                         [("float32", 1e-5, 1.0), ("float16", 2e-3, 1.0), ("bfloat16", 2e-2, 0.98)])
def test_tiny_merge_loads_cleanly_and_matches_adapter_model(tiny, tmp_path, caplog, dtype, atol, top1):
    base_dir, adapter_dir, model = tiny
    limit = 40_000
    report = merge(base_dir, adapter_dir, tmp_path / "out", dtype=dtype, max_shard_size=limit, progress=False,
                   verify=True)
    assert report.verification["top1_agreement"] >= top1 and report.verification["positions"] == 5 * 48
    out = tmp_path / "out"
    shards = sorted(out.glob("model-*.safetensors"))
    assert report.shards == len(shards) > 2 and report.merged_modules == 6 and report.dequantized_tensors == 8
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    tensors = read_dir(out)
    assert index["metadata"]["total_size"] == report.bytes_written == sum(t.numel() * t.element_size()
                                                                           for t in tensors.values())
    for shard in shards:
        with safe_open(str(shard), "pt") as handle:
            sizes = [handle.get_slice(k).get_shape() for k in handle.keys()]
        data = sum(math.prod(s) for s in sizes) * torch.tensor([], dtype=getattr(torch, dtype)).element_size()
        assert data <= limit or len(sizes) == 1
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == dtype and "quantization_config" not in config
    # older converters (llama.cpp early 2025) read the top-level key; load_clean below shows transformers accepts it
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] and "rope_scaling" not in config
    assert (out / "generation_config.json").is_file()

    # the merged weights are exactly what the adapter model computes with, rounded once
    for path, layer in lora_layers(model).items():
        want = layer.merged_weight() if layer.active_adapter else layer.weight.dequantize(torch.float32)
        assert torch.equal(tensors[f"{path}.weight"], want.to(getattr(torch, dtype))), path

    merged = load_clean(out, caplog)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits, atol=atol, rtol=0)
        if dtype == "bfloat16":
            merged_bf16 = load_clean(out, caplog, dtype=torch.bfloat16)
            assert merged_bf16.model.norm.weight.dtype == torch.bfloat16


def test_legacy_rope_keys_mirror_rope_parameters():
    from qlora_lite.merge import _legacy_rope_keys

    yarn = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768}
    assert _legacy_rope_keys({"rope_parameters": yarn}) == {
        "rope_theta": 1e6, "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    assert _legacy_rope_keys({"rope_parameters": {"rope_type": "default", "rope_theta": 1e5}}) == {"rope_theta": 1e5}
    assert _legacy_rope_keys({"rope_parameters": {"rope_theta": 1e5}, "rope_theta": 1e5}) == {}
    assert _legacy_rope_keys({"rope_theta": 1e4}) == {}


def test_base_original_is_w0_plus_sba(tiny, tmp_path):
    base_dir, adapter_dir, model = tiny
    report = merge(base_dir, adapter_dir, tmp_path / "out", dtype="float32", base="original", progress=False)
    assert report.dequantized_tensors == 0 and report.shards == 1
    merged, base = read_dir(tmp_path / "out"), read_dir(base_dir)
    assert set(merged) == set(base)
    for key, w0 in base.items():
        module = key.removesuffix(".weight")
        layer = lora_layers(model).get(module)
        if layer is not None and layer.active_adapter:
            assert torch.equal(merged[key], w0.float() + layer.delta_weight()), key
        else:
            assert torch.equal(merged[key], w0), key
    verify_merge(tmp_path / "out", base_dir, adapter_dir, base="original", max_abs_logit_diff=1e-4)
    with pytest.raises(VerificationError):  # the quantized base is a different model
        verify_merge(tmp_path / "out", base_dir, adapter_dir, base="quantized", max_abs_logit_diff=1e-4)


def test_prequantized_bnb_base(tiny, tmp_path, caplog):
    """A bnb-4bit checkpoint (uint8 weight + quant-state keys): dequantized, merged, quant keys dropped."""
    base_dir, adapter_dir, _ = tiny
    state, bnb = read_dir(base_dir), tmp_path / "bnb"
    bnb.mkdir()
    packed = {}
    for key, tensor in state.items():
        if key.endswith("_proj.weight"):
            packed.update(NF4Weight.from_tensor(tensor, backend="torch").state_dict(prefix=f"{key}."))
        else:
            packed[key] = tensor
    keys = sorted(packed)
    save_file({k: packed[k] for k in keys[:40]}, str(bnb / "model-00001-of-00002.safetensors"), {"format": "pt"})
    save_file({k: packed[k] for k in keys[40:]}, str(bnb / "model-00002-of-00002.safetensors"), {"format": "pt"})
    (bnb / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f"model-0000{1 + (i >= 40)}-of-00002.safetensors"
                                        for i, k in enumerate(keys)}}))
    config = json.loads((base_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    (bnb / "config.json").write_text(json.dumps(config))

    report = merge(bnb, adapter_dir, tmp_path / "out", dtype="float32", progress=False)
    assert report.merged_modules == 6 and report.dequantized_tensors == 8
    from_bnb = read_dir(tmp_path / "out")
    merge(base_dir, adapter_dir, tmp_path / "ref", dtype="float32", progress=False)
    reference = read_dir(tmp_path / "ref")
    assert set(from_bnb) == set(reference)  # no .absmax / .quant_state keys left
    for key in reference:
        torch.testing.assert_close(from_bnb[key], reference[key].to(from_bnb[key].dtype), atol=0, rtol=0)
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    load_clean(tmp_path / "out", caplog)
    with pytest.raises(QLoraLiteError, match="base='quantized'"):
        merge(bnb, adapter_dir, tmp_path / "orig", base="original", progress=False)


def test_merge_equals_peft_merge_and_unload_on_the_dequantized_base(tiny, tmp_path):
    """Cross-check with PEFT: on the same (dequantized NF4) base, PEFT's fp32 merge gives the same weights."""
    peft = pytest.importorskip("peft")
    base_dir, adapter_dir, model = tiny
    merge(base_dir, adapter_dir, tmp_path / "out", dtype="float32", progress=False)
    base = tiny_model()
    for path, layer in lora_layers(model).items():
        base.get_submodule(path).weight.data = layer.weight.dequantize(torch.float32).clone()
    merged_by_peft = peft.PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    ours = read_dir(tmp_path / "out")
    for key, value in merged_by_peft.state_dict().items():
        torch.testing.assert_close(ours[key], value, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_embedded_model_fp16_merge_agrees_with_adapter_model(embedded_dir, tmp_path, caplog):
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    generator, tensors, r = torch.Generator().manual_seed(0), {}, 8
    with safe_open(str(embedded_dir / "model.safetensors"), "pt") as handle:
        for key in handle.keys():
            if key.endswith("_proj.weight"):
                out_f, in_f = handle.get_slice(key).get_shape()
                module = f"base_model.model.{key.removesuffix('.weight')}"
                bound = 1 / math.sqrt(in_f)
                tensors[f"{module}.lora_A.weight"] = (torch.rand(r, in_f, generator=generator) * 2 - 1) * bound
                tensors[f"{module}.lora_B.weight"] = torch.randn(out_f, r, generator=generator) * 1e-3
    save_file(tensors, str(adapter_dir / "adapter_model.safetensors"), {"format": "pt"})
    (adapter_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}))

    report = merge(embedded_dir, adapter_dir, tmp_path / "out", dtype="float16", progress=False)
    result = verify_merge(tmp_path / "out", embedded_dir, adapter_dir, min_top1_agreement=0.999,
                          max_abs_logit_diff=0.5)  # DEFAULT_PROMPTS: ~1000 tokens of fixed English text and code
    print(f"\nembedded fp16 merge: {report.summary()}\n  verification: {result}")
    assert report.merged_modules == 210 and result["positions"] >= 1000
    assert result["top1_agreement_up_to_ties"] >= 0.999 and result["top1_agreement"] >= 0.99
    out = tmp_path / "out"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).is_file(), name
    template = (out / "chat_template.jinja").read_text()
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template
    assert "chat_template" not in json.loads((embedded_dir / "tokenizer_config.json").read_text())
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert "lm_head.weight" not in handle.keys()  # tied: stored once, as in the base
        assert handle.get_slice("model.norm.weight").get_dtype() == "F16"
    merged = load_clean(out, caplog, dtype=torch.float16)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()


# ---- crash safety and validation ---------------------------------------------------------------------

@pytest.mark.parametrize("existing", [False, True])
def test_crash_mid_merge_leaves_no_output(tiny, tmp_path, monkeypatch, existing):
    base_dir, adapter_dir, _ = tiny
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("previous result")
    before = digest(base_dir), digest(adapter_dir)
    real, calls = merge_mod._merge_input_shard, []

    def crash_after_first_shard(*args, **kwargs):
        if calls:
            raise RuntimeError("simulated crash")
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_mod, "_merge_input_shard", crash_after_first_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        merge(base_dir, adapter_dir, out, overwrite=existing, progress=False)
    assert calls
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])
    if existing:
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (digest(base_dir), digest(adapter_dir)) == before


def test_failed_verification_publishes_nothing(tiny, tmp_path, monkeypatch):
    base_dir, adapter_dir, _ = tiny

    def reject(*args, **kwargs):
        raise VerificationError("simulated disagreement")

    monkeypatch.setattr(merge_mod, "verify_merge", reject)
    with pytest.raises(VerificationError):
        merge(base_dir, adapter_dir, tmp_path / "out", verify=True, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused(tiny, tmp_path):
    base_dir, adapter_dir, _ = tiny
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        merge(base_dir, adapter_dir, tmp_path / "out", progress=False)
    with pytest.raises(QLoraLiteError, match="inputs"):
        merge(base_dir, adapter_dir, base_dir, overwrite=True, progress=False)


def test_fp16_overflow_names_the_tensor(tiny, tmp_path):
    base_dir, adapter_dir, _ = tiny
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    tensors[key] = torch.full_like(tensors[key], 1e6)
    bad = tmp_path / "adapter"
    bad.mkdir()
    save_file(tensors, str(bad / "adapter_model.safetensors"), {"format": "pt"})
    (bad / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    with pytest.raises(MergeOverflowError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*bfloat16"):
        merge(base_dir, bad, tmp_path / "out", dtype="float16", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert merge(base_dir, bad, tmp_path / "out", dtype="bfloat16", progress=False).merged_modules == 6


def _break(kind: str, base_dir: Path, adapter_dir: Path, root: Path) -> tuple[Path, Path, str]:
    """A broken copy of the inputs and the text the error must contain."""
    import shutil

    base, adapter = root / "base", root / "adapter"
    shutil.copytree(base_dir, base)
    shutil.copytree(adapter_dir, adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    if kind == "wrong shapes":
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        tensors[key] = torch.randn(4, 32)
        expect = "q_proj: adapter is out=64 x in=32"
    elif kind == "unknown module":
        tensors = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
        expect = "layers.7"
    elif kind == "missing shard":
        (base / "model-00002-of-00005.safetensors").unlink()
        expect = "model-00002-of-00005.safetensors"
    else:  # corrupt header
        shard = base / "model-00003-of-00005.safetensors"
        data = bytearray(shard.read_bytes())
        data[8:24] = b"\x00garbage{{{{{{{{"
        shard.write_bytes(bytes(data))
        expect = "model-00003-of-00005.safetensors"
    save_file(tensors, str(adapter / "adapter_model.safetensors"), {"format": "pt"})
    return base, adapter, expect


@pytest.mark.parametrize("kind", ["wrong shapes", "unknown module", "missing shard", "corrupt header"])
def test_bad_inputs_raise_before_anything_is_written(tiny, tmp_path, kind):
    base, adapter, expect = _break(kind, tiny[0], tiny[1], tmp_path / "inputs")
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    with pytest.raises(CheckpointError) as info:
        merge(base, adapter, out_parent / "merged", progress=False)
    assert expect in str(info.value)
    assert list(out_parent.iterdir()) == []  # not even a temp dir


def test_top1_flips_forgive_ties_only():
    want = torch.tensor([[[5.0, 4.99, 0.0], [5.0, 3.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 9.0]]])
    got = torch.tensor([[[4.9, 5.0, 0.0], [3.0, 5.0, 0.0], [1.0, 2.0, 0.0], [9.0, 0.0, 0.0]]])
    assert top1_flips(got, want, tie_margin=0.1) == (3, 2)  # the 0.01 tie is forgiven, gaps of 2 and 9 are not
    assert top1_flips(got, want, tie_margin=2.0) == (3, 1)
    assert top1_flips(want, want, tie_margin=0.0) == (0, 0)


def test_verify_detects_a_wrong_adapter(tiny, tmp_path):
    base_dir, adapter_dir, _ = tiny
    merge(base_dir, adapter_dir, tmp_path / "out", dtype="float32", progress=False)
    adapter_model(base_dir, tmp_path / "other", seed=7, std=0.5)
    with pytest.raises(VerificationError, match="top-1 agreement"):
        verify_merge(tmp_path / "out", base_dir, tmp_path / "other")


# ---- in-memory merge ----------------------------------------------------------------------------------

def test_in_memory_merge_and_unmerge_on_16bit_base():
    model = tiny_model()
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS), quant=None)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].normal_(0, 0.05)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert len(merge_adapter(model)) == 6
        assert all(layer.active_adapter is None for layer in lora_layers(model).values())
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-5, rtol=0)
        assert len(unmerge_adapter(model)) == 6
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-5, rtol=0)


def test_in_memory_merge_refuses_nf4_bases():
    model = tiny_model()
    inject_lora(model, LoraConfig(r=4, target_modules=TARGETS), quant=QuantConfig(backend="torch"))
    before = {p: (l.weight, l.active_adapter) for p, l in lora_layers(model).items()}
    with pytest.raises(MergeError, match=r"4-bit.*rounds.*merge\("):
        merge_adapter(model)
    assert {p: (l.weight, l.active_adapter) for p, l in lora_layers(model).items()} == before  # untouched


# ---- memory ---------------------------------------------------------------------------------------------

_RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    import psutil, torch
    torch.set_num_threads(1)
    import accelerate, safetensors
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # the modeling code merge's planner imports
    from qlora_lite.merge import _cast_checked, merge, merge_weight
    from qlora_lite.rss import PeakRSS
    # warm-up: first use of each kernel pages in ~25 MB of libtorch code, a one-off like an import
    _cast_checked("warm-up", merge_weight(torch.randn(256, 256), torch.zeros(256, 256)), torch.float16, True)
    with PeakRSS() as rss:
        report = merge(sys.argv[1], sys.argv[2], sys.argv[3], dtype="float16", progress=False)
    print(json.dumps({"baseline": rss.baseline, "peak": rss.peak, "exact": rss.exact, "seconds": report.seconds,
                      "written": report.bytes_written}))
""")


def test_peak_rss_of_streaming_merge_stays_near_one_shard(tmp_path):
    """~340 MB fp32 checkpoint in 4 shards (hidden 1024, 6 layers); measured in a fresh process by the kernel's
    exact peak (VmHWM), growth over the RSS after imports and a kernel warm-up."""
    from transformers import LlamaConfig

    layers = 6
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=4096, tie_word_embeddings=False)
    base = tmp_path / "base"
    base.mkdir()
    config.save_pretrained(base)
    h, i, generator = 1024, 2816, torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (4096, h), "model.norm.weight": (h,), "lm_head.weight": (4096, h)}
    for layer in range(layers):
        p = f"model.layers.{layer}"
        shapes |= {f"{p}.self_attn.{n}.weight": (h, h) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        shapes |= {f"{p}.mlp.gate_proj.weight": (i, h), f"{p}.mlp.up_proj.weight": (i, h),
                   f"{p}.mlp.down_proj.weight": (h, i), f"{p}.input_layernorm.weight": (h,),
                   f"{p}.post_attention_layernorm.weight": (h,)}
    groups = [["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]]
    groups += [[k for k in shapes if k.startswith((f"model.layers.{i}.", f"model.layers.{i + 1}."))]
               for i in range(0, layers, 2)]  # two layers per shard
    weight_map = {}
    for n, keys in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: torch.randn(shapes[k], generator=generator) * 0.02 for k in keys}, str(base / name),
                  {"format": "pt"})
        weight_map |= dict.fromkeys(keys, name)
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    largest = max(f.stat().st_size for f in base.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in base.glob("*.safetensors"))

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    tensors = {}
    for key, shape in shapes.items():
        if key.endswith("_proj.weight"):
            module = f"base_model.model.{key.removesuffix('.weight')}"
            tensors[f"{module}.lora_A.weight"] = torch.randn(8, shape[1], generator=generator) * 0.01
            tensors[f"{module}.lora_B.weight"] = torch.randn(shape[0], 8, generator=generator) * 0.01
    save_file(tensors, str(adapter / "adapter_model.safetensors"), {"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                             "target_modules": ["q_proj", "v_proj", "down_proj"]}))

    run = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(base), str(adapter), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=HANG_S)
    assert run.returncode == 0, run.stderr[-3000:]
    stats = json.loads(run.stdout.strip().splitlines()[-1])
    growth = stats["peak"] - stats["baseline"]
    print(f"\nstreaming merge of {total / 1e6:.0f} MB in {len(groups)} shards (largest {largest / 1e6:.0f} MB): "
          f"peak RSS growth {growth / 1e6:.0f} MB, {stats['seconds']:.1f} s, {stats['written'] / 1e6:.0f} MB written")
    assert stats["exact"], "the kernel's peak RSS (VmHWM) could not be read"
    assert len(groups) >= 4 and growth < 2 * largest
    assert growth < 0.4 * total  # far from holding the model (measured 0.15-0.25 of it)
    assert stats["written"] == sum(2 * math.prod(s) for s in shapes.values())  # fp32 -> fp16, every tensor
