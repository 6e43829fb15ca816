"""Merge throughput and peak host memory: qlora_lite's streaming merge vs PEFT's merge_and_unload.

    base checkpoint + random LoRA adapter (r=16 on all 7 projections, PEFT format)
        │ each method runs in a fresh subprocess: same imports, baseline RSS taken after them,
        │ RSS sampled every 5 ms, wall time of load + merge + save
        ├─► qlora_lite.merge(base="quantized")  dequantize(quantize(W0)) + s·B·A, what QLoRA training saw
        ├─► qlora_lite.merge(base="original")   W0 + s·B·A, PEFT's arithmetic
        └─► PEFT: from_pretrained(dtype) ─► PeftModel.from_pretrained ─► merge_and_unload ─► save_pretrained

Throughput is output tensor bytes / wall seconds of the whole operation (imports excluded).

    python benchmarks/bench_merge.py                       # the embedded SmolLM2-135M (bf16, 269 MB)
    python benchmarks/bench_merge.py --synthetic-hidden 2048 --layers 16 --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _checkpoint import write_sharded  # benchmarks/ is on sys.path when run as a script

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_RUNNER = r"""
import json, sys, time
import psutil, torch
args = json.loads(sys.argv[1])
if args["threads"]:
    torch.set_num_threads(args["threads"])
import peft, accelerate, safetensors
from transformers import AutoModelForCausalLM, LlamaForCausalLM
from qlora_lite.merge import merge
from qlora_lite.rss import PeakRSS

with PeakRSS(interval=0.005) as rss:
    start = time.perf_counter()
    if args["method"] == "peft":
        model = AutoModelForCausalLM.from_pretrained(args["base"], dtype=getattr(torch, args["dtype"]))
        model = peft.PeftModel.from_pretrained(model, args["adapter"]).merge_and_unload()
        model.save_pretrained(args["out"], max_shard_size="2GB")
    else:
        merge(args["base"], args["adapter"], args["out"], dtype=args["dtype"], base=args["method"].split(":")[1],
              progress=False)
    seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "baseline_rss": rss.baseline, "peak_rss": rss.peak}))
"""


def synthetic_llama(directory: Path, hidden: int, layers: int, vocab: int = 32000, shard_bytes: int = 1_000_000_000):
    """A random Llama-shaped bf16 checkpoint (intermediate 8/3·hidden rounded to 256), written shard by shard."""
    from transformers import LlamaConfig

    inter = int(math.ceil(hidden * 8 / 3 / 256) * 256)
    heads = max(1, hidden // 128)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         tie_word_embeddings=False, dtype="bfloat16")
    config.save_pretrained(directory)
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.self_attn.{n}.weight": (hidden, hidden) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        shapes |= {f"{p}.mlp.gate_proj.weight": (inter, hidden), f"{p}.mlp.up_proj.weight": (inter, hidden),
                   f"{p}.mlp.down_proj.weight": (hidden, inter), f"{p}.input_layernorm.weight": (hidden,),
                   f"{p}.post_attention_layernorm.weight": (hidden,)}
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    generator = torch.Generator().manual_seed(0)
    write_sharded(directory, shapes, shard_bytes, lambda _, shape: (
        torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16))


def random_adapter(base: Path, directory: Path, rank: int = 16) -> int:
    """PEFT-format adapter on every projection: A ~ U(±1/√in), B ~ N(0, 1e-3). Returns its module count."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    generator, tensors = torch.Generator().manual_seed(0), {}
    for file in sorted(base.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                if key.rsplit(".", 2)[-2] in PROJECTIONS:
                    out_f, in_f = handle.get_slice(key).get_shape()
                    module = f"base_model.model.{key.removesuffix('.weight')}"
                    a = (torch.rand(rank, in_f, generator=generator) * 2 - 1) / math.sqrt(in_f)
                    tensors[f"{module}.lora_A.weight"] = a
                    tensors[f"{module}.lora_B.weight"] = torch.randn(out_f, rank, generator=generator) * 1e-3
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), {"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": list(PROJECTIONS), "bias": "none", "use_rslora": False}))
    return len(tensors) // 2


def run(method: str, base: Path, adapter: Path, out: Path, dtype: str, threads: int) -> dict:
    args = {"method": method, "base": str(base), "adapter": str(adapter), "out": str(out), "dtype": dtype,
            "threads": threads}
    done = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    result["gb_per_s"] = result["bytes"] / result["seconds"] / 1e9
    result["peak_growth"] = result["peak_rss"] - result["baseline_rss"]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a HF checkpoint directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--synthetic-hidden", type=int, help="instead, a random bf16 Llama with this hidden size")
    parser.add_argument("--layers", type=int, default=8, help="layers of the synthetic model")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per method; the fastest is reported")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    opts = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_merge_") as tmp:
        tmp = Path(tmp)
        if opts.synthetic_hidden:
            base = tmp / "base"
            base.mkdir()
            synthetic_llama(base, opts.synthetic_hidden, opts.layers)
            model_name = f"synthetic Llama hidden {opts.synthetic_hidden}, {opts.layers} layers (bf16)"
        else:
            from qlora_lite.embedded import embedded_model_dir

            base = Path(opts.model) if opts.model else embedded_model_dir()
            model_name = str(base) if opts.model else "embedded SmolLM2-135M-Instruct (bf16)"
        modules = random_adapter(base, tmp / "adapter", opts.rank)
        base_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        results = {}
        for method in ("qlora_lite:quantized", "qlora_lite:original", "peft"):
            runs = []
            for i in range(opts.repeats):
                runs.append(run(method, base, tmp / "adapter", tmp / f"out-{method.replace(':', '-')}-{i}", opts.dtype,
                                opts.threads))
            results[method] = min(runs, key=lambda r: r["seconds"])

    from importlib.metadata import version

    import peft
    import transformers

    peft_result = results["peft"]
    for r in results.values():
        r["time_vs_peft"] = r["seconds"] / peft_result["seconds"]
        r["memory_vs_peft"] = r["peak_growth"] / peft_result["peak_growth"]
    summary = {
        "model": model_name, "base_bytes": base_bytes, "adapter_modules": modules, "rank": opts.rank,
        "dtype": opts.dtype, "threads": opts.threads or torch.get_num_threads(), "repeats": opts.repeats,
        "device": f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "qlora_lite": version("qlora-lite"), "python": platform.python_version()},
        "results": results,
    }
    if opts.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{model_name}: {base_bytes / 1e6:.0f} MB base, LoRA r={opts.rank} on {modules} modules, "
              f"-> {opts.dtype}, {summary['threads']} torch threads")
        print(f"{'method':24} {'wall s':>8} {'GB/s':>7} {'peak RSS +MB':>13} {'time/PEFT':>10} {'mem/PEFT':>9}")
        for method, r in results.items():
            print(f"{method:24} {r['seconds']:8.2f} {r['gb_per_s']:7.3f} {r['peak_growth'] / 1e6:13.0f} "
                  f"{r['time_vs_peft']:10.2f} {r['memory_vs_peft']:9.2f}")
    return summary


if __name__ == "__main__":
    main()
