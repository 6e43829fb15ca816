"""Closing the NF4 quality gap on the embedded SmolLM2-135M (issue 21): LoRA on 16-bit, LoRA on NF4,
LoftQ, PiSSA and DoRA on NF4, every row through qlora_lite.train with the same seed, data order,
steps and learning rate (r=16, all linears, the shipped chat data).

    per row: held-out loss before training (the initialised model) and after --steps, the share of
    the NF4-vs-16-bit gap closed ((nf4 - row) / (nf4 - 16bit), after training), tokens/s, and the
    seconds per step (wall time of the run / steps, loading and initialisation included separately)

Usage:

    python benchmarks/bench_quality.py --steps 12                   # CPU, all five rows
    python benchmarks/bench_quality.py --steps 50 --device cuda --json
    python benchmarks/bench_quality.py --rows nf4,loftq --steps 4    # a subset

PEFT's rows (PEFT + bitsandbytes 4-bit, issue 21) are not in this script yet; the initialisations are
compared with PEFT tensor by tensor in tests/test_init.py and tests/test_dora.py instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from _env import device_name, versions  # benchmarks/ is on sys.path when run as a script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora_lite.config import LoraConfig, QuantConfig, TrainConfig  # noqa: E402
from qlora_lite.embedded import embedded_model_dir  # noqa: E402
from qlora_lite.train import train  # noqa: E402

ROWS = {  # label: (quantized, LoraConfig extras)
    "lora-16bit": (False, {}),
    "lora-nf4": (True, {}),
    "loftq-nf4": (True, {"init_lora_weights": "loftq"}),
    "pissa-nf4": (True, {"init_lora_weights": "pissa"}),
    "dora-nf4": (True, {"use_dora": True}),
}


def run_row(label: str, args: argparse.Namespace, model_dir: Path, out_root: Path) -> dict:
    quantized, extras = ROWS[label]
    lora = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, target_modules="all-linear", **extras)
    cfg = TrainConfig(model=str(model_dir), data="embedded", out_dir=str(out_root / label), seq_len=args.seq,
                      batch_size=args.batch, max_steps=args.steps, learning_rate=args.lr, warmup_steps=min(2, args.steps),
                      eval_fraction=0.1, eval_every=args.steps, save_every=args.steps, progress=False,
                      device=args.device, seed=args.seed, lora=lora, quant=QuantConfig() if quantized else None)
    start = time.perf_counter()
    result = train(cfg, log=lambda _msg: None)
    seconds = time.perf_counter() - start
    return {"row": label, "before": result.eval_losses[0][1], "after": result.eval_losses[-1][1],
            "tokens_per_s": result.tokens_per_s, "run_s": seconds, "steps": result.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {list(ROWS)}")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    model_dir = embedded_model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_row(label, args, model_dir, Path(tmp)) for label in rows]
    by_row = {r["row"]: r for r in results}
    if "lora-16bit" in by_row and "lora-nf4" in by_row:
        gap = by_row["lora-nf4"]["after"] - by_row["lora-16bit"]["after"]
        for r in results:
            r["gap_closed"] = (by_row["lora-nf4"]["after"] - r["after"]) / gap if gap else None
    report = {"rows": results, "args": vars(args), "device": device_name(torch.device(args.device)),
              "versions": versions(("torch", "transformers", "peft", "bitsandbytes"))}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{'row':<12} {'before':>8} {'after':>8} {'gap closed':>11} {'tok/s':>8} {'run s':>7}")
    for r in results:
        closed = r.get("gap_closed")
        print(f"{r['row']:<12} {r['before']:8.4f} {r['after']:8.4f} "
              f"{'' if closed is None else f'{100 * closed:10.0f}%':>11} {r['tokens_per_s']:8.0f} {r['run_s']:7.1f}")
    print(f"{report['device']}; steps={args.steps} r={args.r} lr={args.lr} seq={args.seq} batch={args.batch}")


if __name__ == "__main__":
    main()
