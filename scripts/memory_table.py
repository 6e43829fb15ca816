"""Print the tables of docs/memory.md from the memory planner (no weights, no GPU needed).

    python scripts/memory_table.py              # planner tables + comparison with published figures
    python scripts/memory_table.py --cpu-check  # also measure host memory of a CPU training step

The CPU check runs a small Llama (hidden 512, 2 layers, vocab 8192) with NF4 + LoRA in fp32, with
gradient checkpointing, in fresh processes, and compares the peak RSS growth of one step with the
estimate's activations + logits, under glibc's default malloc and with MALLOC_MMAP_THRESHOLD_=1 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_lite.config import LoraConfig  # noqa: E402
from qlora_lite.memory import GB, GiB, estimate_memory, load_model_config  # noqa: E402

MODELS = ["llama-2-7b", "llama-2-13b", "llama-33b", "llama-65b", "llama-2-70b"]


def planner_table() -> str:
    rows = ["| model | r | seq | NF4 weights | 16-bit weights | LoRA + grads + Adam | activations + logits "
            "(peak phase) | total GiB | total GB | fits |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for model in MODELS:
        for r in (16, 64):
            for seq in (512, 2048):
                e = estimate_memory(model, seq_len=seq, batch_size=1, lora=LoraConfig(r=r, lora_alpha=2 * r))
                lora = e.lora_params + e.lora_grads + e.optimizer_states
                fits = next((f"{g} GiB" for g in (16, 24, 40, 48, 80) if e.total_bytes <= g * GiB), "> 80 GiB")
                rows.append(f"| {model} | {r} | {seq} | {e.quantized_weights / GiB:.2f} | {e.weights_16bit / GiB:.2f} "
                            f"| {lora / GiB:.2f} | {e.transient_bytes / GiB:.2f} ({e.peak_phase}) "
                            f"| {e.total_bytes / GiB:.2f} | {e.total_bytes / GB:.2f} | {fits} |")
    return "\n".join(rows)


def qlora_paper_table() -> str:
    """QLoRA (Dettmers et al. 2023): 33B fits 24 GB, 65B fits 48 GB; r=64, dropout 0.1, bf16 adapters."""
    rows = ["| model | GPU | LoRA dtype | seq × batch | total GiB (incl. 1 GiB overhead) | fits |", "|---|---|---|---|---|---|"]
    for model, gpu in (("llama-33b", 24), ("llama-65b", 48)):
        for dtype in ("bfloat16", "float32"):
            for seq in (512, 1024):
                lora = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, lora_dtype=dtype)
                e = estimate_memory(model, seq_len=seq, batch_size=1, lora=lora)
                rows.append(f"| {model} | {gpu} GB | {dtype} | {seq} × 1 | {e.total_bytes / GiB:.2f} "
                            f"| {'yes' if e.total_bytes <= gpu * GiB else 'no'} |")
    return "\n".join(rows)


def anchors_table() -> str:
    """tests/test_memory.py's ANCHORS: every published and measured footprint, our prediction and the ratio."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("test_memory", ROOT / "tests" / "test_memory.py")
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    rows = ["| anchor | conditions | quantity | figure | prediction | ratio | tolerance | source |",
            "|---|---|---|---|---|---|---|---|"]
    for anchor, model, cond, quantity, figure, tol, source in tests.ANCHORS:
        predicted = tests.anchor_prediction(model, cond, quantity)
        shown = {k: (v.r if k == "lora" else v) for k, v in cond.items()}
        cells = (f"{figure}", f"{predicted:.2f}" if quantity == "allocated" else f"{predicted:.0f}",
                 f"{predicted / figure:.3f}", f"{tol[0]}–{tol[1]}") if figure else (
            "fits" if quantity == "fits" else "OOM", f"{predicted:.3f} of the GPU", "", "≤ 1" if quantity == "fits" else "> 1")
        rows.append(f"| {anchor} | {model} {shown} | {quantity} | " + " | ".join(cells) + f" | {source} |")
    return "\n".join(rows)


CPU_STEP = """
import ctypes, gc, json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from qlora_lite.config import LoraConfig, QuantConfig
from qlora_lite.inject import inject_lora
from qlora_lite.memory import estimate_memory
from qlora_lite.monitor import MemoryMonitor
from qlora_lite.train import enable_checkpointing
batch, seq = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0); torch.set_num_threads(1)
cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=8192)
model = LlamaForCausalLM(cfg)
lora = LoraConfig(r=16, lora_dropout=0.05)
inject_lora(model, lora, QuantConfig())
enable_checkpointing(model)
model.train()
ids = torch.randint(0, 8192, (batch, seq))
model(input_ids=ids, labels=ids).loss.backward()
gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
monitor = MemoryMonitor("cpu")
before = monitor.mark("before")["rss_bytes"]
model(input_ids=ids, labels=ids).loss.backward()
growth = monitor.mark("step")["peak_rss_bytes"] - before
# the step above uses the model's own loss (full logits), so the estimate must too
est = estimate_memory(cfg, seq_len=seq, batch_size=batch, lora=lora, compute_dtype="float32", device="cpu",
                      loss_chunk_tokens=0)
print(json.dumps({"growth": growth, "predicted": est.transient_bytes, "phase": est.peak_phase}))
"""


def cpu_check() -> str:
    import torch

    rows = [f"torch {torch.__version__}, {os.cpu_count()} CPU cores; small Llama (hidden 512, 2 layers, vocab 8192), "
            "NF4 + LoRA r=16 (dropout 0.05) in fp32, gradient checkpointing",
            "| batch × seq | predicted activations + logits (MiB) | RSS growth, MALLOC_MMAP_THRESHOLD_=1MiB "
            "| ratio | RSS growth, glibc default | ratio |", "|---|---|---|---|---|---|"]
    for batch, seq in ((4, 256), (2, 1024), (1, 512), (8, 256)):
        results = []
        for env in ({"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}, {}):
            run = subprocess.run([sys.executable, "-c", CPU_STEP, str(batch), str(seq)], capture_output=True,
                                 text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, check=True)
            results.append(json.loads(run.stdout.strip().splitlines()[-1]))
        p = results[0]["predicted"]
        rows.append(f"| {batch} × {seq} | {p / 2**20:.1f} | {results[0]['growth'] / 2**20:.1f} "
                    f"| {results[0]['growth'] / p:.2f} | {results[1]['growth'] / 2**20:.1f} | {results[1]['growth'] / p:.2f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-check", action="store_true", help="also measure a CPU training step's host memory")
    args = parser.parse_args()
    print("## Planner: batch 1, LoRA on all linears (alpha 2r, dropout 0.05, fp32 adapters), bf16, paged AdamW 32-bit,"
          " checkpointing, CUDA context + 20% allocator slack\n")
    print(planner_table())
    print("\n## QLoRA paper setting (r=64, alpha 16, dropout 0.1)\n")
    print(qlora_paper_table())
    print("\n## Published and measured anchors (tests/test_memory.py)\n")
    print(anchors_table())
    if args.cpu_check:
        print("\n## CPU host memory: one training step\n")
        print(cpu_check())


if __name__ == "__main__":
    main()
