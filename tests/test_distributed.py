"""Data parallel on CPU (gloo, 2 processes via torchrun): the adapter equals a single-process run
with the same global batch, and the launch command in docs/distributed.md runs as written."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_lite.adapter import read_adapter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_yaml(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("ddp")
    # equal-length records: each rank's token-mean loss then averages to the global token mean
    records = [{"text": f"The code word number {i % 8} is apple ."} for i in range(32)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "run.yaml").write_text(
        f"model: {tiny_model_dir}\ndata: {root / 'data.jsonl'}\nseq_len: 32\nbatch_size: 2\nmax_steps: 4\n"
        "learning_rate: 0.005\nwarmup_steps: 1\neval_fraction: 0.0\nsave_every: 2\nprogress: false\ndevice: cpu\n"
        "quant:\n  backend: torch\nlora:\n  r: 4\n  lora_dropout: 0.0\n")
    return root


def _cli(args, cwd, nproc=None):
    prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([*prefix, "-m", "qlora_lite.cli", *args], capture_output=True, text=True, timeout=900,
                         cwd=cwd, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_two_process_ddp_equals_single_process_global_batch(run_yaml):
    _cli(["train", "--config", str(run_yaml / "run.yaml"), "--out_dir", str(run_yaml / "ddp")], run_yaml, nproc=2)
    _cli(["train", "--config", str(run_yaml / "run.yaml"), "--out_dir", str(run_yaml / "single"), "--batch_size", "4"],
         run_yaml)
    ddp, single = read_adapter(run_yaml / "ddp" / "adapter"), read_adapter(run_yaml / "single" / "adapter")
    assert any(b.abs().max() > 1e-3 for b in single.lora_B.values())
    for module in single.modules:
        torch.testing.assert_close(ddp.lora_A[module], single.lora_A[module], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ddp.lora_B[module], single.lora_B[module], atol=1e-5, rtol=1e-4)
    losses_ddp = [json.loads(l)["loss"] for l in (run_yaml / "ddp" / "metrics.jsonl").read_text().splitlines()]
    losses_single = [json.loads(l)["loss"] for l in (run_yaml / "single" / "metrics.jsonl").read_text().splitlines()]
    assert losses_ddp == pytest.approx(losses_single, rel=1e-4)  # rank 0 logs the global mean


def test_resume_with_another_world_size_is_explained(run_yaml):
    with pytest.raises(AssertionError, match="2 process"):
        _cli(["train", "--config", str(run_yaml / "run.yaml"), "--out_dir", str(run_yaml / "ddp"), "--resume", "true",
              "--max_steps", "6"], run_yaml)


def test_documented_cpu_launch_command_runs(run_yaml):
    doc = (ROOT / "docs" / "distributed.md").read_text()
    command = re.search(r"<!-- cpu-launch -->\s*```bash\n(.*?)```", doc, flags=re.S).group(1).strip()
    argv = shlex.split(command)
    assert argv[:2] == ["torchrun", "--nproc_per_node"]
    nproc = int(argv[2])
    args = [a.replace("run.yaml", str(run_yaml / "run.yaml")) for a in argv[argv.index("qlora_lite.cli") + 1:]]
    _cli([*args, "--out_dir", str(run_yaml / "documented")], run_yaml, nproc=nproc)
    assert (run_yaml / "documented" / "adapter" / "adapter_model.safetensors").is_file()
