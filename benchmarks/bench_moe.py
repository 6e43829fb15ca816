"""A mixture-of-experts shape trained on one card: NF4 experts, LoRA on experts and attention (issue 22).

    --shape qwen3-30b-a3b   the built-in Qwen3-30B-A3B config (30.5B parameters, 128 experts, top-8)
    --shape tiny            a 2-layer Qwen3-MoE (the CPU smoke)

The model is built in memory with random weights (no 61 GB checkpoint to write): the transformers
skeleton on the meta device, every expert's matrix and every linear drawn on the device and quantized
at once (inject.quantize_expert / quantize_target, the bytes load_model writes), the rest drawn in
the compute dtype. Then `--steps` training steps at seq × 1 as train.py runs them (gradient
checkpointing, the chunked loss, paged AdamW 32-bit on CUDA), under `--cap-gib` on CUDA
(torch.cuda.set_per_process_memory_fraction). Prints peak allocated / reserved bytes, tokens/s and
the planner's figures for the same run (--json: one JSON object).

    python benchmarks/bench_moe.py --shape tiny --device cpu --seq 32 --steps 2
    python benchmarks/bench_moe.py --shape qwen3-30b-a3b --seq 2048 --cap-gib 24 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True, vocab_size=256, max_position_embeddings=4096)
GiB = 1024**3


def moe_config(shape: str):
    from transformers import Qwen3MoeConfig

    from qlora_lite.memory_arch import load_model_config

    return Qwen3MoeConfig(**TINY) if shape == "tiny" else load_model_config(shape)[0]


def build_random(cfg, lora, device: torch.device, compute: torch.dtype, seed: int = 0):
    """The model as load_model holds it, from random weights drawn on `device` (std 0.02; norms 1)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from qlora_lite.config import QuantConfig
    from qlora_lite.experts import PROJECTIONS, fused_experts_modules
    from qlora_lite.inject import (check_experts, find_expert_targets, find_targets, freeze_base, make_experts_layer,
                                   make_lora_layer, quantize_expert, quantize_target, replace_module)

    quant = QuantConfig()
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(shape) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device, dtype=compute).mul_(0.02)

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=compute)
    expert_targets = find_expert_targets(model, lora)
    check_experts(model, lora, expert_targets)
    for name, experts in fused_experts_modules(model).items():
        adapted = {t.rpartition(".")[2] for t in expert_targets if t.rpartition(".")[0] == name}
        bases = {p: [quantize_expert(draw(getattr(experts, p).shape[1:]), quant, f"{name}.{p}[{e}]")
                     for e in range(getattr(experts, p).shape[0])] for p in PROJECTIONS}
        replace_module(model, name, make_experts_layer(bases, experts.act_fn, lora, adapted, compute))
    targets = set(find_targets(model, lora.target_modules))
    for name in find_targets(model, "all-linear"):
        linear = model.get_submodule(name)
        base = quantize_target(draw(linear.weight.shape), quant, lora if name in targets else None, name)
        replace_module(model, name, make_lora_layer(base, None, lora if name in targets else None,
                                                    compute_dtype=compute, device=device))
    for name, param in list(model.named_parameters()):
        if param.is_meta:
            module_name, _, leaf = name.rpartition(".")
            value = torch.ones(param.shape, device=device, dtype=compute) if "norm" in name else draw(param.shape)
            setattr(model.get_submodule(module_name), leaf, torch.nn.Parameter(value, requires_grad=False))
    model.tie_weights()
    freeze_base(model)
    return model.to(device)


def run(opts) -> dict:
    from qlora_lite.config import LoraConfig, TrainConfig
    from qlora_lite.loss import install_chunked_loss
    from qlora_lite.memory import estimate_memory
    from qlora_lite.train import build_optimizer, enable_checkpointing

    device = torch.device(opts.device)
    if device.type == "cpu":
        from qlora_lite.threads import pick_threads

        torch.set_num_threads(pick_threads(max_threads=2))  # tiny shapes crawl on oversubscribed cores
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda" and opts.cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(opts.cap_gib * GiB / total)
    cfg = moe_config(opts.shape)
    lora = LoraConfig(r=opts.r, lora_alpha=2 * opts.r, lora_dropout=0.0,
                      target_parameters=None if opts.targets == "all" else [])
    plan = estimate_memory(cfg, seq_len=opts.seq, batch_size=1, lora=lora, device=device.type,
                           compute_dtype=compute)
    t0 = time.perf_counter()
    model = build_random(cfg, lora, device, compute)
    build_s = time.perf_counter() - t0
    enable_checkpointing(model)
    install_chunked_loss(model, 1024)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    train_cfg = TrainConfig(max_steps=opts.warmup + opts.steps, warmup_steps=0, optimizer="paged_adamw_32bit",
                            learning_rate=2e-4,
                            device=device.type, progress=False)
    optimizer = build_optimizer(trainable, train_cfg, device, log=lambda msg: print(msg, file=sys.stderr))
    data = torch.randint(0, cfg.vocab_size, (opts.warmup + opts.steps, 1, opts.seq),
                         generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses, oom = [], [], None
    try:
        for ids in data:
            ids = ids.to(device)
            t = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())  # (synchronizes)
            times.append(time.perf_counter() - t)
    except torch.OutOfMemoryError as exc:
        oom = str(exc).splitlines()[0][:300]
    timed = times[opts.warmup:]
    result = {"shape": opts.shape, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "seq": opts.seq, "targets": opts.targets, "r": opts.r, "cap_gib": opts.cap_gib, "build_s": build_s,
              "params_total": plan.params_total, "params_trainable": plan.params_trainable, "oom": oom,
              "losses": losses, "step_s": statistics.median(timed) if timed else None,
              "tokens_per_s": opts.seq / statistics.median(timed) if timed else None,
              "planned_allocated_bytes": plan.allocated_bytes, "planned_reserved_bytes": plan.reserved_bytes,
              "planned_required_bytes": plan.required_bytes, "planned_total_bytes": plan.total_bytes}
    if device.type == "cuda":
        result.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
                      peak_reserved_bytes=torch.cuda.max_memory_reserved(device))
        result["planned_over_measured"] = plan.allocated_bytes / result["peak_allocated_bytes"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "qwen3-30b-a3b"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--targets", choices=["all", "attention"], default="all",
                        help="all: attention + every expert projection; attention: experts NF4 but unadapted")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--cap-gib", type=float, default=24.0)
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args(argv)
    result = run(opts)
    if opts.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value / GiB:.2f} GiB" if key.endswith("_bytes") and value else f"{key}: {value}")
    return 1 if result["oom"] or not result["losses"] else 0


if __name__ == "__main__":
    sys.exit(main())
