"""`make gpu-check`: the GPU path proven in one command, on a machine with no network (issue 16).

    scripts/gpu_check.sh  (installs .wheels/ into a folder on PYTHONPATH; the machine's torch stays)
        │
        ▼
    parts, in order, each in its own process with its own time budget and one result line;
    a part that fails or runs out of time is recorded and the next one runs:
      env           python / torch / CUDA / package versions, nvidia-smi
      tests         pytest -m gpu (layer parity in bf16, NF4 bytes vs bitsandbytes' CUDA kernels,
                    paged-AdamW training, resume, merge, chunked loss, FSDP, preflight, CLI, demo)
      bench-<shape> benchmarks/bench_train.py: ours beside transformers + bitsandbytes + PEFT,
                    tokens/s, peak allocated / reserved, the planner's prediction and predicted/measured
      boundary-<shape>
                    `qlora-lite memory --gpu RTX4090` picks the longest seq_len that fits 24 GiB;
                    training at it must run on the card capped at 24 GiB
                    (torch.cuda.set_per_process_memory_fraction); the planner refuses one step up,
                    which is also run, to show how much margin the planner keeps
      nf4-dequantize  (issue 17) benchmarks/bench_nf4.py: bitsandbytes' NF4 dequantize and the triton
                    backend's one-launch one, GB/s and as a fraction of a clone's, bytes compared
      long-context-llama3-8b   (issue 18; outside the default 480 s: run it with
                    `--only long-context-llama3-8b --total-s 600`) the boundary with offload_activations
                    and the tiled MLP (LONG_CONTEXT_MLP_CHUNK): the planner's longest seq_len on 24 GiB
                    (target >= 128k) trained under the cap, tokens/s, the pinned host memory planned; and
                    at 16k tokens, uncapped, ours with and without the offload: the share of the step the
                    copies are not hidden, beside the planner's copy time at 25 GB/s
      offload-70b   (issue 18; outside the default 480 s: `--only offload-70b --total-s 600`; ~40 GB of host
                    memory) benchmarks/bench_offload_base.py: the Llama-2-70B shape with random NF4 weights drawn
                    straight into host memory, offload_base, the card capped at 24 GiB, seq 2048: tokens/s and
                    the compute-bound step, peak allocated, bytes fetched per step, beside the planner
      moe-qwen3-30b-a3b   (issue 22; outside the default 480 s: `--only moe-qwen3-30b-a3b --total-s 300`)
                    benchmarks/bench_moe.py: the Qwen3-30B-A3B shape (NF4 experts, LoRA r=16 on attention
                    and every expert) built from random weights on the GPU, 3 steps at seq 2048 under the
                    24 GiB cap: ran or not, peak allocated / reserved, tokens/s, the planner's figures
        │
        ▼
    $OUT (else gpu-results/): gpu_results.json (one object per part) and gpu_results.md (tables)

`--cpu-smoke` runs the same parts on the CPU with the tiny shape and a few steps (tests/test_gpu.py
on the CPU instead of `-m gpu`), so that the script cannot rot between GPU sessions; the test suite
runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GiB = 1024**3
CONSUMER_CARD = "RTX4090"  # 24 GiB: the card the boundary parts emulate
LONG_CONTEXT_MLP_CHUNK = 4096  # the long-context part's mlp_chunk_tokens


@dataclass
class Part:
    name: str
    budget_s: float
    command: list[str]
    parse: str = "none"  # how the result is read: none | pytest | bench | boundary
    env: dict[str, str] = field(default_factory=dict)
    cleanup: list[Path] = field(default_factory=list)  # removed after the part (checkpoints in RAM)


def _python() -> str:
    return sys.executable


def _bench(shape: str, rows: str, cache: Path, device: str, warmup: int, steps: int, extra: list[str] = ()) -> list[str]:
    return [_python(), str(ROOT / "benchmarks" / "bench_train.py"), "--shape", shape, "--device", device,
            "--rows", rows, "--cache", str(cache), "--warmup", str(warmup), "--steps", str(steps), "--json",
            *(["--draw-device", "cuda"] if device == "cuda" else []), *extra]


def _offload(shape: str, device: str, seq: int, warmup: int, steps: int) -> list[str]:
    return [_python(), str(ROOT / "benchmarks" / "bench_offload_base.py"), "--shape", shape, "--device", device,
            "--seq", str(seq), "--warmup", str(warmup), "--steps", str(steps), "--cap-gib", "24"]


def _boundary(shape: str, cache: Path, device: str, cap_gib: float, warmup: int, steps: int,
              long_context: bool = False) -> list[str]:
    return [_python(), str(Path(__file__).resolve()), "--boundary", shape, "--cache", str(cache), "--device", device,
            "--cap-gib", str(cap_gib), "--warmup", str(warmup), "--steps", str(steps),
            *(["--long-context"] if long_context else [])]


def _moe(shape: str, device: str, seq: int) -> list[str]:
    return [_python(), str(ROOT / "benchmarks" / "bench_moe.py"), "--shape", shape, "--device", device, "--seq",
            str(seq), "--warmup", "1", "--steps", "2", "--cap-gib", "24", "--json"]


def _nf4_bench(device: str, shapes: str) -> list[str]:
    return [_python(), str(ROOT / "benchmarks" / "bench_nf4.py"), "--device", device, "--shapes", *shapes.split(),
            "--json"]


def plan(mode: str, scratch: Path) -> list[Part]:
    """The parts of one check; budgets sum to under 9 minutes on an H100 (measured: see docs/gpu.md)."""
    env_part = Part("env", 30, [_python(), str(Path(__file__).resolve()), "--env"], parse="json")
    if mode == "cpu-smoke":
        tiny = scratch / "tiny"
        return [
            env_part,
            Part("tests", 600, [_python(), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py",
                                "-k", "command_line"],
                 parse="pytest", env={"QLORA_LITE_GPU_SMOKE": "1"}),
            Part("bench-tiny", 600, _bench("tiny", "32x1,16x2", tiny, "cpu", 0, 1), parse="bench"),
            Part("boundary-tiny", 600, _boundary("tiny", tiny, "cpu", 1.5, 0, 1), parse="boundary", cleanup=[tiny]),
            Part("offload-tiny", 300, _offload("tiny", "cpu", 32, 0, 1), parse="offload"),
            Part("moe-tiny", 600, _moe("tiny", "cpu", 32), parse="moe"),
            Part("nf4-dequantize", 120, _nf4_bench("cpu", "256x512"), parse="json"),
        ]
    ckpt = {shape: scratch / shape for shape in ("7b", "llama3-8b", "13b")}
    return [
        env_part,
        Part("tests", 150, [_python(), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"],
             parse="pytest"),
        Part("bench-7b", 110, _bench("7b", "2048x1,512x4", ckpt["7b"], "cuda", 2, 4), parse="bench"),
        Part("boundary-7b", 70, _boundary("7b", ckpt["7b"], "cuda", 24, 0, 1), parse="boundary",
             cleanup=[ckpt["7b"]]),
        Part("bench-llama3-8b", 100, _bench("llama3-8b", "8192x1", ckpt["llama3-8b"], "cuda", 1, 3), parse="bench"),
        Part("boundary-llama3-8b", 80, _boundary("llama3-8b", ckpt["llama3-8b"], "cuda", 24, 0, 1), parse="boundary",
             cleanup=[ckpt["llama3-8b"]]),
        Part("bench-13b", 100, _bench("13b", "2048x1", ckpt["13b"], "cuda", 2, 3), parse="bench",
             cleanup=[ckpt["13b"]]),
        # issue 17's lever: each NF4 dequantize (bitsandbytes', the triton backend's) as a fraction of a copy
        Part("nf4-dequantize", 45, _nf4_bench("cuda", "4096x4096 11008x4096"), parse="json"),
        # issue 18, not run yet: ~2 steps at ~100k tokens + 4 at 16k; past the default total, ask for it by name
        Part("long-context-llama3-8b", 480, _boundary("llama3-8b", ckpt["llama3-8b"], "cuda", 24, 0, 1,
                                                      long_context=True), parse="boundary",
             cleanup=[ckpt["llama3-8b"]]),
        # issue 18, not run yet: building the random 70B in host memory, then 1 + 2 steps at 2048 tokens
        Part("offload-70b", 420, _offload("70b", "cuda", 2048, 1, 2), parse="offload"),
        # issue 22, not run yet: ~1-2 min to draw and quantize 30.5B parameters, then 3 steps; ask for it by name
        Part("moe-qwen3-30b-a3b", 300, _moe("qwen3-30b-a3b", "cuda", 2048), parse="moe"),
    ]


# ---- one part ----------------------------------------------------------------------------------------

def run_part(part: Part, remaining_s: float) -> dict:
    budget = min(part.budget_s, remaining_s)
    record: dict = {"part": part.name, "command": " ".join(part.command), "budget_s": part.budget_s}
    if budget < 5:
        record.update(status="skipped", reason=f"only {remaining_s:.0f} s of the check's time left")
        return record
    t0 = time.perf_counter()
    process = subprocess.Popen(part.command, cwd=ROOT, env={**os.environ, **part.env}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=budget)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the part's children (bench sides) too
        stdout, stderr = process.communicate()
        timed_out = True
    record.update(seconds=round(time.perf_counter() - t0, 1), exit_code=process.returncode)
    for path in part.cleanup:
        shutil.rmtree(path, ignore_errors=True)
    if timed_out:
        record.update(status="cut", reason=f"cut at its {budget:.0f} s budget", tail=(stdout + stderr)[-3000:])
        return record
    try:
        record.update(PARSERS[part.parse](stdout, stderr, process.returncode))
    except Exception as exc:  # noqa: BLE001 - a part's unreadable output is that part's failure, not the check's
        record.update(status="fail", reason=f"could not read the output: {exc}")
    if record["status"] != "pass":
        record.setdefault("tail", (stdout + stderr)[-3000:])
    return record


def _parse_json(stdout: str, _stderr: str, code: int) -> dict:
    return {"status": "pass" if code == 0 else "fail", "figures": json.loads(stdout)}


def _parse_pytest(stdout: str, _stderr: str, code: int) -> dict:
    words = ("passed", "failed", "skipped", "error", "no tests ran")
    summary = next((line.strip("= ") for line in reversed(stdout.splitlines())
                    if " in " in line and any(w in line for w in words)), "")
    failed = [line.split(" ", 1)[1] for line in stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    skipped = [line for line in stdout.splitlines() if line.startswith("SKIPPED")]
    return {"status": "pass" if code == 0 else "fail", "summary": summary, "failed": failed, "skipped": skipped}


def _parse_bench(stdout: str, _stderr: str, code: int) -> dict:
    if code != 0:
        return {"status": "fail", "reason": f"exit {code}"}
    summary = json.loads(stdout[stdout.index("{"):])
    rows = []
    for row in summary["rows"]:
        out = {"seq": row["seq"], "batch": row["batch"], "predicted": row["predicted"], "ratios": row.get("ratios")}
        for side in ("ours", "peer"):
            r = row.get(side)
            if r:
                out[side] = {k: r.get(k) for k in ("tokens_per_s", "step_s", "peak_bytes", "peak_allocated_bytes",
                                                  "peak_reserved_bytes", "oom", "bound_fraction",
                                                  "predicted_over_measured")}
                out[side]["loss_first_last"] = [r["losses"][0], r["losses"][-1]] if r.get("losses") else None
        rows.append(out)
    ooms = [f"{r['seq']}x{r['batch']} {s}" for r in rows for s in ("ours", "peer") if r.get(s, {}).get("oom")]
    return {"status": "fail" if any("ours" in o for o in ooms) else "pass", "device": summary["device"],
            "versions": summary["versions"], "rows": rows, "bound_tokens_per_s": summary["bound_tokens_per_s"],
            "load": {s: {"load_s": summary[s]["load_s"], "load_peak_bytes": summary[s]["load_peak_bytes"]}
                     for s in ("ours", "peer") if s in summary},
            "checkpoint_build_s": summary["checkpoint_build_s"],
            **({"reason": "out of memory: " + ", ".join(ooms)} if ooms else {})}


def _parse_boundary(stdout: str, _stderr: str, code: int) -> dict:
    result = json.loads(stdout.strip().splitlines()[-1])
    result["status"] = "pass" if code == 0 and result.get("fits_ran") else "fail"
    return result


def _parse_offload(stdout: str, _stderr: str, code: int) -> dict:
    result = json.loads(stdout.strip().splitlines()[-1])
    result["status"] = "pass" if code == 0 and not result.get("oom") else "fail"
    if result.get("oom"):
        result["reason"] = result.get("oom_message", "out of memory")
    return result


def _parse_moe(stdout: str, _stderr: str, code: int) -> dict:
    result = json.loads(stdout.strip().splitlines()[-1])
    result["status"] = "pass" if code == 0 and not result.get("oom") else "fail"
    if result.get("oom"):
        result["reason"] = f"out of memory: {result['oom']}"
    return result


PARSERS = {"none": lambda o, e, c: {"status": "pass" if c == 0 else "fail"}, "json": _parse_json,
           "pytest": _parse_pytest, "bench": _parse_bench, "boundary": _parse_boundary,
           "offload": _parse_offload, "moe": _parse_moe}


# ---- the parts that live in this file -----------------------------------------------------------------

def environment() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "host": platform.node(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(device=props.name, device_memory_bytes=props.total_memory,
                   multiprocessors=props.multi_processor_count)
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("transformers", "accelerate", "peft", "bitsandbytes", "safetensors", "jsonargparse", "triton",
                "liger-kernel", "datasets", "pyarrow", "pandas"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    try:  # the data pipeline needs the machine's own pyarrow (>= 24: too big a wheel to carry) and pandas
        import qlora_lite.data  # noqa: F401
        out["data_pipeline"] = "imports"
    except Exception as exc:  # noqa: BLE001 - recorded for the report, the parts that need it will fail too
        out["data_pipeline"] = f"does not import: {type(exc).__name__}: {exc}"[:300]
    smi = shutil.which("nvidia-smi")
    if smi:
        done = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                               "--format=csv,noheader"], capture_output=True, text=True)
        out["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    return out


def boundary(shape: str, cache: Path, device: str, cap_gib: float, warmup: int, steps: int,
             long_context: bool = False) -> dict:
    """The planner's longest seq_len on a 24 GiB card, trained under that cap; the next planner step too.
    `long_context`: with offload_activations and the tiled MLP, plus the copies' unhidden share (16k tokens)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_train

    from qlora_lite.memory_fit import memory_report

    bench_train.build_checkpoint(shape, cache, draw_device=device)
    capacity = f"{cap_gib}GiB" if device == "cpu" else CONSUMER_CARD
    options = dict(offload_activations=True, mlp_chunk_tokens=LONG_CONTEXT_MLP_CHUNK) if long_context else {}
    flags = ["--offload-activations", "--mlp-chunk-tokens", str(LONG_CONTEXT_MLP_CHUNK)] if long_context else []
    # the bench trains LoRA without dropout: plan the same (dropout keeps a copy of each adapted input)
    plan_json = json.loads(memory_report(str(cache), seq_len=2048, batch_size=1, rank=16, gpu=capacity,
                                         json_output=True, lora_dropout=0.0, **options))
    fit = plan_json.get("max_seq_len")
    result = {"shape": shape, "card": capacity, "cap_gib": cap_gib, "planned_max_seq_len": fit, **options,
              "planned_pinned_host_bytes": plan_json.get("max_seq_len_pinned_host_bytes")}
    if not fit:
        result.update(fits_ran=False, reason="the planner finds no seq_len that fits")
        return result
    if device == "cpu":  # the smoke proves the path, not the planner: keep its steps short
        result["clamped_from"], fit = fit, min(fit, 32)
    rows = f"{fit}x1,{fit + 64}x1"
    command = bench_train.__file__
    args = ["--shape", shape, "--device", device, "--rows", rows, "--cache", str(cache), "--warmup", str(warmup),
            "--steps", str(steps), "--sides", "ours", "--json", *flags]
    if device == "cuda":
        args += ["--memory-cap-gib", str(cap_gib)]
    done = subprocess.run([sys.executable, command, *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        result.update(fits_ran=False, reason=f"bench exit {done.returncode}: {done.stderr[-1500:]}")
        return result
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    at_fit, step_up = (row["ours"] for row in summary["rows"])
    predicted = [row["predicted"]["ours_bytes"] for row in summary["rows"]]
    required = [row["predicted"]["ours_required_bytes"] for row in summary["rows"]]
    result.update(
        fits_ran=not at_fit.get("oom"),
        at_fit={"seq": fit, "oom": bool(at_fit.get("oom")), "peak_allocated_bytes": at_fit["peak_bytes"],
                "peak_reserved_bytes": at_fit.get("peak_reserved_bytes"), "predicted_bytes": predicted[0],
                "predicted_required_bytes": required[0],
                "tokens_per_s": at_fit.get("tokens_per_s")},
        step_up={"seq": fit + 64, "planner_refuses": required[1] > cap_gib * GiB, "oom": bool(step_up.get("oom")),
                 "peak_allocated_bytes": step_up["peak_bytes"], "peak_reserved_bytes": step_up.get("peak_reserved_bytes"),
                 "predicted_bytes": predicted[1]},
        device=summary["device"])
    if long_context and result["fits_ran"]:
        result["copies"] = _unhidden_copies(bench_train.__file__, shape, cache, device, flags)
    return result


def _unhidden_copies(command: str, shape: str, cache: Path, device: str, flags: list[str]) -> dict:
    """Ours at 16k tokens (uncapped) with and without offload_activations, both tiled: the share of the
    offloaded step that the copies add, beside the planner's transfer time (25 GB/s)."""
    seq = 16384 if device == "cuda" else 32
    steps = {}
    for offload in (False, True):
        args = ["--shape", shape, "--device", device, "--rows", f"{seq}x1", "--cache", str(cache), "--warmup", "1",
                "--steps", "3", "--sides", "ours", "--json", *[f for f in flags if offload or f != "--offload-activations"]]
        done = subprocess.run([sys.executable, command, *args], capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            return {"seq": seq, "error": f"bench exit {done.returncode}: {done.stderr[-800:]}"}
        row = json.loads(done.stdout[done.stdout.index("{"):])["rows"][0]
        steps[offload] = row["ours"]["step_s"]
        predicted_s = row["predicted"].get("ours_transfer_s")
    return {"seq": seq, "step_s_plain": steps[False], "step_s_offload": steps[True],
            "unhidden_fraction": (steps[True] - steps[False]) / steps[True], "predicted_transfer_s": predicted_s}


# ---- the report ---------------------------------------------------------------------------------------

def _gib(n) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def markdown(results: dict) -> str:
    env = next((p.get("figures", {}) for p in results["parts"] if p["part"] == "env"), {})
    lines = [f"# gpu-check ({results['mode']}), {results['started']}", "",
             f"device: {env.get('device', 'CPU')}; torch {env.get('torch')} (CUDA {env.get('cuda')}), "
             f"transformers {env.get('transformers')}, peft {env.get('peft')}, bitsandbytes {env.get('bitsandbytes')}, "
             f"accelerate {env.get('accelerate')}; total {results['seconds']:.0f} s", "",
             "| part | status | seconds | note |", "|---|---|---|---|"]
    for p in results["parts"]:
        note = p.get("reason") or p.get("summary") or ""
        lines.append(f"| {p['part']} | {p['status']} | {p.get('seconds', '-')} | {str(note)[:160]} |")
    bench = [p for p in results["parts"] if p["part"].startswith("bench-") and p.get("rows")]
    if bench:
        lines += ["", "## Training step, ours beside transformers + bitsandbytes + PEFT", "",
                  "| shape | seq×batch | ours tokens/s | peer tokens/s | speed ratio | ours peak alloc GiB | "
                  "peer peak alloc GiB | memory ratio | ours reserved GiB | planner alloc GiB (ours) | "
                  "planner/measured ours | planner/measured peer | ours % of 6N bound |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in bench:
            for r in p["rows"]:
                o, q = r.get("ours") or {}, r.get("peer") or {}
                ratio = r.get("ratios") or {}
                lines.append(
                    f"| {p['part'][6:]} | {r['seq']}×{r['batch']} | {_fmt(o.get('tokens_per_s'), o)} | "
                    f"{_fmt(q.get('tokens_per_s'), q)} | {_num(ratio.get('tokens_per_s'))} | {_gib(o.get('peak_bytes'))} | "
                    f"{_gib(q.get('peak_bytes'))} | {_num(ratio.get('peak_bytes'))} | {_gib(o.get('peak_reserved_bytes'))} | "
                    f"{_gib(r['predicted'].get('ours_bytes'))} | {_num(o.get('predicted_over_measured'))} | "
                    f"{_num(q.get('predicted_over_measured'))} | "
                    f"{_num(100 * o['bound_fraction'] if o.get('bound_fraction') else None, 1)} |")
        lines += _speed_targets(bench)
    bounds = [p for p in results["parts"] if p["part"].startswith(("boundary-", "long-context-")) and p.get("at_fit")]
    if bounds:
        lines += ["", f"## The planner's boundary on a card capped at 24 GiB ({CONSUMER_CARD})", "",
                  "| shape | planned max seq | ran at it | peak alloc / reserved GiB | planner GiB | "
                  "step up (+64) | step-up peak alloc GiB |", "|---|---|---|---|---|---|---|"]
        for p in bounds:
            a, s = p["at_fit"], p["step_up"]
            shape = p["shape"] + (" (offload + tiled MLP)" if p.get("offload_activations") else "")
            lines.append(f"| {shape} | {a['seq']} | {'out of memory' if a['oom'] else 'yes'} | "
                         f"{_gib(a['peak_allocated_bytes'])} / {_gib(a['peak_reserved_bytes'])} | "
                         f"{_gib(a['predicted_bytes'])} | planner {'refuses' if s['planner_refuses'] else 'accepts'}; "
                         f"{'out of memory' if s['oom'] else 'ran'} | {_gib(s['peak_allocated_bytes'])} |")
        for p in bounds:
            c = p.get("copies") or {}
            if c.get("unhidden_fraction") is not None:
                lines.append(f"\n{p['shape']} at {c['seq']} tokens, uncapped: step {c['step_s_plain']:.2f} s without "
                             f"offload, {c['step_s_offload']:.2f} s with: {100 * c['unhidden_fraction']:.1f}% of the step "
                             f"is copies not hidden (planner: {_num(c['predicted_transfer_s'], 2)} s of copies at 25 GB/s); "
                             f"pinned host memory planned at the longest seq: {_gib(p.get('planned_pinned_host_bytes'))} GiB")
    lines += _offload_table([p for p in results["parts"] if p["part"].startswith("offload-") and p.get("planner")])
    lines += _nf4_table(next((p for p in results["parts"] if p["part"] == "nf4-dequantize" and p.get("figures")), None))
    moe = [p for p in results["parts"] if p["part"].startswith("moe-") and p.get("losses")]
    if moe:
        lines += ["", "## Mixture of experts: NF4 experts, LoRA on experts and attention (benchmarks/bench_moe.py)", "",
                  "| shape | seq | cap GiB | ran | peak alloc / reserved GiB | planner alloc / reserved GiB | "
                  "planner/measured | tokens/s | trainable |", "|---|---|---|---|---|---|---|---|---|"]
        for p in moe:
            lines.append(f"| {p['shape']} | {p['seq']} | {p['cap_gib']} | {'out of memory' if p['oom'] else 'yes'} | "
                         f"{_gib(p.get('peak_allocated_bytes'))} / {_gib(p.get('peak_reserved_bytes'))} | "
                         f"{_gib(p['planned_allocated_bytes'])} / {_gib(p['planned_reserved_bytes'])} | "
                         f"{_num(p.get('planned_over_measured'))} | {_num(p.get('tokens_per_s'), 0)} | "
                         f"{p['params_trainable']:,} |")
    return "\n".join(lines) + "\n"


def _nf4_table(part: dict | None) -> list[str]:
    if part is None:
        return []
    lines = ["", "## NF4 dequantize (benchmarks/bench_nf4.py): GB/s written, and as a fraction of a clone's", "",
             "| shape | dtype | backend | dequantize ms | GB/s | of copy | bytes = bitsandbytes' |", "|---|---|---|---|---|---|---|"]
    for row in part["figures"]["results"]:
        same = row["check"].get("triton_bytes_equal_bitsandbytes", "-")
        for backend, r in row["backends"].items():
            lines.append(f"| {'x'.join(map(str, row['shape']))} | {row['dtype']} | {backend} | "
                         f"{1e3 * r['dequantize_s']:.3f} | {r['dequantize_gb_s']:.1f} | "
                         f"{100 * r['dequantize_of_copy']:.0f}% | {same if backend == 'triton' else '-'} |")
    return lines


def _offload_table(parts: list[dict]) -> list[str]:
    if not parts:
        return []
    lines = ["", "## The NF4 base in host memory (offload_base), the card capped at 24 GiB", "",
             "| shape | seq×batch | tokens/s | step s | compute-bound step s | step / bound | peak alloc / reserved GiB | "
             "planner alloc GiB | planner/measured | host base GiB (planner) | fetched GiB/step (planner) | "
             "planner copy s at 25 GB/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in parts:
        plan = p["planner"]
        lines.append(f"| {p['shape']} | {p['seq']}×{p['batch']} | {_fmt(p.get('tokens_per_s'), p)} | "
                     f"{_num(p.get('step_s'), 2)} | {_num(p.get('compute_bound_step_s'), 2)} | "
                     f"{_num(p.get('step_over_bound'), 2)} | {_gib(p.get('peak_allocated_bytes'))} / "
                     f"{_gib(p.get('peak_reserved_bytes'))} | {_gib(plan['allocated_bytes'])} | "
                     f"{_num(p.get('predicted_over_measured'))} | {_gib(p['host_bytes'])} "
                     f"({_gib(plan['pinned_host_bytes'])}) | {_gib(p.get('fetched_bytes_per_step'))} "
                     f"({_gib(plan['transfer_bytes'])}) | {_num(plan['transfer_s'], 2)} |")
    return lines


# Issue 17's GPU targets for each bench row: tokens/s and peak allocated memory against the peer's, and
# ours' share of the 6·N-FLOP bound.
SPEED_TARGETS = {"speed": 2.0, "memory": 0.75, "bound": 0.35}


def _speed_targets(bench: list[dict]) -> list[str]:
    """One line per row: each of issue 17's targets, met or not, with the figure it was judged on."""
    lines = ["", f"Issue 17's targets: tokens/s >= {SPEED_TARGETS['speed']}x the peer's, peak allocated "
                 f"<= {SPEED_TARGETS['memory']}x, >= {100 * SPEED_TARGETS['bound']:.0f}% of the 6N bound.", ""]
    for p in bench:
        for r in p["rows"]:
            ratio, ours = r.get("ratios") or {}, r.get("ours") or {}
            checks = [("speed", ratio.get("tokens_per_s"), lambda x: x >= SPEED_TARGETS["speed"], "{:.3f}x"),
                      ("memory", ratio.get("peak_bytes"), lambda x: x <= SPEED_TARGETS["memory"], "{:.3f}x"),
                      ("bound", ours.get("bound_fraction"), lambda x: x >= SPEED_TARGETS["bound"], "{:.1%}")]
            verdicts = [f"{name} {shown.format(x)} {'met' if met(x) else 'NOT met'}" if x is not None else f"{name} -"
                        for name, x, met, shown in checks]
            lines.append(f"- {p['part'][6:]} {r['seq']}×{r['batch']}: " + ", ".join(verdicts))
    return lines


def _num(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _fmt(tokens, side: dict) -> str:
    return "OOM" if side.get("oom") else _num(tokens, 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["gpu", "cpu-smoke"], default="gpu")
    parser.add_argument("--total-s", type=float, help="the whole check's time budget (default: 480 s; CPU smoke 1800 s)")
    parser.add_argument("--only", help="comma-separated part names to run")
    parser.add_argument("--env", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--boundary", help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--cap-gib", type=float, default=24.0, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--long-context", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.env:
        print(json.dumps(environment()))
        return 0
    if opts.boundary:
        result = boundary(opts.boundary, opts.cache, opts.device, opts.cap_gib, opts.warmup, opts.steps,
                          opts.long_context)
        print(json.dumps(result))
        return 0 if result.get("fits_ran") else 1

    out = Path(os.environ.get("OUT") or ROOT / "gpu-results")
    out.mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm")
    scratch_root = shm if shm.is_dir() and shutil.disk_usage(shm).free > 40 * GiB else Path("/tmp")
    scratch = scratch_root / f"qlora-lite-gpu-check-{os.getpid()}"
    parts = plan(opts.mode, scratch)
    total_s = opts.total_s or (480.0 if opts.mode == "gpu" else 1800.0)
    if opts.only:
        wanted = set(opts.only.split(","))
        parts = [p for p in parts if p.name in wanted]
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S"), time.perf_counter()
    results = {"mode": opts.mode, "started": started, "scratch": str(scratch), "parts": []}
    try:
        for part in parts:
            record = run_part(part, total_s - (time.perf_counter() - t0))
            results["parts"].append(record)
            extra = record.get("reason") or record.get("summary") or ""
            print(f"[gpu-check] {part.name:<20} {record['status']:<8} {record.get('seconds', 0):>6} s  {extra}"[:400],
                  flush=True)
            results["seconds"] = time.perf_counter() - t0
            (out / "gpu_results.json").write_text(json.dumps(results, indent=1))  # kept if the machine goes
            (out / "gpu_results.md").write_text(markdown(results))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    failed = [p["part"] for p in results["parts"] if p["status"] == "fail"]
    print(f"[gpu-check] {len(results['parts']) - len(failed)} of {len(results['parts'])} parts without failure; "
          f"results in {out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
