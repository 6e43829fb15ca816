"""Every example runs (the CPU ones here); the 7B YAML is a valid run file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from qlora_lite.config import load_yaml_config
from conftest import tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]


def _run(args, **env):
    # no wall-clock limit: on a busy machine an example is slower, not wrong (issue 24)
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_finetune_7b_yaml_is_a_valid_run_file():
    cfg = load_yaml_config(ROOT / "examples" / "finetune_7b.yaml")
    assert cfg.lora.r == 64 and cfg.seq_len == 2048 and cfg.quant.compute_dtype == "bfloat16"


def test_plan_memory_example():
    out = _run(["examples/plan_memory.py"])
    assert "longest sequence at batch 1 on an RTX 4090" in out


def test_merge_export_example(tmp_path):
    from transformers import LlamaForCausalLM

    from qlora_lite.adapter import save_adapter
    from qlora_lite.config import LoraConfig, QuantConfig
    from qlora_lite.inject import inject_lora

    config = tiny_llama_config(tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(tmp_path / "base"))
    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "base"))
    inject_lora(model, LoraConfig(r=4), QuantConfig(backend="torch"))
    save_adapter(model, tmp_path / "adapter")
    out = _run(["examples/merge_export.py", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out")])
    assert "loaded" in out and (tmp_path / "out" / "config.json").is_file()


def test_finetune_demo_example_runs_through_the_api(tmp_path, embedded_dir, monkeypatch, capsys):
    """The example's API calls work; that training lowers the loss and the merge verifies is the demo's
    check (tests/test_demo.py, on the shared demo run), so one step on 4 held-out examples is enough here.
    Run in this process (runpy, the file as it is): a subprocess would import torch and transformers again,
    and the only way to shrink its held-out evaluation (2 x 33 examples, most of its time) is a module constant."""
    import runpy

    from qlora_lite import train as train_module

    monkeypatch.setenv("DEMO_STEPS", "1")
    monkeypatch.setenv("DEMO_OUT", str(tmp_path / "run"))
    monkeypatch.setattr(train_module, "MAX_EVAL_EXAMPLES", 4)
    runpy.run_path(str(ROOT / "examples" / "finetune_demo.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "before:" in out and "after:" in out and "verified" in out
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if "eval_loss" in r] == [0, 1]  # the example's own evaluations ran
