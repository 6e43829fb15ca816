"""Ours on CUDA with and without the fast paths of kernels.py: plain torch, Liger's fused kernels, regional compile.

    a Llama at a real width (--width 7b) with --layers decoder layers, random bf16 weights built on the GPU,
    LoRA r=16 on the seven projections (bf16 A/B), --quant nf4 (the default backend, as train runs: the
    one-launch dequantize where triton imports) or none (16-bit bases: isolates the ops around the
    matmuls), non-reentrant checkpointing + the chunked loss
        ▼
    per variant (eager | lean: PyTorch's fused RMSNorm + the lean RoPE, train's CUDA default | liger |
    compile | their combinations joined by +), in one process, same tokens:
      median step time (forward → backward) over --steps after --warmup, CUDA kernels per step
      (torch.profiler, one extra step), peak allocated memory; ratios against eager

    python benchmarks/bench_fused.py --seq 2048 --layers 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _env import versions  # noqa: E402
from bench_train import SHAPES  # noqa: E402

from qlora_lite.config import LoraConfig, QuantConfig  # noqa: E402
from qlora_lite.inject import inject_lora  # noqa: E402
from qlora_lite.kernels import apply_fused_kernels, apply_lean_ops, compile_decoder_layers  # noqa: E402
from qlora_lite.loss import install_chunked_loss  # noqa: E402
from qlora_lite.train import enable_checkpointing  # noqa: E402


def build(opts):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**SHAPES[opts.width], "num_hidden_layers": opts.layers}, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    quant = QuantConfig() if opts.quant == "nf4" else None
    inject_lora(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, lora_dtype="bfloat16"), quant)
    enable_checkpointing(model)
    install_chunked_loss(model, 1024)
    return model.train()


def measure(variant: str, opts, ids) -> dict:
    torch._dynamo.reset()
    model = build(opts)
    if "liger" in variant:
        apply_fused_kernels(model, True, "cuda")
    if "lean" in variant:  # train's default on CUDA, for what Liger did not take (the norms only under compile)
        apply_lean_ops(model, True, "cuda", rope="compile" not in variant)
    if "compile" in variant:
        compile_decoder_layers(model)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    first = step()
    first_s = time.perf_counter() - t0
    for _ in range(opts.warmup):
        step()
    times = []
    for _ in range(opts.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    from torch.autograd import DeviceType

    on_gpu = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    kernels, kernel_ms = len(on_gpu), sum(e.time_range.elapsed_us() for e in on_gpu) / 1e3
    out = {"variant": variant, "step_ms": 1e3 * statistics.median(times), "first_step_s": first_s,
           "kernels_per_step": kernels, "kernel_ms": kernel_ms,
           "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": first}
    del model
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--quant", choices=["nf4", "none"], default="none")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variants", default="eager,lean,liger,compile,lean+compile,liger+compile")
    opts = parser.parse_args()
    ids = torch.randint(0, SHAPES[opts.width]["vocab_size"], (opts.batch, opts.seq),
                        generator=torch.Generator().manual_seed(0)).cuda()
    results = []
    for variant in opts.variants.split(","):
        try:
            results.append(measure(variant, opts, ids))
        except Exception as exc:  # one failing variant must not hide the others' figures
            results.append({"variant": variant, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        print(json.dumps(results[-1]), flush=True)
    base = next((r for r in results if r["variant"] == "eager" and "step_ms" in r), None)
    print(f"{torch.cuda.get_device_name()}, {opts.width} width, {opts.layers} layers, seq {opts.seq} x {opts.batch}, "
          f"bases {opts.quant}; {versions(('torch', 'transformers', 'triton', 'liger-kernel'))}")
    for r in results:
        if "step_ms" not in r:
            print(f"{r['variant']:<16} failed: {r['error']}")
            continue
        speed = f"{base['step_ms'] / r['step_ms']:.3f}x" if base else "-"
        print(f"{r['variant']:<16} step {r['step_ms']:8.2f} ms ({speed} eager)  kernels {r['kernels_per_step']:6d} "
              f"({r['kernel_ms']:.1f} ms)  peak {r['peak_allocated_gib']:.2f} GiB  first step {r['first_step_s']:.1f} s")


if __name__ == "__main__":
    main()
