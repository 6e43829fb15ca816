"""Closing the NF4 quality gap on the embedded SmolLM2-135M (issue 21): LoRA on 16-bit, LoRA on NF4,
LoftQ, PiSSA and DoRA on NF4, each by qlora-lite and by PEFT (+ bitsandbytes 4-bit on CPU) in one
process, through one training loop, on one set of batches.

    data      tokenized and split once (qlora_lite.data.prepare_data); every run reads those objects
    loop      qlora_lite.train.TrainingRun for every run, ours and PEFT's: the same seeded batch order,
              AdamW, warmup + cosine, clipping, chunked loss, activation checkpointing and evaluation (no
              checkpoints or adapter are saved); PEFT's model
              is handed in (`loaded`), its LoRA layers injected in place as PEFT does
    PEFT      transformers' BitsAndBytesConfig (NF4, double quant, fp32 compute; bitsandbytes' CPU
              kernels, their bf16 repacking for inference off so the layers compute alike in train
              and eval mode), get_peft_model(LoraConfig(r, 2r, "all-linear")):
                lora    init_lora_weights=True (A then overwritten with ours, see below)
                loftq   replace_lora_weights_loftq on the 4-bit model (init_lora_weights="loftq" probed);
                        both need CUDA in PEFT 0.21, so on a CPU the row records why it cannot run
                pissa   PEFT's QPiSSA recipe: "pissa" on the 16-bit model, residual model saved and
                        re-loaded in 4 bit, the adapter loaded trainable on it
                dora    use_dora=True on the 4-bit model
    same init where the method is random: PEFT's kaiming A is replaced by ours (B = 0 in both), so
              the two columns differ by implementation, not by a random draw. PiSSA is deterministic:
              PEFT's own factors are kept and their distance from ours is reported ("init Δ").

Per run: held-out loss before training and after --steps, seconds per step (mean over the steps,
evaluation excluded) and the initialisation time. Per row: ours/PEFT after-loss and s/step ratios,
and the share of the NF4-vs-16-bit gap each closes ((nf4 - row) / (nf4 - 16bit), after training).

Usage:

    python benchmarks/bench_quality.py --steps 8 --seq 128 --batch 4 --eval-examples 0    # CPU, all rows (~12 min)
    python benchmarks/bench_quality.py --rows lora-nf4 --impl ours --steps 1               # one run, to time
    python benchmarks/bench_quality.py --steps 50 --device cuda --json quality.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _env import device_name, versions  # benchmarks/ is on sys.path when run as a script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora_lite.config import LoraConfig, QuantConfig, TrainConfig  # noqa: E402
from qlora_lite.data import embedded_dataset_path, prepare_data  # noqa: E402
from qlora_lite.threads import pick_threads  # noqa: E402
from qlora_lite.embedded import embedded_model_dir  # noqa: E402
from qlora_lite.inject import lora_layers  # noqa: E402
from qlora_lite.load import load_model, load_tokenizer  # noqa: E402
from qlora_lite.train import TrainingRun  # noqa: E402

ROWS = {  # label: (quantized, LoraConfig extras)
    "lora-16bit": (False, {}),
    "lora-nf4": (True, {}),
    "loftq-nf4": (True, {"init_lora_weights": "loftq"}),
    "pissa-nf4": (True, {"init_lora_weights": "pissa"}),
    "dora-nf4": (True, {"use_dora": True}),
}
IMPLS = ("ours", "peft")


class BenchRun(TrainingRun):
    """train()'s run on prepared data and a model handed in; timed steps, no checkpoints or adapter."""

    def __init__(self, *args, data, **kwargs):
        super().__init__(*args, **kwargs)
        self.data, self.step_s = data, []

    def setup_data(self) -> None:
        self.tokenizer = self.loaded[1]
        self.train_set, self.eval_set = self.data

    def train_step(self, batches, step):
        start = time.perf_counter()
        out = super().train_step(batches, step)
        self.step_s.append(time.perf_counter() - start)
        return out

    def save_checkpoint(self, step: int) -> None:
        pass


def train_config(args: argparse.Namespace, quantized: bool, extras: dict, out_dir: Path) -> TrainConfig:
    lora = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, target_modules="all-linear", **extras)
    return TrainConfig(model=str(args.model_dir), data="embedded", out_dir=str(out_dir), seq_len=args.seq,
                       batch_size=args.batch, max_steps=args.steps, learning_rate=args.lr,
                       warmup_steps=min(2, args.steps), eval_fraction=args.eval_fraction, eval_every=args.steps,
                       save_every=args.steps, progress=False, device=args.device, seed=args.seed, optimizer="adamw",
                       lora=lora, quant=QuantConfig() if quantized else None)


# ---- the models -----------------------------------------------------------------------------

def build_ours(cfg: TrainConfig) -> torch.nn.Module:
    model, _ = load_model(cfg.model, cfg.quant, cfg.lora, device=cfg.device, compute_dtype=torch.float32,
                          with_tokenizer=False)
    return model


def _peft_lora_config(cfg: TrainConfig, **extra):
    import peft

    lora = cfg.lora
    return peft.LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                           **extra)


def _hf_model(path, quantized: bool, device: str, dtype: torch.dtype | str = torch.float32):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    extra = {}
    if quantized:
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map=device, **extra)
    for module in model.modules():  # bitsandbytes repacks CPU weights for bf16 inference in eval mode; keep
        if hasattr(module, "support_avx512bf16_for_cpu"):  # one kernel path for training and evaluation
            module.support_avx512bf16_for_cpu = False
    return model


def build_peft(cfg: TrainConfig, label: str, tmp: Path) -> torch.nn.Module:
    """PEFT's model for `label` (the plain transformers model with PEFT's layers injected in place)."""
    import peft

    quantized = cfg.quant is not None
    if label == "loftq-nf4":
        errors = []
        try:  # PEFT's LoftQ for a bitsandbytes 4-bit model: the row, where it runs
            model = peft.get_peft_model(_hf_model(cfg.model, True, cfg.device), _peft_lora_config(cfg))
            peft.replace_lora_weights_loftq(model, model_path=str(Path(cfg.model) / "model.safetensors"))
            return model.get_base_model()
        except Exception as exc:  # noqa: BLE001 - the failure is the result recorded
            errors.append(f"replace_lora_weights_loftq: {type(exc).__name__}: {exc}")
        try:  # its other route (LoftQ on the 16-bit model, a dequantized base): only whether it runs here
            peft.get_peft_model(_hf_model(cfg.model, False, cfg.device), _peft_lora_config(
                cfg, init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=1)))
            errors.append("init_lora_weights='loftq' runs (its base is dequantized 16-bit, not compared)")
        except Exception as exc:  # noqa: BLE001
            errors.append(f"init_lora_weights='loftq': {type(exc).__name__}: {exc}")
        raise RuntimeError("; ".join(errors))
    if label == "pissa-nf4":  # QPiSSA: PiSSA on the checkpoint's own dtype, the residual quantized on reload
        model = peft.get_peft_model(_hf_model(cfg.model, False, cfg.device, dtype="auto"),
                                    _peft_lora_config(cfg, init_lora_weights="pissa"))
        model.peft_config["default"].init_lora_weights = True  # the saved factors are loaded as they are
        model.save_pretrained(str(tmp / "pissa_adapter"))
        model.unload().save_pretrained(str(tmp / "pissa_residual"))
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(cfg.model) / name).is_file():
                (tmp / "pissa_residual" / name).write_bytes((Path(cfg.model) / name).read_bytes())
        residual = _hf_model(tmp / "pissa_residual", True, cfg.device)
        return peft.PeftModel.from_pretrained(residual, str(tmp / "pissa_adapter"), is_trainable=True).get_base_model()
    extra = {"use_dora": True} if cfg.lora.use_dora else {}
    return peft.get_peft_model(_hf_model(cfg.model, quantized, cfg.device),
                               _peft_lora_config(cfg, **extra)).get_base_model()


def peft_factors(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (module.lora_A["default"].weight, module.lora_B["default"].weight)
            for name, module in model.named_modules() if hasattr(module, "lora_A") and "default" in module.lora_A}


def align_init(ours: torch.nn.Module, theirs: torch.nn.Module, copy_a: bool) -> float:
    """Copy our random A into PEFT's layers (copy_a), or measure how far PEFT's factors are from ours."""
    factors, worst = peft_factors(theirs), 0.0
    layers = lora_layers(ours)
    if set(factors) != set(layers):
        raise RuntimeError(f"PEFT adapted {len(factors)} modules, qlora-lite {len(layers)}: "
                           f"{sorted(set(factors) ^ set(layers))[:4]}")
    with torch.no_grad():
        for name, layer in layers.items():
            a, b = factors[name]
            if copy_a:
                a.copy_(layer.lora_A["default"])
            worst = max(worst, (a - layer.lora_A["default"]).abs().max().item(),
                        (b - layer.lora_B["default"]).abs().max().item())
    return worst


# ---- the runs -------------------------------------------------------------------------------

def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def run_one(cfg: TrainConfig, model: torch.nn.Module, tokenizer, data, init_s: float) -> dict:
    from accelerate import Accelerator

    torch.manual_seed(cfg.seed)
    accelerator = Accelerator(cpu=cfg.device == "cpu", mixed_precision="no")
    run = BenchRun(cfg, accelerator, torch.device(cfg.device), log, loaded=(model, tokenizer), data=data)
    run.setup()
    run.train_loop()
    losses = run.state["eval_losses"]
    return {"before": losses[0][1], "after": losses[-1][1], "s_per_step": statistics.mean(run.step_s),
            "init_s": init_s, "train_losses": run.state["losses"]}


def run_row(label: str, args: argparse.Namespace, tokenizer, data, tmp: Path) -> dict:
    """Build every implementation's model first (PEFT's A is aligned to ours before either trains), then
    train each in turn."""
    quantized, extras = ROWS[label]
    row: dict = {"row": label}
    models, configs = {}, {}
    for impl in args.impls:
        configs[impl] = cfg = train_config(args, quantized, extras, tmp / f"{label}-{impl}")
        torch.manual_seed(cfg.seed)
        start = time.perf_counter()
        try:  # a PEFT method that cannot run here (LoftQ needs CUDA) is that run's result, not the end of the bench
            models[impl] = build_ours(cfg) if impl == "ours" else build_peft(cfg, label, tmp)
        except Exception as exc:  # noqa: BLE001
            if impl == "ours":
                raise
            row[impl] = {"error": "building the model: " + " ".join(str(exc).split())[:600]}
            log(f"{label} {impl}: cannot run: {row[impl]['error']}")
            continue
        row[impl] = {"init_s": time.perf_counter() - start}
        log(f"{label} {impl}: model ready in {row[impl]['init_s']:.1f} s")
    if len(models) == 2:
        row["init_max_abs_diff"] = align_init(models["ours"], models["peft"],
                                              copy_a=configs["ours"].lora.init_lora_weights == "kaiming")
    for impl in list(models):
        model = models.pop(impl)
        try:
            row[impl] = run_one(configs[impl], model, tokenizer, data, row[impl]["init_s"])
        except Exception as exc:  # noqa: BLE001
            if impl == "ours":
                raise
            row[impl] = {"error": "training: " + " ".join(str(exc).split())[:600]}
            log(f"{label} {impl}: cannot run: {row[impl]['error']}")
            continue
        log(f"{label} {impl}: {row[impl]['before']:.4f} -> {row[impl]['after']:.4f}, "
            f"{row[impl]['s_per_step']:.2f} s/step")
        del model
    if "after" in row.get("ours", {}) and "after" in row.get("peft", {}):
        row["after_ratio"] = row["ours"]["after"] / row["peft"]["after"]
        row["step_ratio"] = row["ours"]["s_per_step"] / row["peft"]["s_per_step"]
    return row


def gap_closed(rows: list[dict]) -> None:
    by_row = {r["row"]: r for r in rows}
    for impl in IMPLS:
        try:
            nf4, full = by_row["lora-nf4"][impl]["after"], by_row["lora-16bit"][impl]["after"]
        except KeyError:
            continue
        for r in rows:
            if "after" in r.get(impl, {}) and nf4 != full:
                r[impl]["gap_closed"] = (nf4 - r[impl]["after"]) / (nf4 - full)


def print_table(report: dict) -> None:
    def cell(run: dict, key: str, fmt: str) -> str:
        return format(run[key], fmt) if key in run else "-"

    print("| row | impl | held-out before | after | gap closed | s/step | init s | ours/PEFT after | "
          "ours/PEFT s/step | init Δ |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        for impl in report["args"]["impls"]:
            run = r.get(impl, {})
            if "error" in run:
                print(f"| {r['row']} | {impl} | cannot run: {run['error'][:160]} | | | | | | | |")
                continue
            closed = f"{100 * run['gap_closed']:.0f}%" if "gap_closed" in run else "-"
            ratios = " | | "
            if impl == "ours" and "after_ratio" in r:
                ratios = f"{r['after_ratio']:.4f} | {r['step_ratio']:.2f} | {cell(r, 'init_max_abs_diff', '.1e')}"
            print(f"| {r['row']} | {impl} | {cell(run, 'before', '.4f')} | {cell(run, 'after', '.4f')} | {closed} | "
                  f"{cell(run, 's_per_step', '.2f')} | {cell(run, 'init_s', '.1f')} | {ratios} |")
    a = report["args"]
    print(f"\n{report['device']}, {a['threads']} torch thread(s); steps={a['steps']} r={a['r']} lr={a['lr']} "
          f"seq={a['seq']} batch={a['batch']} held-out examples={report['eval_examples']}; {report['versions']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {list(ROWS)}")
    parser.add_argument("--impl", default="ours,peft", help="ours, peft or both (comma-separated)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    parser.add_argument("--eval-examples", type=int, default=64, help="the first N held-out examples (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads for every run (0: the idle cores at the start, qlora_lite.threads."
                             "pick_threads; on a shared machine 1, since OpenMP barriers stall on busy cores)")
    parser.add_argument("--json", metavar="FILE", help="also write the full report (per-step losses too) here")
    args = parser.parse_args()
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    args.impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    if unknown := [r for r in args.rows if r not in ROWS] + [i for i in args.impls if i not in IMPLS]:
        parser.error(f"unknown rows/impls {unknown}; choose from {list(ROWS)} and {list(IMPLS)}")
    args.threads = args.threads or pick_threads()
    torch.set_num_threads(args.threads)
    args.model_dir = embedded_model_dir()
    tokenizer = load_tokenizer(args.model_dir)
    # the batches of every run: tokenized, split and (for evaluation) cut once, here
    train_set, eval_set = prepare_data(embedded_dataset_path(), tokenizer,
                                       train_config(args, True, {}, Path("unused")))
    if args.eval_examples:
        eval_set = eval_set[:args.eval_examples]
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_row(label, args, tokenizer, (train_set, eval_set), Path(tmp)) for label in args.rows]
    gap_closed(rows)
    report = {"rows": rows, "started": started, "eval_examples": len(eval_set), "train_examples": len(train_set),
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "device": device_name(torch.device(args.device)),
              "versions": versions(("torch", "transformers", "peft", "bitsandbytes", "accelerate"))}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print_table(report)


if __name__ == "__main__":
    main()
