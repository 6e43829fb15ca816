"""Training throughput and peak memory: qlora-lite vs transformers + bitsandbytes + PEFT (issue 8).

    --shape (tiny | 1b | 7b | 13b | llama3-8b | 70b): a Llama-shape config written in code
        │ built on the meta device, written once as random bf16 safetensors, shard by shard
        │ (host memory: one shard + one tensor), into --cache (default ~/.cache/qlora-lite/bench/<shape>);
        │ --draw-device cuda draws the tensors on the GPU (seconds for a 7B instead of minutes)
        ▼
    one subprocess per side, same random tokens (fixed seed), same r / seq / batch / steps:
      ours  load_model(QuantConfig(), LoraConfig(r, alpha=2r, dropout 0, "all-linear"))
            + non-reentrant gradient checkpointing + the chunked loss (--loss-chunk-tokens, as train)
            + qlora_lite.train.build_optimizer
            (paged_adamw_32bit on CUDA, AdamW on CPU); compute dtype bf16 on CUDA, fp32 on CPU
      peer  from_pretrained(BitsAndBytesConfig(nf4, double quant, compute dtype as ours))
            + prepare_model_for_kbit_training (non-reentrant checkpointing) + PEFT LoRA on the seven
            projections + bnb.optim.PagedAdamW32bit on CUDA / torch AdamW on CPU; bf16 autocast on CUDA
      both  warmup_steps + steps of: forward (labels = inputs) → backward → clip 0.3 → optimizer →
            LambdaLR(qlora_lite.train.lr_lambda) → zero_grad; the peer stays in train mode throughout
        ▼
    --rows 2048x1,512x4: several (seq x batch) runs in one load per side (the default: --seq x --batch);
    --memory-cap-gib 24: torch.cuda.set_per_process_memory_fraction, a consumer card emulated; a row that
    runs out of memory is recorded as such and the next row goes on
    per row and side: median step time, tokens/s, peak memory (CUDA: allocated and reserved during the steps;
    CPU: the kernel's exact peak RSS, qlora_lite.rss.PeakRSS), load + quantize time, first/last loss;
    ratios ours/peer; the physical bound 6·N FLOPs per token (N = parameters in matmuls: every linear
    and the LM head, not the embedding lookup; attention-score FLOPs are left out) at the device's
    peak (bf16 table for GPUs; a measured fp32 matmul on CPU, the dtype the CPU runs compute in);
    the planner's predicted peak for ours (qlora_lite.memory.estimate_memory, same run) and predicted/measured.

Usage:

    python benchmarks/bench_train.py --device cpu --shape tiny           # ~1-2 min on 2 idle cores
    python benchmarks/bench_train.py --shape 7b --seq 2048 --batch 1      # the issue's H100 targets
    python benchmarks/bench_train.py --shape 7b --rows 2048x1,512x4 --draw-device cuda --json
    python benchmarks/bench_train.py --shape 13b --seq 512 --batch 1
    python benchmarks/bench_train.py --shape 70b --seq 512 --batch 1      # ~138 GB of bf16 on disk
    python benchmarks/bench_train.py --shape tiny --device cpu --profile   # ours only: top ops of one step

Internal: `--side ours|peer` runs one side in this process and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _checkpoint import write_sharded  # benchmarks/ is on sys.path when run as a script
from _env import device_name, versions

from qlora_lite.rss import PeakRSS

SHAPES: dict[str, dict] = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000),
}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Dense bf16 peak FLOP/s by device name (substring match, first hit wins).
PEAK_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("A100", 312e12),
             ("4090", 165e12)]
DEFAULTS = {"cpu": dict(seq=128, batch=2, warmup=2, steps=5), "cuda": dict(seq=2048, batch=1, warmup=3, steps=10)}
SHARD_BYTES = 2 * 10**9
COMPLETE = ".complete"
GiB = 1024**3


# ---- the synthetic checkpoint --------------------------------------------------------------------

def llama_config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], max_position_embeddings=131072 if shape == "llama3-8b" else 4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="bfloat16")


def param_shapes(shape: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of the state dict and its shape, from the model built on the meta device."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(shape))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def build_checkpoint(shape: str, directory: Path, seed: int = 0, log=print, draw_device: str = "cpu") -> float:
    """Write the random bf16 checkpoint once (temp dir + rename; a marker file says it is complete).

    Linear weights and embeddings ~ N(0, 0.02²), norms = 1, drawn on `draw_device` (the values depend
    on it: a CUDA generator is not the CPU one). Returns the seconds spent (0 if cached).
    """
    if (directory / COMPLETE).is_file():
        return 0.0
    t0 = time.perf_counter()
    shapes = param_shapes(shape)
    total = sum(math.prod(s) * 2 for s in shapes.values())
    directory.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory.parent).free
    if free < total * 1.02 + 2**30:
        raise SystemExit(f"{shape}: the bf16 checkpoint needs {total / 1e9:.1f} GB but {directory.parent} has "
                         f"{free / 1e9:.1f} GB free; pass --cache on a larger disk")
    log(f"writing a random {shape} checkpoint ({total / 1e9:.2f} GB bf16) to {directory} ...")
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    llama_config(shape).save_pretrained(tmp)
    generator = torch.Generator(draw_device).manual_seed(seed)

    def random_tensor(_: str, dims: tuple[int, ...]) -> torch.Tensor:  # straight in bf16: no fp32 copy
        t = torch.empty(dims, dtype=torch.bfloat16, device=draw_device)
        return (t.fill_(1.0) if len(dims) == 1 else t.normal_(0.0, 0.02, generator=generator)).cpu()

    write_sharded(tmp, shapes, SHARD_BYTES, random_tensor)
    (tmp / COMPLETE).write_text(json.dumps({"shape": shape, "seed": seed, "bytes": total, "drawn_on": draw_device}))
    shutil.rmtree(directory, ignore_errors=True)  # an incomplete earlier attempt
    tmp.rename(directory)
    return time.perf_counter() - t0


# ---- one side, in its own process ------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load_ours(path: Path, opts, device: torch.device, compute: torch.dtype):
    from qlora_lite.config import LoraConfig, QuantConfig, TrainConfig
    from qlora_lite.kernels import apply_speedups
    from qlora_lite.load import load_model
    from qlora_lite.loss import install_chunked_loss
    from qlora_lite.offload import install_activation_offload, install_tiled_mlp
    from qlora_lite.train import build_optimizer, enable_checkpointing, lr_lambda

    model, _ = load_model(path, QuantConfig(), LoraConfig(r=opts.r, lora_alpha=2 * opts.r, lora_dropout=0.0,
                                                          target_modules="all-linear"),
                          device=device, compute_dtype=compute, with_tokenizer=False)
    enable_checkpointing(model)
    # train's defaults: no Liger, no compile, the lean ops on CUDA (lean_ops: auto)
    apply_speedups(model, False, False, device, log=lambda msg: print(msg, file=sys.stderr))
    if opts.loss_chunk_tokens:
        install_chunked_loss(model, opts.loss_chunk_tokens)
    if opts.mlp_chunk_tokens:  # long context (issue 18), as TrainingRun.setup_optimizer installs them
        install_tiled_mlp(model, opts.mlp_chunk_tokens)
    if opts.offload_activations:
        install_activation_offload(model, device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    cfg = TrainConfig(max_steps=_total_steps(opts), warmup_steps=min(opts.warmup, 10),
                      optimizer="paged_adamw_32bit", learning_rate=2e-4, device=device.type, progress=False)
    optimizer = build_optimizer(trainable, cfg, device, log=lambda msg: print(msg, file=sys.stderr))
    return model, trainable, optimizer, lr_lambda(cfg), None


def _load_peer(path: Path, opts, device: torch.device, compute: torch.dtype):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_lite.config import TrainConfig
    from qlora_lite.train import lr_lambda

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    device_map = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=quant, dtype=compute,
                                                 device_map=device_map)
    # Train mode from the start: bnb's Linear4bit.forward in eval mode with a no-grad input repacks the
    # weight into a CPU-only layout on AVX512-BF16 CPUs, after which training is wrong.
    model.train()
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=opts.r, lora_alpha=2 * opts.r, lora_dropout=0.0,
                                             target_modules=PROJECTIONS, bias="none", task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW32bit(trainable, lr=2e-4, weight_decay=0.0)
        autocast = compute  # HF Trainer's bf16=True: the upcast fp32 embeddings/head run under autocast
    else:  # bnb's paged optimizers fall back to non-paged on CPU; torch AdamW is the like-for-like choice
        optimizer = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.0)
        autocast = None
    cfg = TrainConfig(max_steps=_total_steps(opts), warmup_steps=min(opts.warmup, 10),
                      learning_rate=2e-4, device=device.type, progress=False)
    return model, trainable, optimizer, lr_lambda(cfg), autocast


def _top_ops(prof, device: torch.device, limit: int) -> tuple[str, list[dict]]:
    events = prof.key_averages()
    cuda = device.type == "cuda"
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = events.table(sort_by=key, row_limit=limit)
    rows = sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)[:limit]
    top = [{"op": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
            **({"self_device_ms": round(getattr(e, "self_device_time_total", 0.0) / 1e3, 3)} if cuda else {})}
           for e in rows]
    return table, top


def _total_steps(opts) -> int:
    return len(opts.rows) * (opts.warmup + opts.steps) + 2


def run_side(opts) -> dict:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    import bitsandbytes  # noqa: F401  (imports before the RSS baseline, same set for both sides)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import qlora_lite.load  # noqa: F401

    device = torch.device(opts.device)
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    gpu = {}
    if device.type == "cuda":  # measured here, not in the parent, which never creates a CUDA context
        peak_flops, peak_source = device_peak(device, opts.threads)
        gpu = {"device_name": torch.cuda.get_device_name(device), "peak_flops": peak_flops, "peak_source": peak_source}
        torch.cuda.empty_cache()
        if opts.memory_cap_gib:
            total = torch.cuda.get_device_properties(device).total_memory
            index = device.index if device.index is not None else torch.cuda.current_device()  # "cuda" has none
            torch.cuda.set_per_process_memory_fraction(min(1.0, opts.memory_cap_gib * GiB / total), index)
            gpu["memory_cap_bytes"] = int(opts.memory_cap_gib * GiB)
    torch.manual_seed(opts.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    loader = _load_ours if opts.side == "ours" else _load_peer
    with PeakRSS() as rss:
        model, trainable, optimizer, factor, autocast = loader(Path(opts.cache), opts, device, compute)
        _sync(device)
    load_s, load_peak = time.perf_counter() - t0, rss.peak
    out = {"side": opts.side, "load_s": load_s, "baseline_rss_bytes": rss.baseline, "load_peak_rss_bytes": load_peak,
           "peak_rss_exact": rss.exact,
           "trainable_params": sum(p.numel() for p in trainable), "threads": torch.get_num_threads(), **gpu}
    if device.type == "cuda":
        out.update(load_peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
                   after_load_allocated_bytes=torch.cuda.memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
    out["load_peak_bytes"] = out.get("load_peak_allocated_bytes", load_peak)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    vocab = SHAPES[opts.shape]["vocab_size"]

    def step(ids: torch.Tensor) -> float:
        ids = ids.to(device)
        if autocast is not None:
            with torch.autocast(device.type, dtype=autocast):
                loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.3)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    out["rows"] = [_run_row(step, seq, batch, vocab, opts, device) for seq, batch in opts.rows]
    if opts.profile:
        from torch.profiler import ProfilerActivity, profile

        seq, batch = opts.rows[0]
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(opts.seed))
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step(ids)
            _sync(device)
        table, top = _top_ops(prof, device, opts.profile_rows)
        out.update(profile_table=table, profile_top=top)
    return out


def _run_row(step, seq: int, batch: int, vocab: int, opts, device: torch.device) -> dict:
    """warmup + steps at (seq, batch); peaks are this row's alone. Running out of memory is a result."""
    data = torch.randint(0, vocab, (opts.warmup + opts.steps, batch, seq),
                         generator=torch.Generator().manual_seed(opts.seed))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    row: dict = {"seq": seq, "batch": batch}
    times, losses = [], []
    with PeakRSS() as rss:
        try:
            for i in range(opts.warmup + opts.steps):
                _sync(device)
                t = time.perf_counter()
                losses.append(step(data[i]))
                _sync(device)
                times.append(time.perf_counter() - t)
        except torch.OutOfMemoryError as exc:
            row.update(oom=True, oom_message=str(exc).splitlines()[0][:300], steps_done=len(times))
    peak = rss.peak
    row.update(peak_rss_bytes=peak, losses=losses, warmup_times_s=times[:opts.warmup])
    if device.type == "cuda":
        row.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
                   peak_reserved_bytes=torch.cuda.max_memory_reserved(device))
        row["peak_bytes"] = row["peak_allocated_bytes"]
    else:
        row["peak_bytes"] = peak
    timed = times[opts.warmup:]
    if timed and not row.get("oom"):
        row.update(step_s=statistics.median(timed), step_times_s=timed,
                   tokens_per_s=batch * seq / statistics.median(timed))
    return row


# ---- the parent: both sides, ratios, the bound ---------------------------------------------------

def device_peak(device: torch.device, threads: int) -> tuple[float, str]:
    """Peak FLOP/s: the bf16 table for known GPUs; otherwise a measured matmul (fp32 on CPU, bf16 on CUDA)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_BF16:
            if key in name:
                return flops, f"{name}: dense bf16 peak {flops / 1e12:.0f} TFLOP/s (table)"
    if threads:
        torch.set_num_threads(threads)
    n = 1024 if device.type == "cpu" else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    best, deadline = math.inf, time.perf_counter() + (1.5 if device.type == "cpu" else 3.0)
    a @ b
    while time.perf_counter() < deadline:
        _sync(device)
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t) / 4)
    flops = 2 * n**3 / best
    return flops, (f"measured {dtype} {n}x{n} matmul, best of ~1.5 s: {flops / 1e9:.1f} GFLOP/s "
                   f"({torch.get_num_threads()} threads)")




def _child(side: str, opts) -> dict:
    args = [sys.executable, os.path.abspath(__file__), "--side", side, "--shape", opts.shape, "--cache", str(opts.cache),
            "--device", str(opts.device), "--rows", ",".join(f"{s}x{b}" for s, b in opts.rows), "--r", str(opts.r),
            "--warmup", str(opts.warmup), "--steps", str(opts.steps), "--seed", str(opts.seed),
            "--threads", str(opts.threads), "--profile-rows", str(opts.profile_rows),
            "--loss-chunk-tokens", str(opts.loss_chunk_tokens), "--memory-cap-gib", str(opts.memory_cap_gib),
            "--mlp-chunk-tokens", str(opts.mlp_chunk_tokens)]
    if opts.offload_activations:
        args.append("--offload-activations")
    if opts.profile:
        args.append("--profile")
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{side} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_rows(text: str) -> list[tuple[int, int]]:
    """"2048x1,512x4" -> [(2048, 1), (512, 4)]."""
    rows = []
    for item in text.split(","):
        seq, _, batch = item.strip().partition("x")
        if not (seq.isdigit() and batch.isdigit() and int(seq) > 0 and int(batch) > 0):
            raise argparse.ArgumentTypeError(f"row {item!r}: expected SEQxBATCH such as 2048x1")
        rows.append((int(seq), int(batch)))
    return rows


def predicted_peak(shape: str, seq: int, batch: int, r: int, device_type: str, loss_chunk_tokens: int,
                   offload_activations: bool = False, mlp_chunk_tokens: int = 0) -> dict:
    """The planner's prediction for ours and for the peer's recipe on this row (the long-context options
    are ours alone: the peer's recipe has neither)."""
    from qlora_lite.config import LoraConfig
    from qlora_lite.memory import estimate_memory

    config = llama_config(shape)
    lora = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear")
    kwargs = dict(seq_len=seq, batch_size=batch, lora=lora, device=device_type,
                  compute_dtype="bfloat16" if device_type == "cuda" else "float32", loss_chunk_tokens=loss_chunk_tokens)
    out = {}
    for side, recipe in (("ours", "qlora-lite"), ("peer", "peft")):
        extra = dict(offload_activations=offload_activations, mlp_chunk_tokens=mlp_chunk_tokens) if side == "ours" else {}
        est = estimate_memory(config, **kwargs, **extra, recipe=recipe)
        if side == "ours" and est.transfer_bytes:
            out.update(ours_pinned_host_bytes=est.pinned_host_bytes, ours_transfer_bytes=est.transfer_bytes,
                       ours_transfer_s=est.transfer_seconds)
        # what torch.cuda.max_memory_allocated sees (no context, no allocator slack, no paged state)
        out[f"{side}_bytes"] = est.allocated_bytes if device_type == "cuda" else est.total_bytes
        out[f"{side}_reserved_bytes"] = est.reserved_bytes
        out[f"{side}_required_bytes"] = est.required_bytes
    return out


def _fmt_bytes(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def report(summary: dict) -> str:
    c, lines = summary["config"], []
    lines.append(f"{summary['shape']} Llama shape ({summary['n_params'] / 1e6:,.1f}M params, "
                 f"{summary['n_matmul_params'] / 1e6:,.1f}M in matmuls) on {summary['device']}")
    chunk = c.get("loss_chunk_tokens", 0)
    cap = f", memory capped at {c['memory_cap_gib']} GiB" if c.get("memory_cap_gib") else ""
    lines.append(f"LoRA r={c['r']} alpha={2 * c['r']} on 7 projections, "
                 f"ours: {f'loss in chunks of {chunk} tokens' if chunk else 'full logits'}, "
                 f"{c['warmup']} warm-up + {c['steps']} timed steps per row{cap}, load average "
                 f"{summary['load_average_before']} -> {summary['load_average_after']}")
    cuda = summary["device_type"] == "cuda"
    mem_label = "peak alloc" if cuda else "peak RSS"
    header = f"{'row':<10}{'side':<6}{'step s':>9}{'tokens/s':>11}{mem_label:>13}"
    header += f"{'reserved':>12}" if cuda else ""
    header += f"{'predicted':>12}{'pred/meas':>10}{'loss first→last':>20}{'of bound':>10}"
    lines += [header]
    for row in summary["rows"]:
        label = f"{row['seq']}x{row['batch']}"
        for side in ("ours", "peer"):
            r = row.get(side)
            if r is None:
                continue
            pred = row["predicted"].get(f"{side}_bytes")
            if r.get("oom"):
                lines.append(f"{label:<10}{side:<6}  out of memory after {r['steps_done']} steps "
                             f"(peak {_fmt_bytes(r['peak_bytes'])}, predicted {_fmt_bytes(pred)})")
                continue
            text = f"{label:<10}{side:<6}{r['step_s']:>9.3f}{r['tokens_per_s']:>11.1f}{_fmt_bytes(r['peak_bytes']):>13}"
            text += f"{_fmt_bytes(r.get('peak_reserved_bytes')):>12}" if cuda else ""
            ratio = f"{pred / r['peak_bytes']:.3f}" if pred and cuda else "-"
            text += f"{_fmt_bytes(pred):>12}{ratio:>10}"
            text += f"{r['losses'][0]:>11.4f}→{r['losses'][-1]:<8.4f}{100 * r['bound_fraction']:>9.2f}%"
            lines.append(text)
        if row.get("ratios"):
            q = row["ratios"]
            lines.append(f"{label:<10}ours/peer: tokens/s {q['tokens_per_s']:.3f}, peak memory {q['peak_bytes']:.3f}")
    for side in ("ours", "peer"):
        if side in summary:
            s = summary[side]
            lines.append(f"{side}: load {s['load_s']:.2f} s, peak while loading {_fmt_bytes(s['load_peak_bytes'])}")
    lines.append(f"bound: 6·N = {summary['flops_per_token'] / 1e9:.3f} GFLOP/token at {summary['peak_source']} "
                 f"-> {summary['bound_tokens_per_s']:,.0f} tokens/s")
    if summary.get("ours", {}).get("profile_table"):
        lines += ["", "profile of one step (ours), top ops by self time:", summary["ours"]["profile_table"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--cache", type=Path, help="checkpoint dir (default ~/.cache/qlora-lite/bench/<shape>)")
    parser.add_argument("--seq", type=int, help="sequence length (default: 128 on CPU, 2048 on CUDA)")
    parser.add_argument("--batch", type=int, help="batch size (default: 2 on CPU, 1 on CUDA)")
    parser.add_argument("--rows", type=parse_rows, help="several SEQxBATCH runs on one load, e.g. 2048x1,512x4")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = 2r, dropout 0)")
    parser.add_argument("--warmup", type=int, help="untimed steps per row (default: 2 on CPU, 3 on CUDA)")
    parser.add_argument("--steps", type=int, help="timed steps per row, the median is reported (default: 5 CPU, 10 CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss-chunk-tokens", type=int, default=1024,
                        help="ours: cross-entropy this many tokens at a time (train's default); 0: full logits")
    parser.add_argument("--offload-activations", action="store_true",
                        help="ours: checkpointed block inputs in pinned host memory (offload.py)")
    parser.add_argument("--mlp-chunk-tokens", type=int, default=0, help="ours: the MLP over chunks of N positions (0: off)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per side (0: torch's default)")
    parser.add_argument("--memory-cap-gib", type=float, default=0.0,
                        help="CUDA: cap each side at this many GiB (set_per_process_memory_fraction); 0: no cap")
    parser.add_argument("--draw-device", default="cpu", help="where the random checkpoint is drawn (cpu | cuda)")
    parser.add_argument("--sides", default="ours,peer", help="which sides run (ours,peer | ours | peer)")
    parser.add_argument("--profile", action="store_true", help="ours only: torch.profiler on one extra step")
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)

    if opts.device == "auto":
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    for key, value in DEFAULTS["cuda" if device.type == "cuda" else "cpu"].items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    opts.rows = opts.rows or [(opts.seq, opts.batch)]
    opts.cache = (opts.cache or Path.home() / ".cache" / "qlora-lite" / "bench" / opts.shape).expanduser()

    if opts.side:  # internal: one side, one JSON line on stdout
        print(json.dumps(run_side(opts)))
        return None

    log = (lambda msg: print(msg, file=sys.stderr)) if opts.json else print
    load_before = [round(x, 2) for x in os.getloadavg()]
    build_s = build_checkpoint(opts.shape, opts.cache, log=log, draw_device=opts.draw_device)
    shapes = param_shapes(opts.shape)
    n_params = sum(math.prod(s) for s in shapes.values())
    n_matmul = n_params - math.prod(shapes["model.embed_tokens.weight"])
    flops_per_token = 6 * n_matmul
    summary = {
        "shape": opts.shape, "llama_config": SHAPES[opts.shape], "n_params": n_params, "n_matmul_params": n_matmul,
        "device": device_name(device) if device.type == "cpu" else opts.device, "device_type": device.type,
        "versions": versions(("torch", "transformers", "peft", "bitsandbytes", "accelerate", "qlora-lite")),
        "config": {k: getattr(opts, k) for k in ("rows", "r", "warmup", "steps", "seed", "threads",
                                                 "loss_chunk_tokens", "memory_cap_gib", "offload_activations",
                                                 "mlp_chunk_tokens")},
        "cache": str(opts.cache), "checkpoint_build_s": build_s, "load_average_before": load_before,
        "flops_per_token": flops_per_token, "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    if device.type == "cpu":  # measured before the runs, so nothing of ours competes with it
        summary["peak_flops"], summary["peak_source"] = device_peak(device, opts.threads)
    sides = ["ours"] if opts.profile else [s for s in ("ours", "peer") if s in opts.sides.split(",")]
    for side in sides:
        log(f"running {side} ...")
        summary[side] = _child(side, opts)
    if device.type == "cuda":
        first = summary[sides[0]]
        summary.update(device=first["device_name"], peak_flops=first["peak_flops"], peak_source=first["peak_source"])
    summary["bound_tokens_per_s"] = bound = summary["peak_flops"] / flops_per_token
    summary["rows"] = []
    for i, (seq, batch) in enumerate(opts.rows):
        row = {"seq": seq, "batch": batch,
               "predicted": predicted_peak(opts.shape, seq, batch, opts.r, device.type, opts.loss_chunk_tokens,
                                           opts.offload_activations, opts.mlp_chunk_tokens)}
        for side in sides:
            r = row[side] = summary[side]["rows"][i]
            if not r.get("oom"):
                r["bound_fraction"] = r["tokens_per_s"] / bound
            pred = row["predicted"].get(f"{side}_bytes")
            if pred and device.type == "cuda":
                r["predicted_over_measured"] = pred / r["peak_bytes"]
        if all(s in row and not row[s].get("oom") for s in ("ours", "peer")):
            ours, peer = row["ours"], row["peer"]
            row["ratios"] = {k: ours[k] / peer[k] for k in ("tokens_per_s", "peak_bytes", "step_s")}
            if device.type == "cuda":
                row["ratios"]["peak_reserved_bytes"] = ours["peak_reserved_bytes"] / peer["peak_reserved_bytes"]
        summary["rows"].append(row)
    if "ours" in summary and "peer" in summary:
        summary["load_ratios"] = {k: summary["ours"][k] / summary["peer"][k] for k in ("load_s", "load_peak_bytes")}
    summary["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    if opts.json:
        print(json.dumps(summary, indent=2))
    else:
        print(report(summary))
    return summary


if __name__ == "__main__":
    main()
