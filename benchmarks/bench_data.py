"""Data pipeline figures (issue 23): the tokenization cache, and what packing without cross-talk costs.

    cache    N synthetic Alpaca records in a .jsonl → build_dataset with the embedded tokenizer, run
             twice, each in a fresh process (as two training runs would): the first tokenizes through
             `datasets.map` and writes tokenized-<key>.arrow, the second memory-maps it. Reports both
             times and the cache files.
    packing  a random Llama (--hidden/--layers/--heads, bf16 on CUDA, fp32 on CPU), B rows of L tokens
             each filled with examples of random lengths (64..1024, seeded), forward + backward:
               concat    the rows under plain causal attention (attention_mask all ones: SDPA's causal
                         kernel, no mask tensor)
               isolated  position ids restarting per example, no attention_mask (collate's output):
                         transformers builds the block-diagonal mask and SDPA runs with it
             median step time and peak memory of each, interleaved, and the ratio isolated/concat.

Usage:

    python benchmarks/bench_data.py cache --records 100000 --num-proc 8
    python benchmarks/bench_data.py packing --device cuda --hidden 2048 --layers 8 --heads 16 --seq 4096 --batch 4
    python benchmarks/bench_data.py packing --device cpu --hidden 256 --layers 2 --heads 4 --seq 1024 --batch 2
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import device_name, versions  # noqa: E402


def build_once(data: str, cache: str, num_proc: int) -> None:
    from transformers import AutoTokenizer

    from qlora_lite.data import build_dataset
    from qlora_lite.embedded import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    t0 = time.perf_counter()
    ds = build_dataset(data, tokenizer, 512, cache_dir=cache, num_proc=num_proc)
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 2), "examples": len(ds),
                      "tokens": ds.total_tokens}))


def bench_cache(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "alpaca.jsonl"
        rng = random.Random(0)
        words = "the a sea ship wind star map gold code river light stone".split()
        with data.open("w") as f:
            for i in range(args.records):
                f.write(json.dumps({"instruction": " ".join(rng.choices(words, k=rng.randint(5, 40))),
                                    "input": "", "output": " ".join(rng.choices(words, k=rng.randint(5, 80)))})
                        + "\n")
        runs = []
        for _ in range(2):
            out = subprocess.run([sys.executable, __file__, "_build", str(data), f"{tmp}/cache", str(args.num_proc)],
                                 capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        files = sorted(p.name for p in Path(f"{tmp}/cache").glob("tokenized-*"))
    return {"records": args.records, "num_proc": args.num_proc, "first_run_s": runs[0]["seconds"],
            "second_run_s": runs[1]["seconds"], "tokens": runs[0]["tokens"], "cache_files": files}


def packed_rows(batch: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    """`batch` rows of exactly `seq` tokens, each a run of examples of random lengths (64..1024)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(batch):
        ids, positions = [], []
        while len(ids) < seq:
            n = min(rng.randint(64, 1024), seq - len(ids))
            ids += [rng.randrange(vocab) for _ in range(n)]
            positions += range(n)
        rows.append({"input_ids": ids, "labels": ids, "position_ids": positions})
    return rows


def bench_packing(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_lite.data.packing import collate

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75), num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=32000,
                         max_position_embeddings=args.seq, use_cache=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).train()
    isolated = {k: v.to(device) for k, v in collate(packed_rows(args.batch, args.seq, 32000), 0).items()}
    concat = {"input_ids": isolated["input_ids"], "labels": isolated["labels"],
              "attention_mask": torch.ones_like(isolated["input_ids"])}
    times: dict[str, list[float]] = {"concat": [], "isolated": []}
    peaks: dict[str, int] = {}

    def step(batch) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for i in range(args.warmup + args.steps):  # interleaved, so drift hits both alike
        for name, batch in (("concat", concat), ("isolated", isolated)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = step(batch)
            if i >= args.warmup:
                times[name].append(seconds)
            if device.type == "cuda":
                peaks[name] = torch.cuda.max_memory_allocated(device)
    median = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch * args.seq
    return {"shape": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "seq": args.seq,
                      "batch": args.batch, "dtype": str(dtype)},
            "median_step_s": {k: round(v, 4) for k, v in median.items()},
            "tokens_per_s": {k: round(tokens / v) for k, v in median.items()},
            "peak_allocated_gib": {k: round(v / 2**30, 2) for k, v in peaks.items()},
            "isolated_over_concat_time": round(median["isolated"] / median["concat"], 3)}


def main() -> None:
    if sys.argv[1:2] == ["_build"]:
        build_once(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["cache", "packing"])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    result = bench_cache(args) if args.what == "cache" else bench_packing(args)
    device = torch.device(args.device if args.what == "packing" else "cpu")
    print(json.dumps({"benchmark": args.what, **result, "device": device_name(device),
                      "versions": versions(("torch", "transformers", "datasets"))}, indent=2))


if __name__ == "__main__":
    main()
