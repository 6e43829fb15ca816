"""`qlora-lite quantize` streams: sharded output equal to the one-file output, loadable, memory about one shard."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file, save_file

from conftest import HANG_S, write_tiny_model
from qlora_lite.config import LoraConfig, QuantConfig
from qlora_lite.inject import lora_layers
from qlora_lite.load import checkpoint_files, load_model
from qlora_lite.shards import read_header


def _tensors(directory) -> dict[str, torch.Tensor]:
    return {k: v for file in checkpoint_files(directory) for k, v in load_file(str(file)).items()}


def test_sharded_output_equals_the_one_file_output_and_loads(tmp_path):
    from qlora_lite.quantize import write_quantized

    write_tiny_model(tmp_path / "fp", vocab_size=256, tie_word_embeddings=False, max_shard_size="100KB")
    write_quantized(tmp_path / "fp", tmp_path / "one", blocksize=128, double_quant=False)
    write_quantized(tmp_path / "fp", tmp_path / "many", blocksize=128, double_quant=False, max_shard_size="20KB")
    assert [f.name for f in checkpoint_files(tmp_path / "one")] == ["model.safetensors"]
    shards = checkpoint_files(tmp_path / "many")
    assert len(shards) >= 5 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    for file in shards:  # each ≤ 20 KB of tensors unless one weight's NF4 state alone is larger
        entries = read_header(file).values()
        weights = {e.name.split(".weight")[0] for e in entries}
        assert sum(e.nbytes for e in entries) <= 20_000 or len(weights) == 1, file.name
    one, many = _tensors(tmp_path / "one"), _tensors(tmp_path / "many")
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in many.values())
    config = json.loads((tmp_path / "many" / "config.json").read_text())["quantization_config"]
    assert config["bnb_4bit_use_double_quant"] is False
    quant = QuantConfig(blocksize=128, double_quant=False, backend="torch")
    direct, _ = load_model(tmp_path / "fp", quant, LoraConfig(r=4), device="cpu", with_tokenizer=False)
    pre, _ = load_model(tmp_path / "many", quant, LoraConfig(r=4), device="cpu", with_tokenizer=False)
    for name, layer in lora_layers(direct).items():
        a, b = layer.weight.state_dict(), lora_layers(pre)[name].weight.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


_PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from qlora_lite.nf4 import NF4Weight
    from qlora_lite.quantize import write_quantized
    from qlora_lite.load import build_skeleton
    from qlora_lite.rss import PeakRSS
    from pathlib import Path
    build_skeleton(Path(sys.argv[1]), torch.bfloat16)  # imports the model code before measuring
    NF4Weight.from_tensor(torch.randn(256, 256), 64, True, "torch")  # pages in the kernels, like an import
    with PeakRSS() as rss:
        write_quantized(sys.argv[1], sys.argv[2], max_shard_size="4MB")
    print(json.dumps({"growth": rss.peak - rss.baseline, "exact": rss.exact}))
""")


def test_peak_memory_stays_near_one_output_shard(tmp_path):
    """~170 MB fp32 model (hidden 512, 12 layers) in 7 input shards, NF4 output ~24 MB in 4 MB shards: the
    growth of the kernel's exact peak RSS (VmHWM) in a fresh process stays below the whole NF4 output and
    below one input shard (measured 16 MB); the old one-file writer, holding the quantized model and mapping
    the inputs, grew 189 MB here."""
    from transformers import LlamaConfig

    h, i, layers, vocab = 512, 1408, 12, 1024
    base = tmp_path / "base"
    base.mkdir()
    LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=vocab, tie_word_embeddings=False).save_pretrained(base)
    generator, weight_map = torch.Generator().manual_seed(0), {}
    groups = [{"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}]
    for first in range(0, layers, 2):
        group = {}
        for layer in (first, first + 1):
            p = f"model.layers.{layer}"
            group |= {f"{p}.self_attn.{n}.weight": (h, h) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
            group |= {f"{p}.mlp.gate_proj.weight": (i, h), f"{p}.mlp.up_proj.weight": (i, h),
                      f"{p}.mlp.down_proj.weight": (h, i), f"{p}.input_layernorm.weight": (h,),
                      f"{p}.post_attention_layernorm.weight": (h,)}
        groups.append(group)
    for n, shapes in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: torch.randn(s, generator=generator) * 0.02 for k, s in shapes.items()}, str(base / name),
                  {"format": "pt"})
        weight_map |= dict.fromkeys(shapes, name)
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    largest_input = max(f.stat().st_size for f in base.glob("*.safetensors"))

    run = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(base), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=HANG_S)
    assert run.returncode == 0, run.stderr[-3000:]
    stats = json.loads(run.stdout.strip().splitlines()[-1])
    outputs = list((tmp_path / "out").glob("*.safetensors"))
    output_bytes = sum(f.stat().st_size for f in outputs)
    print(f"\nquantize: {len(groups)} input shards (largest {largest_input / 1e6:.0f} MB) -> {len(outputs)} NF4 "
          f"shards, {output_bytes / 1e6:.1f} MB; peak RSS growth {stats['growth'] / 1e6:.1f} MB")
    assert stats["exact"], "the kernel's peak RSS (VmHWM) could not be read"
    assert len(outputs) >= 4
    assert stats["growth"] < output_bytes and stats["growth"] < largest_input
