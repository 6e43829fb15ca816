"""A model bigger than the card: the NF4 base in host memory (offload_base), trained on a capped GPU (issue 18).

    --shape 70b (Llama-2-70B: 80 layers, hidden 8192, GQA 8) built on the meta device, then
        │ every linear's NF4 storage (packed codes, 8-bit block scales, fp32 nested scales) allocated in host
        │ memory and filled with random codes drawn on --device (no checkpoint on disk: a 70B in bf16 is 138 GB);
        │ embeddings, norms, head (random bf16, N(0, 0.02)) and LoRA (r=16, α=32, all linears) on --device
        ▼
    install_base_offload (each layer's NF4 tensors in one page-locked host buffer, fetched layer by layer one
    ahead on a side stream) + checkpointing + the chunked loss + train.build_optimizer (paged AdamW on CUDA)
        ▼
    --cap-gib 24: torch.cuda.set_per_process_memory_fraction (an RTX 4090 emulated); warmup + steps at
    --seq × --batch: forward → backward → clip 0.3 → optimizer; tokens/s, peak allocated / reserved, bytes
    fetched per step, beside the planner (estimate_memory(offload_base=True)): GPU bytes, pinned host bytes,
    copy time at 25 GB/s, and the compute bound 6·N FLOPs per token at the card's peak.

    python benchmarks/bench_offload_base.py --shape 70b --seq 2048 --cap-gib 24      # a GPU, ~100 GB host RAM
    python benchmarks/bench_offload_base.py --shape tiny --device cpu --seq 32        # the CPU smoke

One JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import SHAPES, device_peak, llama_config  # noqa: E402  (benchmarks/ is on sys.path)

GiB = 1024**3
NESTED_SCALE, SCALE_OFFSET = 0.01, 0.02  # block scales = code · 0.01 + 0.02 ∈ [0.01, 0.03]: weights of std ≈ 0.01


def _fill_random_nf4(weight, generator: torch.Generator, draw: torch.device) -> None:
    """Random 4-bit codes and 8-bit scale codes, drawn on `draw` and copied into the host storage."""
    for tensor in (weight.packed, weight.absmax_raw):
        tensor.copy_(torch.randint(0, 256, tensor.shape, dtype=torch.uint8, device=draw, generator=generator))
    weight.nested_absmax.fill_(NESTED_SCALE)
    weight.offset.fill_(SCALE_OFFSET)


def random_nf4_model(shape: str, r: int, device: torch.device, compute: torch.dtype, seed: int) -> nn.Module:
    """The `shape` Llama with its linears in NF4, random, their storage in host memory; the rest on `device`."""
    from qlora_lite.config import LoraConfig
    from qlora_lite.inject import find_targets, freeze_base, make_lora_layer, replace_module
    from qlora_lite.load import meta_model
    from qlora_lite.nf4 import NF4Weight, resolve_backend

    model = meta_model(llama_config(shape), compute)  # parameters on meta; buffers (rotary frequencies) real
    lora = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear")
    generator = torch.Generator(device=device).manual_seed(seed)
    backend = resolve_backend("auto", device)
    for name in find_targets(model, "all-linear"):
        linear = model.get_submodule(name)
        base = NF4Weight.empty(linear.weight.shape, compute, 64, True, backend, device="cpu")
        _fill_random_nf4(base, generator, device)
        replace_module(model, name, make_lora_layer(base, None, lora, compute_dtype=compute, device=device))
    for module in model.modules():  # embeddings, norms, head: drawn on the device
        for pname, param in module.named_parameters(recurse=False):
            if param.is_meta:
                value = (torch.ones(param.shape, dtype=compute, device=device) if "norm" in pname or param.dim() == 1
                         else torch.randn(param.shape, dtype=compute, device=device, generator=generator) * 0.02)
                module._parameters[pname] = nn.Parameter(value, requires_grad=False)
    freeze_base(model)
    model.config.use_cache = False
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def planned(shape: str, seq: int, batch: int, r: int, device: torch.device, loss_chunk_tokens: int) -> dict:
    from qlora_lite.config import LoraConfig
    from qlora_lite.memory import estimate_memory

    kind = "cuda" if device.type == "cuda" else "cpu"
    est = estimate_memory(llama_config(shape), seq_len=seq, batch_size=batch, device=kind,
                          lora=LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear"),
                          compute_dtype="bfloat16" if kind == "cuda" else "float32", offload_base=True,
                          loss_chunk_tokens=loss_chunk_tokens)
    return {"allocated_bytes": est.allocated_bytes if kind == "cuda" else est.total_bytes,
            "required_bytes": est.required_bytes, "pinned_host_bytes": est.pinned_host_bytes,
            "transfer_bytes": est.transfer_bytes, "transfer_s": est.transfer_seconds,
            "quantized_weights_bytes": est.quantized_weights}


def run(opts) -> dict:
    from qlora_lite.config import TrainConfig
    from qlora_lite.loss import install_chunked_loss
    from qlora_lite.offload import install_base_offload
    from qlora_lite.train import build_optimizer, enable_checkpointing

    device = torch.device(opts.device)
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    out: dict = {"shape": opts.shape, "seq": opts.seq, "batch": opts.batch, "r": opts.r, "device": str(device),
                 "planner": planned(opts.shape, opts.seq, opts.batch, opts.r, device, opts.loss_chunk_tokens)}
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
        out["peak_flops"], out["peak_source"] = device_peak(device, 0)
        if opts.cap_gib:
            index = device.index if device.index is not None else torch.cuda.current_device()
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, opts.cap_gib * GiB / total), index)
            out["cap_bytes"] = int(opts.cap_gib * GiB)
    t0 = time.perf_counter()
    model = random_nf4_model(opts.shape, opts.r, device, compute, opts.seed)
    out["build_s"] = time.perf_counter() - t0
    enable_checkpointing(model)
    t0 = time.perf_counter()
    offloader = install_base_offload(model, device)
    out.update(install_s=time.perf_counter() - t0, host_bytes=offloader.host_bytes, layers=len(offloader.layers))
    if opts.loss_chunk_tokens:
        install_chunked_loss(model, opts.loss_chunk_tokens)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    cfg = TrainConfig(max_steps=opts.warmup + opts.steps, warmup_steps=1, learning_rate=2e-4, device=device.type,
                      progress=False)
    optimizer = build_optimizer(trainable, cfg, device, log=lambda msg: print(msg, file=sys.stderr))
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n) + sum(
        math.prod(layer.weight.shape) for layer in model.modules() if hasattr(layer, "quantized") and layer.quantized)
    vocab = SHAPES[opts.shape]["vocab_size"]
    data = torch.randint(0, vocab, (opts.warmup + opts.steps, opts.batch, opts.seq),
                         generator=torch.Generator().manual_seed(opts.seed))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses, fetched = [], [], []
    try:
        for ids in data:
            ids = ids.to(device)
            _sync(device)
            t, before = time.perf_counter(), offloader.fetched_bytes
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 0.3)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            _sync(device)
            times.append(time.perf_counter() - t)
            fetched.append(offloader.fetched_bytes - before)
    except torch.OutOfMemoryError as exc:
        out.update(oom=True, oom_message=str(exc).splitlines()[0][:300])
    out.update(losses=losses, step_times_s=times, fetched_bytes_per_step=fetched[-1] if fetched else None,
               peak_resident_base_bytes=offloader.peak_resident_bytes, oom=out.get("oom", False))
    timed = times[opts.warmup:]
    if timed and not out["oom"]:
        step_s = statistics.median(timed)
        out.update(step_s=step_s, tokens_per_s=opts.batch * opts.seq / step_s)
        if "peak_flops" in out:  # 6·N FLOPs per token: the compute-bound step at the card's peak
            bound_s = 6 * n_matmul * opts.batch * opts.seq / out["peak_flops"]
            out.update(compute_bound_step_s=bound_s, step_over_bound=step_s / bound_s)
    if device.type == "cuda":
        out.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
                   peak_reserved_bytes=torch.cuda.max_memory_reserved(device))
        out["predicted_over_measured"] = out["planner"]["allocated_bytes"] / out["peak_allocated_bytes"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="70b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cap-gib", type=float, default=24.0, help="CUDA: cap the card at this many GiB; 0: none")
    parser.add_argument("--loss-chunk-tokens", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(argv)
    result = run(opts)
    print(json.dumps(result))
    return 1 if result["oom"] or len(result["losses"]) < opts.warmup + opts.steps else 0


if __name__ == "__main__":
    sys.exit(main())
