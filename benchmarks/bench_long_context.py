"""Host memory of one long-sequence training step, with and without the tiled MLP (issue 18), on CPU.

    the embedded SmolLM2-135M (qlora_lite.embedded), NF4 base (torch backend) + LoRA r=16 on all linears
    (dropout 0), fp32, per-block checkpointing, the chunked loss (1024 tokens) — as `train` runs it
        │ --layers N keeps the first N decoder blocks (the peak is one block's recompute + N block
        │ inputs, so fewer blocks keep the comparison and save minutes of CPU time)
        ▼
    one fresh process per variant (--variants plain,tiled,offload,tiled+offload), the same random tokens:
        warm-up step at 256 tokens, glibc trimmed, then ONE forward + backward at --seq tokens;
        peak RSS growth over the RSS before the step (monitor.PeakRSS, 10 ms samples), with
        MALLOC_MMAP_THRESHOLD_=1MiB so freed tensors leave RSS (docs/memory.md), and the planner's
        prediction for the same step (estimate_memory(device="cpu"): activations + logits + LoRA grads)

On CPU `offload_activations` keeps host copies (the process's own memory): its row shows that the
option runs and costs nothing, not a saving; the saving is on a GPU (scripts/gpu_check.py's
long-context part).

Usage:

    python benchmarks/bench_long_context.py --seq 16384 --layers 4        # ~minutes on 2 idle cores
    python benchmarks/bench_long_context.py --seq 8192 --mlp-chunk-tokens 2048 --json

Internal: `--variant NAME` runs one variant in this process and prints one JSON line.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from _env import device_name, versions  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "tiled", "offload", "tiled+offload")


def one_variant(args: argparse.Namespace) -> dict:
    from qlora_lite.config import LoraConfig, QuantConfig
    from qlora_lite.embedded import embedded_model_dir
    from qlora_lite.load import load_model
    from qlora_lite.loss import install_chunked_loss
    from qlora_lite.memory import estimate_memory
    from qlora_lite.rss import PeakRSS
    from qlora_lite.offload import install_activation_offload, install_tiled_mlp
    from qlora_lite.train import enable_checkpointing

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0)
    model, _ = load_model(embedded_model_dir(), QuantConfig(backend="torch"), lora, device="cpu",
                          compute_dtype=torch.float32, with_tokenizer=False)
    if args.layers:
        model.model.layers = model.model.layers[:args.layers]
        model.config.num_hidden_layers = len(model.model.layers)
    enable_checkpointing(model)
    assert install_chunked_loss(model, 1024)
    tiled = "tiled" in args.variant
    if tiled:
        install_tiled_mlp(model, args.mlp_chunk_tokens)
    offloader = install_activation_offload(model, "cpu") if "offload" in args.variant else None
    model.train()
    vocab = model.config.vocab_size
    warm = torch.randint(0, vocab, (1, 256))
    model(input_ids=warm, labels=warm).loss.backward()
    model.zero_grad(set_to_none=True)
    ids = torch.randint(0, vocab, (1, args.seq), generator=torch.Generator().manual_seed(1))
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    start = time.perf_counter()
    with PeakRSS() as rss:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    seconds = time.perf_counter() - start
    est = estimate_memory(model.config, seq_len=args.seq, batch_size=1, lora=lora, compute_dtype="float32",
                          device="cpu", mlp_chunk_tokens=args.mlp_chunk_tokens if tiled else 0)
    return {"variant": args.variant, "seq": args.seq, "layers": model.config.num_hidden_layers, "loss": loss.item(),
            "peak_rss_growth_bytes": rss.peak - rss.baseline, "predicted_bytes": est.transient_bytes + est.lora_grads,
            "predicted_phase": est.peak_phase, "seconds": round(seconds, 1),
            "host_copies_peak_bytes": offloader.peak_host_bytes if offloader else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=0, help="keep the first N decoder blocks (0: all 30)")
    parser.add_argument("--mlp-chunk-tokens", type=int, default=2048)
    parser.add_argument("--variants", default="plain,tiled")
    parser.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(one_variant(args)))
        return
    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            parser.error(f"--variants: {variant!r} is not one of {', '.join(VARIANTS)}")
        command = [sys.executable, __file__, "--variant", variant, "--seq", str(args.seq), "--layers", str(args.layers),
                   "--mlp-chunk-tokens", str(args.mlp_chunk_tokens), "--threads", str(args.threads)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        run = subprocess.run(command, capture_output=True, text=True, env=env)
        if run.returncode:
            sys.exit(f"{variant} failed:\n{run.stderr[-3000:]}")
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
    result = {"device": device_name(torch.device("cpu")), "versions": versions(("torch", "transformers")),
              "mlp_chunk_tokens": args.mlp_chunk_tokens, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    base = rows[0]["peak_rss_growth_bytes"]
    print(f"{result['device']}; {result['versions']}")
    print(f"SmolLM2-135M (embedded), {rows[0]['layers']} blocks, seq {args.seq} x 1, NF4 + LoRA r=16, fp32, "
          f"checkpointing, chunked loss; MLP chunk {args.mlp_chunk_tokens}")
    print("| variant | peak RSS growth (MiB) | vs first | predicted (MiB) | measured/predicted | step (s) | loss |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        g, p = r["peak_rss_growth_bytes"], r["predicted_bytes"]
        print(f"| {r['variant']} | {g / 2**20:.0f} | {g / base:.2f} | {p / 2**20:.0f} | {g / p:.2f} | {r['seconds']} "
              f"| {r['loss']:.4f} |")


if __name__ == "__main__":
    main()
