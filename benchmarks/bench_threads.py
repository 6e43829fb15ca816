"""How many CPU threads should a training step use on a machine others are busy on? (issue 24)

    the demo's model: embedded SmolLM2-135M, every linear NF4, LoRA r=16 on all of them, AdamW
    one batch of 4 × 128 random tokens (fixed seed), labels = inputs
        ▼
    rounds × (for each thread count, in turn: torch.set_num_threads(t); warm-up step; --steps timed steps)
        ▼
    per thread count: median step seconds over all rounds, ratio to the first thread count,
    and the load average before and after (what else the machine was running)

The thread counts alternate within one process, round by round, so that every count sees the
same changing load: their ratio is meaningful even when the absolute times are not.

Usage:

    python benchmarks/bench_threads.py                      # threads 1 and 2, 3 rounds of 3 steps
    python benchmarks/bench_threads.py --threads 1 2 4 --rounds 5 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from _env import device_name, versions  # benchmarks/ is on sys.path when run as a script


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per thread count per round")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args(argv)

    from qlora_lite.config import LoraConfig, QuantConfig
    from qlora_lite.embedded import embedded_model_dir
    from qlora_lite.load import load_model

    load_before = [round(x, 2) for x in os.getloadavg()]
    model, _ = load_model(embedded_model_dir(), QuantConfig(), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05),
                          device="cpu")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (opts.batch, opts.seq), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    times: dict[int, list[float]] = {t: [] for t in opts.threads}
    for _ in range(opts.rounds):
        for threads in opts.threads:
            torch.set_num_threads(threads)
            step()  # warm-up: the thread pool resizes
            times[threads] += [step() for _ in range(opts.steps)]
            print(f"threads {threads}: {', '.join(f'{t:.2f}' for t in times[threads][-opts.steps:])} s "
                  f"(load average {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    first = statistics.median(times[opts.threads[0]])
    rows = [{"threads": t, "median_step_s": statistics.median(v), "min_step_s": min(v),
             "ratio_to_first": statistics.median(v) / first} for t, v in times.items()]
    summary = {"device": device_name(torch.device("cpu")), "versions": versions(("torch", "bitsandbytes")),
               "config": vars(opts), "load_average_before": load_before,
               "load_average_after": [round(x, 2) for x in os.getloadavg()], "results": rows}
    if opts.json:
        print(json.dumps(summary, indent=2))
        return summary
    print(f"{summary['device']}; load average {load_before} -> {summary['load_average_after']}; "
          f"{opts.rounds} rounds × {opts.steps} steps of {opts.batch}×{opts.seq} tokens")
    print(f"{'threads':>8}{'median s':>10}{'min s':>8}{'ratio':>8}")
    for r in rows:
        print(f"{r['threads']:>8}{r['median_step_s']:>10.2f}{r['min_step_s']:>8.2f}{r['ratio_to_first']:>8.2f}")
    return summary


if __name__ == "__main__":
    main()
