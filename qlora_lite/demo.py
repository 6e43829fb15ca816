"""The demo: the whole product on the embedded SmolLM2-135M-Instruct, in a few minutes on a CPU.

    embedded model ──► load_model (NF4 base + LoRA r=16 on all linears) ──► answers before
        ──► train (shipped Captain Quill chat set) ──► answers after ──► adapter/ (PEFT format)
        ──► merge (dequantize + s·B·A in fp32 → fp16, verified) ──► merged/
        ──► memory estimate vs measured, parameter and storage accounting
        ──► loss_curve.png, memory.png, summary.md
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from .config import LoraConfig, QuantConfig, TrainConfig
from .generate import answers
from .inject import count_parameters
from .load import load_model
from .threads import pick_threads

__all__ = ["run_demo", "DEMO_QUESTIONS", "DemoResult"]

# Questions absent from the shipped data (see scripts/make_demo_data.py): the style must generalise.
DEMO_QUESTIONS = ("What is the capital of France?", "How many legs does a spider have?")


@dataclass
class DemoResult:
    out_dir: Path
    summary_path: Path
    eval_loss_before: float
    eval_loss_after: float
    phase_seconds: dict[str, float] = field(default_factory=dict)  # wall seconds per phase, in run order
    threads: int = 0


class _PhaseClock:
    """Wall seconds per named phase, in the order they ran (the demo's own profile, in summary.md)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now
        return self.seconds[name]

    def table(self) -> list[str]:
        total = sum(self.seconds.values())
        rows = ["| phase | seconds | share |", "|---|---:|---:|"]
        rows += [f"| {name} | {s:.1f} | {100 * s / total:.0f}% |" for name, s in self.seconds.items()]
        return rows + [f"| total | {total:.1f} | 100% |"]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _loss_plot(metrics_file: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="training loss (batch)", lw=1.2)
    ax.plot([r["step"] for r in eval_rows], [r["eval_loss"] for r in eval_rows], "o-", label="held-out loss", lw=1.6)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (assistant tokens)")
    ax.set_title("QLoRA fine-tune of SmolLM2-135M (NF4 base, LoRA r=16)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_demo(out: str | None = None, steps: int = 20, seq_len: int = 128, batch_size: int = 4,
             learning_rate: float = 1e-3, rank: int = 16, max_new_tokens: int = 20, progress: bool = True,
             eval_every: int | None = None, threads: int | None = None) -> DemoResult:
    """Fine-tune the embedded model in 4-bit, merge and export fp16, and report; returns where it wrote.

    `eval_every` (default: half the steps) sets how often the held-out loss is measured besides before
    the first and after the last step; `threads` (default: `pick_threads()`) the CPU threads.
    """
    from .adapter import read_adapter
    from .embedded import embedded_model_dir
    from .merge import merge
    from .memory import estimate_memory, plot_estimate
    from .train import train

    out_dir = Path(out) if out else Path("runs") / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    model_dir = embedded_model_dir()
    if not torch.cuda.is_available():
        torch.set_num_threads(threads or pick_threads())
    clock = _PhaseClock()  # started after a first run's one-off conversion, which is not the demo's time
    quant, lora = QuantConfig(), LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05)
    cfg = TrainConfig(model=str(model_dir), data="embedded", out_dir=str(out_dir), seq_len=seq_len,
                      batch_size=batch_size, max_steps=steps, learning_rate=learning_rate,
                      warmup_steps=max(1, steps // 10), eval_fraction=0.05,
                      eval_every=eval_every or max(1, steps // 2), save_every=steps, progress=progress,
                      device="cpu" if not torch.cuda.is_available() else "auto", quant=quant, lora=lora,
                      # recomputing each block saves memory this 0.4 GiB run does not need, and costs a CPU a
                      # third more compute per step (docs/benchmarks.md, "Demo and test time")
                      gradient_checkpointing=torch.cuda.is_available())

    say(f"[1/5] loading {model_dir.name} with every linear in NF4 and LoRA r={rank} on all of them "
        f"({torch.get_num_threads()} CPU threads)")
    model, tokenizer = load_model(model_dir, quant, lora, device="auto" if cfg.device == "auto" else cfg.device)
    load_s = clock.lap("load (NF4 quantize + LoRA)")
    params = count_parameters(model)
    say(f"      {params} (loaded in {load_s:.1f} s)")
    before = dict(zip(DEMO_QUESTIONS, answers(model, tokenizer, DEMO_QUESTIONS, max_new_tokens)))
    clock.lap(f"answers before ({len(DEMO_QUESTIONS)} × {max_new_tokens} tokens)")

    say(f"[2/5] training {steps} steps on the shipped Captain Quill chat set")
    result = train(cfg, log=say, loaded=(model, tokenizer))
    train_s = clock.lap("train")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    step_s = sum(r.get("step_s", 0.0) for r in rows)
    del clock.seconds["train"]
    clock.seconds[f"training steps ({steps})"] = step_s
    clock.seconds[f"held-out evaluation ({len(result.eval_losses)}×), data, checkpoint"] = train_s - step_s
    after = dict(zip(DEMO_QUESTIONS, answers(model, tokenizer, DEMO_QUESTIONS, max_new_tokens)))
    clock.lap(f"answers after ({len(DEMO_QUESTIONS)} × {max_new_tokens} tokens)")

    say("[3/5] merging the adapter into an fp16 checkpoint (dequantize + s·B·A in fp32) and verifying it")
    report = merge(model_dir, out_dir / "adapter", out_dir / "merged", dtype="float16", verify=True,
                   progress=progress, overwrite=True)
    merge_total = clock.lap("merge")
    clock.seconds["merge"] = report.seconds
    clock.seconds["verify (logits vs base + adapter)"] = merge_total - report.seconds

    say("[4/5] memory: predicted vs measured")
    estimate = estimate_memory(model_dir, seq_len=seq_len, batch_size=batch_size, lora=lora, quant=quant,
                               optimizer="adamw", compute_dtype="float32", device="cpu",
                               gradient_checkpointing=cfg.gradient_checkpointing)
    measured = result.memory.get("first_step", {}).get("peak_rss_bytes", 0)
    plot_estimate(estimate, out_dir / "memory.png")
    _loss_plot(out_dir / "metrics.jsonl", out_dir / "loss_curve.png")

    say("[5/5] writing summary.md")
    eval_before, eval_after = result.eval_losses[0][1], result.eval_losses[-1][1]
    adapter = read_adapter(out_dir / "adapter")
    adapter_bytes = _dir_bytes(out_dir / "adapter")
    base_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    nf4_bytes = sum(layer.weight.nbytes for layer in _nf4_layers(model))
    analysis_lines = _analysis_headline(out_dir / "adapter", model_dir)
    lines = [
        "# qlora-lite demo",
        "",
        f"Model: SmolLM2-135M-Instruct (embedded), every linear NF4, LoRA r={rank} α={2 * rank} on all of them; "
        f"{steps} steps of batch {batch_size} × {seq_len} tokens on {torch.device(cfg.device if cfg.device != 'auto' else 'cpu')}.",
        "",
        "## Learning",
        f"- held-out loss: **{eval_before:.3f} → {eval_after:.3f}** (training loss {result.losses[0]:.3f} → "
        f"{result.losses[-1]:.3f}); plot: `loss_curve.png`",
        f"- throughput: {result.tokens_per_s:.0f} tokens/s including evaluation "
        f"({sum(r.get('tokens_per_s', 0) * r.get('step_s', 0) for r in rows) / max(step_s, 1e-9):.0f} in the "
        "training steps alone)",
        "",
        "## Answers to questions the data set does not contain (greedy)",
    ]
    for q in DEMO_QUESTIONS:
        lines += [f"- **{q}**", f"  - before: {before[q]!r}", f"  - after:  {after[q]!r}"]
    v = report.verification or {}
    lines += [
        "",
        "## Export",
        f"- adapter: `adapter/` ({adapter_bytes / 1e6:.1f} MB, {len(adapter.modules)} modules, PEFT format) vs "
        f"the 16-bit base checkpoint {base_bytes / 1e6:.0f} MB ({base_bytes / adapter_bytes:.0f}× larger)",
        f"- merged fp16 checkpoint: `merged/` ({report.bytes_written / 1e6:.0f} MB in {report.seconds:.1f} s); "
        f"verified against base+adapter: max |Δlogit| {v.get('max_abs_logit_diff', float('nan')):.3g}, "
        f"top-1 agreement {v.get('top1_agreement', float('nan')):.4f} "
        f"({v.get('top1_agreement_up_to_ties', float('nan')):.4f} up to ties of {v.get('tie_margin')})",
        "",
        "## Parameters and memory",
        f"- {params}",
        f"- NF4 base weights {nf4_bytes / 1e6:.1f} MB ({8 * nf4_bytes / max(1, params.quantized):.3f} bits/param) "
        f"for {params.quantized / 1e6:.1f}M linear parameters",
        f"- predicted host memory for a training step (fp32 compute, AdamW): {estimate.total_bytes / 2**30:.2f} GiB; "
        f"measured peak RSS of the process after the first step: {measured / 2**30:.2f} GiB (includes the Python "
        "runtime, tokenizer and data); breakdown: `memory.png`",
        "",
        "```",
        estimate.to_table(),
        "```",
    ]
    if analysis_lines:
        lines += ["", "## What the adapter learned (LoRA paper analyses)", *[f"- {l}" for l in analysis_lines]]
    clock.lap("report (memory estimate, plots, analysis)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines += ["", f"## Time ({torch.get_num_threads()} CPU threads; load average {load:.1f} at the end)", "",
              *clock.table()]
    total_s = sum(clock.seconds.values())
    summary = out_dir / "summary.md"
    summary.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    say(f"\ndone in {total_s:.0f} s: everything is in {out_dir}/ (summary.md, adapter/, merged/, loss_curve.png, "
        "memory.png)")
    return DemoResult(out_dir, summary, eval_before, eval_after, dict(clock.seconds), torch.get_num_threads())


def _nf4_layers(model):
    from .inject import lora_layers

    return [layer for layer in lora_layers(model).values() if layer.quantized]


def _analysis_headline(adapter_dir: Path, base_dir: Path) -> list[str]:
    from .analysis import analyze, headline

    report = analyze(adapter_dir, base_dir=None, out_dir=adapter_dir.parent / "analysis")
    return headline(report)
