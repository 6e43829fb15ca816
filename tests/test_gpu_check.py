"""`scripts/gpu_check.sh --cpu-smoke`: the GPU check's parts run on the CPU, so the script cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_cpu_smoke_runs_every_part(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    results = json.loads((tmp_path / "gpu_results.json").read_text())
    statuses = {p["part"]: p["status"] for p in results["parts"]}
    assert statuses == dict.fromkeys(["env", "tests", "bench-tiny", "boundary-tiny", "offload-tiny", "moe-tiny"],
                                     "pass"), (
        statuses, done.stdout[-3000:], done.stderr[-3000:])
    assert done.returncode == 0
    bench = next(p for p in results["parts"] if p["part"] == "bench-tiny")
    assert [(r["seq"], r["batch"]) for r in bench["rows"]] == [(32, 1), (16, 2)]
    assert all(r["ours"]["tokens_per_s"] > 0 and r["peer"]["tokens_per_s"] > 0 and r["predicted"]["ours_bytes"] > 0
               for r in bench["rows"])
    boundary = next(p for p in results["parts"] if p["part"] == "boundary-tiny")
    assert boundary["clamped_from"] == boundary["planned_max_seq_len"] >= boundary["at_fit"]["seq"] == 32
    offload = next(p for p in results["parts"] if p["part"] == "offload-tiny")
    # every layer's NF4 base came in twice in the step (forward, recompute); on CPU the planner moves nothing
    assert offload["fetched_bytes_per_step"] == 2 * offload["host_bytes"] > 0 and len(offload["losses"]) == 1
    assert offload["peak_resident_base_bytes"] == 2 * offload["host_bytes"] // offload["layers"]
    report = (tmp_path / "gpu_results.md").read_text()
    assert "| tiny | 32×1 |" in report and "offload_base" in report
    moe = next(p for p in results["parts"] if p["part"] == "moe-tiny")
    assert moe["seq"] == 32 and len(moe["losses"]) == 3 and moe["tokens_per_s"] > 0 and moe["planned_total_bytes"] > 0
    assert "| moe-tiny | pass |" in report and "## Mixture of experts" in report
    assert "| bench-tiny | pass |" in report and "ours beside transformers + bitsandbytes + PEFT" in report
