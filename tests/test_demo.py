"""`qlora-lite demo` end to end on the embedded model, in a subprocess, as a user runs it (the `demo_run`
fixture in conftest.py: one run for the whole session)."""

from __future__ import annotations

import json
import re


def test_demo_writes_adapter_merged_checkpoint_plots_and_summary(demo_run):
    out, proc = demo_run
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    for png in ("loss_curve.png", "memory.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert str(out) in proc.stderr  # it names where everything went


def test_demo_summary_shows_learning(demo_run):
    out, _ = demo_run
    summary = (out / "summary.md").read_text()
    before, after = map(float, re.search(r"held-out loss: \*\*([\d.]+) → ([\d.]+)\*\*", summary).groups())
    assert after < before
    assert "Captain Quill" in summary.split("## Export")[0].split("after:")[-1] or "Ahoy" in summary


def test_demo_merged_checkpoint_loads_in_transformers(demo_run):
    import torch
    from transformers import AutoModelForCausalLM

    out, _ = demo_run
    model, info = AutoModelForCausalLM.from_pretrained(str(out / "merged"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert json.loads((out / "merged" / "config.json").read_text())["dtype"] == "float16"
    assert "quantization_config" not in json.loads((out / "merged" / "config.json").read_text())
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
