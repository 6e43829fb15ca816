"""The demo's time per phase (load, answers, training steps, evaluation, merge, verify, report), for
several settings side by side in one invocation, so that their ratios share the machine's load.

    for each --run "threads=N,eval_every=K,max_new_tokens=T,steps=S,src=DIR" (any subset):
        a fresh process: torch.set_num_threads(N) ──► qlora_lite.demo.run_demo(**rest) ──► phase seconds
        (src: the qlora_lite of another checkout, e.g. `git worktree add /tmp/before <commit>`, so an old and
        a new demo are timed side by side under the same load)
    ──► one table: phases × runs, with each run's load average before and after

Each run is a separate process (thread pools and caches start cold, as a user's `qlora-lite demo`
does); the embedded model's one-off conversion is done before the first run and never timed.
`threads=auto` keeps the demo's own choice (see qlora_lite.threads.pick_threads).

Usage:

    python benchmarks/bench_demo.py                                   # the demo's defaults
    python benchmarks/bench_demo.py --run "threads=2,eval_every=10" "threads=1" "threads=2" --json
    python benchmarks/bench_demo.py --run "src=/tmp/before" "threads=auto"      # before vs after a change
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _env import device_name, versions  # benchmarks/ is on sys.path when run as a script

_CHILD = """
import json, sys, torch
from qlora_lite.demo import run_demo
kwargs = json.loads(sys.argv[1])
threads = kwargs.pop("threads", "auto")
result = run_demo(progress=False, threads=None if threads == "auto" else int(threads), **kwargs)
print("BENCH_DEMO " + json.dumps({"phases": result.phase_seconds, "threads": result.threads,
                                  "eval_loss": [result.eval_loss_before, result.eval_loss_after]}))
"""


def parse_run(spec: str) -> dict:
    out: dict = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        out[key] = value if (key == "threads" and value == "auto") or key == "src" else int(value)
    return out


def run_one(kwargs: dict, out_root: Path, index: int) -> dict:
    load_before = [round(x, 2) for x in os.getloadavg()]
    child_kwargs = {k: v for k, v in kwargs.items() if k != "src"} | {"out": str(out_root / f"run{index}")}
    src = kwargs.get("src", str(Path(__file__).resolve().parents[1]))  # another checkout: its demo, same load
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(child_kwargs)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise SystemExit(f"run {kwargs} failed:\n{proc.stderr[-3000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("BENCH_DEMO "))
    row = json.loads(line.removeprefix("BENCH_DEMO "))
    row.update(settings=kwargs, load_average_before=load_before,
               load_average_after=[round(x, 2) for x in os.getloadavg()], total_s=sum(row["phases"].values()))
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs="+", default=["threads=auto"],
                        help='settings per run, e.g. "threads=2,eval_every=10,max_new_tokens=24"')
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    opts = parser.parse_args(argv)

    from qlora_lite.embedded import embedded_model_dir

    embedded_model_dir()  # the one-off conversion, outside every timed run
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_one(parse_run(spec), Path(tmp), i) for i, spec in enumerate(opts.run)]
    summary = {"device": device_name(__import__("torch").device("cpu")),
               "versions": versions(("torch", "bitsandbytes", "transformers", "qlora-lite")), "runs": rows}
    if opts.json:
        print(json.dumps(summary, indent=2))
        return summary
    print(summary["device"])
    phases = list(dict.fromkeys(p for r in rows for p in r["phases"]))
    header = [",".join(f"{k}={v}" for k, v in r["settings"].items()) or "defaults" for r in rows]
    print("| phase | " + " | ".join(header) + " |")
    print("|---|" + "---:|" * len(rows))
    for phase in phases:
        print(f"| {phase} | " + " | ".join(f"{r['phases'].get(phase, float('nan')):.1f}" for r in rows) + " |")
    print("| **total** | " + " | ".join(f"**{r['total_s']:.1f}**" for r in rows) + " |")
    print("| threads used | " + " | ".join(str(r["threads"]) for r in rows) + " |")
    print("| held-out loss | " + " | ".join(f"{a:.3f} → {b:.3f}" for a, b in (r["eval_loss"] for r in rows)) + " |")
    print("| load average before → after | " + " | ".join(
        f"{r['load_average_before'][0]:.2f} → {r['load_average_after'][0]:.2f}" for r in rows) + " |")
    return summary


if __name__ == "__main__":
    main()
