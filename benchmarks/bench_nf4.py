"""NF4 kernel throughput: quantize and dequantize with the backends of `qlora_lite.nf4.NF4Weight`.

    W (randn · 0.02, fp32 on CPU / bf16 on CUDA)
      ├─► NF4Weight.from_tensor(W, backend="torch") | bitsandbytes' quantize_4bit   quantize (blocksize 64, double quant)
      ├─► .dequantize(W.dtype)                                          dequantize back to W's dtype
      │     (torch backend also with cache_absmax=False: the double-quant absmax decoded on every call;
      │      on CUDA with triton also the triton backend's one-launch dequantize of bitsandbytes' bytes)
      └─► W.clone()                                                     the device's copy bandwidth, same run

GB/s = bytes of the 16-bit (CUDA) or fp32 (CPU) tensor / seconds: the tensor read by a quantize,
the tensor written by a dequantize or a clone (a clone also reads as many bytes; a dequantize reads
~0.52 bytes per value). "of copy" = a dequantize's GB/s / the clone's GB/s (issue 17's lever: the
triton dequantize at >= 80% of it). Each figure is the median of --repeats timed calls after one
warm-up call. The backends' packed bytes and dequantized values are compared as a check.

Usage:

    python benchmarks/bench_nf4.py                 # device auto: CUDA if available, else CPU
    python benchmarks/bench_nf4.py --device cpu --threads 1 --json
    python benchmarks/bench_nf4.py --shapes 4096x4096 8192x28672
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from _env import device_name, versions  # benchmarks/ is on sys.path when run as a script

DEFAULT_SHAPES = ("4096x4096", "11008x4096")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` calls after one warm-up call, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        del result
        _sync(device)
        t = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def _bitsandbytes_quantize(weight: torch.Tensor):
    """bitsandbytes' own quantize kernel (NF4Weight's bitsandbytes backend uses ours on CPU, where it
    writes the same bytes faster), wrapped for its dequantize kernel."""
    import bitsandbytes.functional as bnbf

    from qlora_lite.nf4 import NF4Weight

    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    return NF4Weight(packed, state.absmax, weight.shape, weight.dtype, 64, state.state2.absmax,
                     state.offset.float().reshape(()), "bitsandbytes")


def bench_shape(shape: tuple[int, int], device: torch.device, dtype: torch.dtype, repeats: int, seed: int) -> dict:
    from qlora_lite.nf4 import NF4Weight, triton_available

    generator = torch.Generator(device=device).manual_seed(seed)
    weight = (torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * 0.02).to(dtype)
    nbytes = weight.numel() * weight.element_size()
    row = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "tensor_bytes": nbytes, "backends": {}}
    quantized = {}
    quantizers = {"torch": lambda: NF4Weight.from_tensor(weight, backend="torch"),
                  "bitsandbytes": lambda: _bitsandbytes_quantize(weight)}
    for backend, quantize in quantizers.items():
        q_s, q = timed(quantize, device, repeats)
        d_s, out = timed(lambda q=q: q.dequantize(dtype), device, repeats)
        quantized[backend] = (q, out)
        row["backends"][backend] = {"quantize_s": q_s, "quantize_gb_s": nbytes / q_s / 1e9, "dequantize_s": d_s,
                                    "dequantize_gb_s": nbytes / d_s / 1e9, "bits_per_param": q.bits_per_param}
    # the decoded double-quant absmax is cached on CPU (NF4Weight.block_absmax); the same call decoding it every time:
    torch_q = quantized["torch"][0]
    torch_q.cache_absmax = False
    u_s, _ = timed(lambda: torch_q.dequantize(dtype), device, repeats)
    torch_q.cache_absmax = None
    row["backends"]["torch"]["dequantize_absmax_decoded_each_call_s"] = u_s
    c_s, _ = timed(lambda: weight.clone(), device, repeats)
    row.update(clone_s=c_s, clone_gb_s=nbytes / c_s / 1e9)
    (qt, dt), (qb, db) = quantized["torch"], quantized["bitsandbytes"]
    checks = {}
    if device.type == "cuda" and triton_available():  # bitsandbytes' bytes, our one-launch kernel
        ours = qb.with_backend("triton")
        d_s, out = timed(lambda: ours.dequantize(dtype), device, repeats)
        row["backends"]["triton"] = {"dequantize_s": d_s, "dequantize_gb_s": nbytes / d_s / 1e9,
                                     "bits_per_param": ours.bits_per_param}
        checks["triton_bytes_equal_bitsandbytes"] = bool(torch.equal(out.view(torch.uint8), db.view(torch.uint8)))
    for r in row["backends"].values():
        r["dequantize_of_copy"] = r["dequantize_gb_s"] / row["clone_gb_s"]
    row["check"] = {**checks,
        "packed_bytes_equal": bool(torch.equal(qt.packed, qb.packed)),
        "absmax_codes_equal": bool(torch.equal(qt.absmax, qb.absmax)),
        "dequantized_max_abs_diff": float((dt.float() - db.float()).abs().max()),
        "mean_abs_error_vs_input": float((db.float() - weight.float()).abs().mean()),
    }
    return row




def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="OUTxIN, e.g. 11008x4096")
    parser.add_argument("--repeats", type=int, help="timed calls per figure (default: 3 on CPU, 20 on CUDA)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    opts = parser.parse_args(argv)

    device = torch.device("cuda" if opts.device == "auto" and torch.cuda.is_available() else
                          "cpu" if opts.device == "auto" else opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    repeats = opts.repeats or (20 if device.type == "cuda" else 3)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = [tuple(int(x) for x in s.lower().split("x")) for s in opts.shapes]

    load_before = [round(x, 2) for x in os.getloadavg()]
    rows = [bench_shape(shape, device, dtype, repeats, opts.seed) for shape in shapes]
    summary = {"device": device_name(device), "device_type": device.type, "threads": torch.get_num_threads(),
               "repeats": repeats, "versions": versions(("torch", "bitsandbytes", "triton", "qlora-lite")), "load_average_before": load_before,
               "load_average_after": [round(x, 2) for x in os.getloadavg()], "results": rows}
    if opts.json:
        print(json.dumps(summary, indent=2))
        return summary
    print(f"{summary['device']}, {summary['threads']} threads, median of {repeats}, load average "
          f"{load_before} -> {summary['load_average_after']}")
    print(f"{'shape':<12}{'dtype':<10}{'backend':<14}{'quant ms':>10}{'GB/s':>8}{'dequant ms':>12}{'GB/s':>8}"
          f"{'of copy':>9}{'clone GB/s':>12}")
    for row in rows:
        shape = "x".join(map(str, row["shape"]))
        for backend, r in row["backends"].items():
            quantize = (f"{1e3 * r['quantize_s']:>10.1f}{r['quantize_gb_s']:>8.2f}" if "quantize_s" in r
                        else f"{'(bnb)':>10}{'':>8}")  # triton dequantizes bitsandbytes' bytes
            print(f"{shape:<12}{row['dtype']:<10}{backend:<14}{quantize}{1e3 * r['dequantize_s']:>12.1f}"
                  f"{r['dequantize_gb_s']:>8.2f}{100 * r['dequantize_of_copy']:>8.0f}%{row['clone_gb_s']:>12.2f}")
        print(f"{'':<12}torch dequantize decoding the absmax on every call (no cache): "
              f"{1e3 * row['backends']['torch']['dequantize_absmax_decoded_each_call_s']:.1f} ms")
        c = row["check"]
        print(f"{'':<12}check: packed bytes equal {c['packed_bytes_equal']}, absmax codes equal "
              f"{c['absmax_codes_equal']}, dequantized max |diff| {c['dequantized_max_abs_diff']:.3g}, "
              f"mean |error| vs input {c['mean_abs_error_vs_input']:.3g}"
              + (f", triton bytes = bitsandbytes' {c['triton_bytes_equal_bitsandbytes']}"
                 if "triton_bytes_equal_bitsandbytes" in c else ""))
    return summary


if __name__ == "__main__":
    main()
