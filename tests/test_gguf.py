"""GGUF export with llama.cpp's converter (scripts/export_gguf.sh), loaded back with transformers.

Runs where the converter is: QLORA_LITE_GGUF_CONVERTER, else .llama.cpp/convert_hf_to_gguf.py
(`scripts/export_gguf.sh --fetch`, which `make test` runs); skips otherwise. The early-2025 converter
(.llama.cpp-0.3.7/, `--fetch 0.3.7`) checks the legacy rope_theta key the merge writes. Tolerances:
- f16: the merged checkpoint is fp16, so the GGUF holds the same numbers: every tensor bit-equal after
  transformers' dequantization, logits equal.
- q8_0 (one scale per 32 weights): mean KL < 1e-4, max |Δlogit| < 0.05, no top-1 flip but between logits
  within 0.05 of each other (measured: KL 1.3e-6, max |Δlogit| 0.011 on logits up to 1.2; 1 of 96
  positions flips, where the top two logits of this random model lie 0.0005 apart).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import HANG_S, ROOT, write_tiny_model
from qlora_lite.adapter import save_adapter
from qlora_lite.config import LoraConfig, QuantConfig
from qlora_lite.inject import lora_layers
from qlora_lite.load import load_model
from qlora_lite.merge import merge
from qlora_lite.verify import top1_flips

CONVERTER = Path(os.environ.get("QLORA_LITE_GGUF_CONVERTER", ROOT / ".llama.cpp" / "convert_hf_to_gguf.py"))
EXPORT = ROOT / "scripts" / "export_gguf.sh"
ROPE_THETA = 100_000.0  # not llama.cpp's fallback of 10,000, so a converter that misses it shows

# llama.cpp's converter as vendored by llama-cpp-python 0.3.7 (llama.cpp 794fe23, early 2025): it reads only
# the top-level rope_theta, the key transformers 5 no longer writes (issue 23)
CONVERTER_2025 = Path(os.environ.get("QLORA_LITE_GGUF_CONVERTER_2025",
                                     ROOT / ".llama.cpp-0.3.7" / "convert_hf_to_gguf.py"))

pytestmark = [pytest.mark.skipif(not CONVERTER.is_file(), reason=f"no llama.cpp converter at {CONVERTER} "
                                 "(scripts/export_gguf.sh --fetch, or set QLORA_LITE_GGUF_CONVERTER)"),
              # meant to keep these in one worker under `pytest -n 2 --dist loadgroup`; pytest 9.2 ignores
              # xdist 3.8's group (Node.nodeid no longer reads the _nodeid xdist rewrites), so a worker may
              # build the session fixture each
              pytest.mark.xdist_group("gguf")]


def export(merged: Path, out: Path, kind: str, converter: Path = CONVERTER) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "QLORA_LITE_GGUF_CONVERTER": str(converter)}
    return subprocess.run(["bash", str(EXPORT), str(merged), str(out), kind], capture_output=True, text=True, env=env,
                          timeout=HANG_S)


@pytest.fixture(scope="session")  # not module: under xdist other modules' tests run between these ones
def merged(tmp_path_factory, embedded_dir):
    """A tiny Llama (SmolLM2's tokenizer, rope_theta 1e5) with an adapter of random B, merged to fp16."""
    root = tmp_path_factory.mktemp("gguf")
    write_tiny_model(root / "base", tokenizer_dir=embedded_dir,
                     rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
    model, _ = load_model(root / "base", QuantConfig(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0),
                          device="cpu", compute_dtype=torch.float32, with_tokenizer=False)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for b in layer.lora_B.values():
                b.copy_(torch.randn(b.shape, generator=generator) * 0.05)
    save_adapter(model, root / "adapter")
    merge(root / "base", root / "adapter", root / "merged", dtype="float16", progress=False)
    return root / "merged"


def load_both(merged: Path, gguf_file: Path):
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                  dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return ours, theirs, ours(input_ids=ids).logits, theirs(input_ids=ids).logits


def gguf_field(gguf_file: Path, key: str):
    import gguf

    field = gguf.GGUFReader(str(gguf_file)).get_field(key)
    return None if field is None else field.contents()


def test_f16_gguf_holds_the_merged_weights_exactly(merged, tmp_path):
    out = tmp_path / "model-f16.gguf"
    proc = export(merged, out, "f16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith(str(out)) and not list(tmp_path.glob("*.partial"))
    assert gguf_field(out, "llama.rope.freq_base") == json.loads((merged / "config.json").read_text())["rope_theta"]
    assert gguf_field(out, "llama.rope.freq_base") == ROPE_THETA
    assert gguf_field(out, "tokenizer.chat_template") == (merged / "chat_template.jinja").read_text()
    ours, theirs, want, got = load_both(merged, out)
    assert theirs.config.rope_parameters["rope_theta"] == ROPE_THETA and theirs.config.tie_word_embeddings
    mine, loaded = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == loaded.keys()
    assert [k for k in mine if not torch.equal(mine[k], loaded[k])] == []
    assert torch.equal(got, want)

    again = export(merged, out, "f16")  # the script's own checks: one line, nothing overwritten
    assert again.returncode == 2
    assert again.stderr.strip() == f"export_gguf: {out} exists; remove it or pass another path"
    missing = export(tmp_path, tmp_path / "x.gguf", "f16")
    assert missing.returncode == 2 and "has no config.json" in missing.stderr


def test_q8_0_gguf_agrees_with_the_merged_checkpoint(merged, tmp_path):
    out = tmp_path / "model-q8_0.gguf"
    proc = export(merged, out, "q8_0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert gguf_field(out, "llama.rope.freq_base") == ROPE_THETA
    _, _, want, got = load_both(merged, out)
    assert not torch.equal(got, want)  # really quantized
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    assert kl < 1e-4 and (got - want).abs().max() < 0.05, kl
    flips, decisive = top1_flips(got, want, tie_margin=0.05)  # a flip between near-equal logits is rounding
    assert decisive == 0 and flips <= 2, flips


@pytest.mark.skipif(not CONVERTER_2025.is_file(), reason=f"no early-2025 converter at {CONVERTER_2025} "
                    "(scripts/export_gguf.sh --fetch 0.3.7, or set QLORA_LITE_GGUF_CONVERTER_2025)")
def test_an_early_2025_converter_reads_the_rope_base_from_the_legacy_key(merged, tmp_path):
    out = tmp_path / "model-2025.gguf"
    proc = export(merged, out, "f16", converter=CONVERTER_2025)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert gguf_field(out, "llama.rope.freq_base") == ROPE_THETA
    _, _, want, got = load_both(merged, out)
    assert torch.equal(got, want)
    # without the legacy key (transformers 5's config.json alone) it writes no base: llama.cpp assumes 10,000
    bare = tmp_path / "bare"
    bare.mkdir()
    for file in merged.iterdir():
        (bare / file.name).symlink_to(file)
    config = json.loads((merged / "config.json").read_text())
    del config["rope_theta"]
    (bare / "config.json").unlink()
    (bare / "config.json").write_text(json.dumps(config))
    proc = export(bare, tmp_path / "bare.gguf", "f16", converter=CONVERTER_2025)
    assert proc.returncode == 0 and gguf_field(tmp_path / "bare.gguf", "llama.rope.freq_base") is None
