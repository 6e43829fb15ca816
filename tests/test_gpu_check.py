"""`scripts/gpu_check.sh --cpu-smoke`: the GPU check's parts run on the CPU, so the script cannot rot.

The parts run as four tests (`--only`), so that two workers share them and none runs for minutes; that the
four cover every part of the smoke (which is the GPU check's pre-flight) is checked against the script's plan."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GROUPS = {"device-tests": ["env", "tests"], "bench": ["bench-tiny"], "boundary": ["boundary-tiny"],
          "offload-moe": ["offload-tiny", "moe-tiny", "nf4-dequantize"]}


def _smoke(tmp_path: Path, parts: list[str]) -> tuple[dict, str]:
    """`gpu_check.sh --cpu-smoke --only <parts>`: every part passes; the parts' records by name, and the report."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke", "--only", ",".join(parts)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    results = json.loads((tmp_path / "gpu_results.json").read_text())
    statuses = {p["part"]: p["status"] for p in results["parts"]}
    assert statuses == dict.fromkeys(parts, "pass"), (statuses, done.stdout[-3000:], done.stderr[-3000:])
    assert done.returncode == 0
    report = (tmp_path / "gpu_results.md").read_text()
    assert all(f"| {part} | pass |" in report for part in parts)
    return {p["part"]: p for p in results["parts"]}, report


def test_the_smoke_tests_cover_every_part_of_the_cpu_smoke(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclass looks its module up
    spec.loader.exec_module(gpu_check)
    planned = [part.name for part in gpu_check.plan("cpu-smoke", tmp_path)]
    assert planned == [name for group in GROUPS.values() for name in group]


def test_gpu_check_cpu_smoke_env_and_device_tests(tmp_path):
    parts, _ = _smoke(tmp_path, GROUPS["device-tests"])
    assert parts["tests"]["summary"].startswith("1 passed")  # tests/test_gpu.py's command-line test, on the CPU


def test_gpu_check_cpu_smoke_bench(tmp_path):
    parts, report = _smoke(tmp_path, GROUPS["bench"])
    bench = parts["bench-tiny"]
    assert [(r["seq"], r["batch"]) for r in bench["rows"]] == [(32, 1), (16, 2)]
    assert all(r["ours"]["tokens_per_s"] > 0 and r["peer"]["tokens_per_s"] > 0 and r["predicted"]["ours_bytes"] > 0
               for r in bench["rows"])
    assert "| tiny | 32×1 |" in report and "ours beside transformers + bitsandbytes + PEFT" in report
    ratio = bench["rows"][0]["ratios"]["tokens_per_s"]
    assert f"- tiny 32×1: speed {ratio:.3f}x {'met' if ratio >= 2.0 else 'NOT met'}, memory " in report


def test_gpu_check_cpu_smoke_boundary(tmp_path):
    parts, _ = _smoke(tmp_path, GROUPS["boundary"])
    boundary = parts["boundary-tiny"]
    assert boundary["clamped_from"] == boundary["planned_max_seq_len"] >= boundary["at_fit"]["seq"] == 32


def test_gpu_check_cpu_smoke_offload_and_moe(tmp_path):
    parts, report = _smoke(tmp_path, GROUPS["offload-moe"])
    offload = parts["offload-tiny"]
    # every layer's NF4 base came in twice in the step (forward, recompute); on CPU the planner moves nothing
    assert offload["fetched_bytes_per_step"] == 2 * offload["host_bytes"] > 0 and len(offload["losses"]) == 1
    assert offload["peak_resident_base_bytes"] == 2 * offload["host_bytes"] // offload["layers"]
    assert "offload_base" in report
    moe = parts["moe-tiny"]
    assert moe["seq"] == 32 and len(moe["losses"]) == 3 and moe["tokens_per_s"] > 0 and moe["planned_total_bytes"] > 0
    assert "## Mixture of experts" in report
    nf4 = parts["nf4-dequantize"]["figures"]["results"][0]  # on CPU: the two backends, bytes compared
    assert nf4["shape"] == [256, 512] and nf4["check"]["packed_bytes_equal"]
    assert all(0 < r["dequantize_of_copy"] for r in nf4["backends"].values()) and "## NF4 dequantize" in report
