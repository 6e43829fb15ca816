"""The demo end to end on the embedded model, in a subprocess, at 4 steps (the `demo_run`
fixture in conftest.py: one run for the whole session)."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from qlora_lite import threads
from qlora_lite.threads import pick_threads
from conftest import DEMO_TEST


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
    answers = summary.split("## Answers")[1].split("## Export")[0]
    befores = re.findall(r"- before: (.*)", answers)
    afters = re.findall(r"- after: +(.*)", answers)
    assert len(befores) == len(afters) == 2
    assert all("Ahoy" in a for a in afters) and not any("Ahoy" in b for b in befores)  # Captain Quill's style


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


def test_demo_summary_times_every_phase(demo_run):
    out, _ = demo_run
    table = (out / "summary.md").read_text().split("## Time")[1]
    for phase in ("load", "answers before", f"training steps ({DEMO_TEST['steps']})", "held-out evaluation",
                  "answers after", "| merge |", "verify", "report", "| total |"):
        assert phase in table
    seconds = [float(row.split("|")[2]) for row in table.splitlines() if row.startswith("| ") and "phase" not in row]
    assert all(s >= 0 for s in seconds) and abs(sum(seconds[:-1]) - seconds[-1]) <= 0.1 * len(seconds)


def test_cli_demo_hands_its_options_to_run_demo(monkeypatch, tmp_path):
    """`qlora-lite demo`'s part; the demo itself runs once for the session (`demo_run`, through run_demo)."""
    from qlora_lite import cli, demo

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda *args: seen.append(args))
    cli.main(["demo", "--out", str(tmp_path / "run"), "--steps", "3", "--seq_len", "64", "--batch_size", "2",
              "--learning_rate", "0.002", "--rank", "4"])
    assert seen == [(str(tmp_path / "run"), 3, 64, 2, 0.002, 4)]


@pytest.mark.parametrize("load, expected", [(0.0, 2), (0.4, 2), (0.6, 1), (1.0, 1), (7.5, 1)])
def test_pick_threads_leaves_the_cores_other_processes_use(monkeypatch, load, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    assert pick_threads(load=load) == expected
    assert pick_threads(max_threads=1, load=load) == 1


def test_pick_threads_counts_only_work_that_is_still_running(monkeypatch):
    """A load average of 1 left by a test that just finished is no reason to drop to 1 thread."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    assert pick_threads(load=1.0, running=0) == 2
    assert pick_threads(load=1.0, running=1) == 1
    assert pick_threads(load=0.0, running=3) == 2  # a burst of short-lived processes: the average decides


def test_pick_threads_reads_the_load_average_and_respects_omp_num_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)))
    monkeypatch.setattr(os, "getloadavg", lambda: (5.2, 1.0, 1.0))
    monkeypatch.setattr(threads, "_other_runnable_processes", lambda: 9)
    assert pick_threads() == 3
    monkeypatch.setattr(threads, "_other_runnable_processes", lambda: 2)
    assert pick_threads() == 6
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 6)
    assert pick_threads() == 6


def test_cli_train_on_cpu_uses_the_idle_cores_only(monkeypatch, tmp_path):
    """`qlora-lite train` on a CPU sets torch's threads from pick_threads (here: a busy machine -> 1 thread)."""
    import types

    from qlora_lite import cli, train as train_module

    seen = {}
    monkeypatch.setattr(threads, "pick_threads", lambda max_threads=None: 1)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.setdefault("threads", n))

    def fake_train(cfg):
        seen["trained"] = cfg.max_steps
        return types.SimpleNamespace(interrupted=False, steps=1, adapter_dir=tmp_path, losses=[1.0])

    monkeypatch.setattr(train_module, "train", fake_train)
    cli.main(["train", "--model", "embedded", "--data", "embedded", "--out_dir", str(tmp_path / "run"),
              "--max_steps", "1", "--warmup_steps", "0", "--device", "cpu"])
    assert seen == {"threads": 1, "trained": 1}
