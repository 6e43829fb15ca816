"""The training loop.

    TrainConfig ──► load_model (NF4 base + LoRA) ──► build_dataset ──► split train / eval
        │
        ▼  accelerate.Accelerator (CPU, one GPU, or N processes under `accelerate launch` / torchrun)
        │  N processes: DDP (each holds the base; LoRA grads all-reduced), or fsdp=true: FSDP2 shards
        │  the NF4 bytes, LoRA and optimizer state 1/N per process (fsdp.py)
    for step: grad_accum × (batch ─► forward ─► loss/accum ─► backward)   [per-block checkpointing;
              the loss chunk by chunk through the LM head (loss.py), never the full logits]
              non-finite loss? stop, keep the last good checkpoint
              clip (max norm 0.3) ─► paged AdamW step ─► warmup + cosine schedule
              metrics.jsonl every log_every steps + progress bar; eval every N; checkpoint every N and on
              SIGINT/SIGTERM
        │
        ▼
    out_dir/adapter (PEFT format), out_dir/metrics.jsonl, out_dir/checkpoints/step-000050 (zero-padded step number)

A checkpoint holds the adapter, optimizer, scheduler, RNG states and the data position, so a
resumed run continues bit-for-bit where an uninterrupted one would be.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from .adapter import adapter_state_dict, save_adapter
from .config import TrainConfig, resolve_dtype
from .data import batch_iterator, build_dataset, collate, embedded_dataset_path, load_records, split_train_eval
from .errors import DataError, TrainingError
from .fsdp import (copy_into_parameter, fsdp_mesh, full_tensor, in_turns, load_sharded, load_sharded_optimizer_state,
                   resident_base_bytes, shard_model, sharded_optimizer_state)
from .fsutil import RunLock, atomic_directory, atomic_write_text
from .inject import count_parameters, lora_layers
from .load import is_prequantized, load_model, release_free_memory, resolve_device
from .loss import install_chunked_loss, supports_chunked_loss
from .memory import GiB, MemoryEstimate
from .monitor import MemoryMonitor, preflight

__all__ = ["train", "TrainResult", "evaluate", "latest_checkpoint", "build_optimizer", "lr_lambda",
           "enable_checkpointing", "check_launcher"]

CHECKPOINTS = "checkpoints"
# Evaluations (step 0 and every eval_every) use at most this many held-out examples: a 304k-record file
# held out ~30k and its step-0 evaluation ran for minutes without output. The held-out split is already a
# seeded random sample, so its first examples are one too; every evaluation uses the same ones.
MAX_EVAL_EXAMPLES = 1000
T = TypeVar("T")


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    interrupted: bool
    losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    adapter_dir: Path | None = None
    tokens_per_s: float = 0.0
    parameters: str = ""
    memory: dict = field(default_factory=dict)


def lr_lambda(cfg: TrainConfig):
    """Linear warmup, then cosine / linear decay to zero, or constant."""

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _optimizer_in_use(cfg: TrainConfig, device: torch.device) -> str:
    """The optimizer training runs (the planner is given the same): bitsandbytes' paged optimizers need
    CUDA, and their kernels update raw local tensors, not FSDP's DTensor shards; elsewhere torch AdamW."""
    return cfg.optimizer if device.type == "cuda" and not cfg.fsdp else "adamw"


def build_optimizer(params, cfg: TrainConfig, device: torch.device, log=print) -> torch.optim.Optimizer:
    """bitsandbytes' paged AdamW on CUDA; torch AdamW where paging cannot run (CPU, FSDP)."""
    if _optimizer_in_use(cfg, device) != "adamw":
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw_8bit" else bnb.optim.PagedAdamW32bit
        return cls(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer != "adamw" and cfg.fsdp:  # FSDP shards the states 1/N: most of what paging would buy
        log(f"note: {cfg.optimizer} does not take FSDP's sharded parameters; using torch.optim.AdamW")
    elif cfg.optimizer != "adamw":
        log(f"note: {cfg.optimizer} needs CUDA; using torch.optim.AdamW on {device.type}")
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def enable_checkpointing(model) -> None:
    """Per-block non-reentrant activation checkpointing (transformers 5.2x renamed the switch)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (temp dirs of an interrupted write are ignored)."""
    root = Path(out_dir) / CHECKPOINTS
    done = sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def _gather_training_state(model, optimizer, fsdp: bool, world: int) -> tuple[dict, dict, list]:
    """(adapter tensors, optimizer state, every process's random state), whole. Every rank calls it:
    under FSDP it all-gathers. Each process keeps its own random stream (dropout masks; the streams
    differ, e.g. only rank 0 draws the LoRA init under FSDP), so a resume restores each one."""
    optimizer_state = sharded_optimizer_state(model, optimizer) if fsdp else optimizer.state_dict()
    return adapter_state_dict(model), optimizer_state, _gather_objects(_rng_state(), world)


def _save_checkpoint(out_dir: Path, step: int, model, gathered: tuple[dict, dict, list], scheduler, state: dict,
                     keep_last: int) -> Path:
    target = out_dir / CHECKPOINTS / f"step-{step:06d}"
    adapter_tensors, optimizer_state, rng_states = gathered
    with atomic_directory(target, overwrite=True) as tmp:
        save_adapter(model, tmp / "adapter", tensors=adapter_tensors)
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng_states},
                   tmp / "training_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    old = sorted(p for p in (out_dir / CHECKPOINTS).glob("step-*") if p != target)
    for stale in old[: max(0, len(old) - (keep_last - 1))]:
        import shutil

        shutil.rmtree(stale, ignore_errors=True)
    return target


def _load_checkpoint(path: Path, model, optimizer, scheduler, fsdp: bool, rank: int, world: int) -> dict:
    from .adapter import read_adapter

    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("fsdp", False) != fsdp:
        raise TrainingError(f"{path} was written with fsdp={str(state.get('fsdp', False)).lower()} and this run has "
                            f"fsdp={str(fsdp).lower()}; the optimizer state is stored differently. Resume with the "
                            f"same setting, or start a new run initialised from {path / 'adapter'}")
    if state.get("world_size", 1) != world:
        raise TrainingError(
            f"{path} was written by a run on {state.get('world_size', 1)} process(es) but this run has "
            f"{world}; the data order and the per-process batch depend on it. Resume with "
            f"{state.get('world_size', 1)} process(es), or start a new run initialised from {path / 'adapter'}")
    adapter = read_adapter(path / "adapter")
    layers = lora_layers(model)
    for module in adapter.modules:
        copy_into_parameter(layers[module].lora_A[layers[module].active_adapter], adapter.lora_A[module])
        copy_into_parameter(layers[module].lora_B[layers[module].active_adapter], adapter.lora_B[module])
    blob = torch.load(path / "training_state.pt", weights_only=False)
    if fsdp:
        load_sharded_optimizer_state(model, optimizer, blob["optimizer"])
    else:
        optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    _set_rng_state(blob["rng"][rank])
    return state


@torch.no_grad()
def evaluate(model, examples, batch_size: int, pad_token_id: int, device, rank: int = 0,
             world_size: int = 1) -> float:
    """Mean token loss over `examples` (prompt tokens masked), in eval mode.

    With world_size > 1 each process takes every world_size-th batch and the sums are all-reduced, so
    the set is evaluated once, not once per process. Every process runs the same number of forwards
    (one without a batch in the last round re-runs its first and discards it): FSDP gathers weights
    inside forward, and DDP may broadcast buffers there, so forwards must pair up across processes.
    """
    was_training = model.training
    model.eval()
    starts = list(range(0, len(examples), batch_size))
    sums = torch.zeros(2, dtype=torch.float64)  # summed token loss, token count
    for index in range(rank, -(-len(starts) // world_size) * world_size, world_size):
        start = starts[index] if index < len(starts) else starts[0]
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_token_id).items()}
        # the model's own loss call: where training chunks the loss (install_chunked_loss), so does this,
        # and evaluation never materialises the full logits that training avoided
        mean_loss = model(**batch).loss
        count = int((batch["labels"][:, 1:] != -100).sum())
        if index < len(starts) and count:  # (a batch of masked-only tokens has a NaN mean)
            sums += torch.tensor([mean_loss.item() * count, count], dtype=torch.float64)
    if world_size > 1:
        import torch.distributed as dist

        shared = sums.to(device)  # nccl reduces CUDA tensors only
        dist.all_reduce(shared)
        sums = shared.cpu()
    model.train(was_training)
    return sums[0].item() / max(1.0, sums[1].item())


class _StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (checkpoint, then exit).

    A second signal gives up at once, unless it comes within `SAME_REQUEST_S` of the first: a
    launcher (torchrun) answers the user's Ctrl-C by sending its workers SIGTERM, which must not
    cut short the checkpoint the Ctrl-C asked for.
    """

    SAME_REQUEST_S = 5.0

    def __init__(self):
        self.received: int | None = None
        self._first_at = 0.0
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, _frame):
        if self.received is None:
            self.received, self._first_at = signum, time.monotonic()
        elif time.monotonic() - self._first_at > self.SAME_REQUEST_S:  # asked again: give up at once
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _gradient_sync(model, accelerator, fsdp: bool, last_micro_batch: bool) -> Iterator[None]:
    """Communicate gradients on a step's last micro-batch only; before it they accumulate locally
    (the LoRA gradients are small, so FSDP's unsharded accumulation costs little)."""
    if last_micro_batch or (accelerator.num_processes == 1 and not fsdp):
        yield
    elif fsdp:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with accelerator.no_sync(model):
            yield


def _resolve_paths(cfg: TrainConfig) -> tuple[Path, Path | list]:
    from .embedded import embedded_model_dir

    model_path = embedded_model_dir() if cfg.model == "embedded" else Path(cfg.model)
    data = embedded_dataset_path() if cfg.data == "embedded" else cfg.data
    return model_path, data


def train(cfg: TrainConfig, log=None, loaded=None) -> TrainResult:
    """Run (or resume) one training run described by `cfg`; see the module docstring.

    `loaded` = (model, tokenizer) from `load_model` skips loading (the demo reuses its model).
    """
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # An hour, not NCCL's 10 minutes: under FSDP the processes load a large model in turns (the
    # waiting ones sit in a barrier), and a 70B checkpoint can take longer than that to read.
    group = InitProcessGroupKwargs(timeout=timedelta(hours=1))
    accelerator = Accelerator(cpu=cfg.device == "cpu", mixed_precision="no", kwargs_handlers=[group])
    is_main = accelerator.is_main_process
    log = log or (lambda msg: print(msg, file=sys.stderr) if is_main else None)
    out_dir = Path(cfg.out_dir)
    device = accelerator.device if cfg.device == "auto" else resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    lock = RunLock(out_dir) if is_main else None
    if lock:
        lock.__enter__()
    try:
        return _train_locked(cfg, accelerator, device, out_dir, log, is_main, loaded)
    finally:
        if lock:
            lock.__exit__(None, None, None)


def check_launcher(accelerator) -> None:
    """Refuse accelerate's own FSDP/DeepSpeed wrapping: it would shard the model without knowing the
    NF4 storage. qlora-lite applies FSDP2 itself (`fsdp: true`)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        kind = accelerator.distributed_type.value
        raise TrainingError(f"accelerate was launched with {kind} (--use_{kind.lower()} or its config file); "
                            "qlora-lite shards the NF4 base with PyTorch's FSDP2 itself: launch without it "
                            "(plain `accelerate launch --num_processes N` or torchrun) and pass --fsdp")


def _memory_plan(cfg: TrainConfig, model_path: Path, batch_size: int, world: int, device: torch.device,
                 compute_dtype: torch.dtype, log) -> MemoryEstimate | None:
    """The planner's prediction for this run, logged before loading, with a warning where this machine
    looks too small (monitor.preflight). A model the planner cannot read does not stop the run."""
    try:
        plan, warnings = preflight(model_path, device, seq_len=cfg.seq_len, batch_size=batch_size, lora=cfg.lora,
                                   quant=cfg.quant, optimizer=_optimizer_in_use(cfg, device),
                                   compute_dtype=compute_dtype,
                                   gradient_checkpointing=cfg.gradient_checkpointing, world_size=world,
                                   fsdp=cfg.fsdp, loss_chunk_tokens=cfg.loss_chunk_tokens)
    except Exception as exc:  # any planner limit (an unusual architecture) is the planner's, not the run's
        log(f"note: no memory plan for this model ({type(exc).__name__}: {exc})")
        return None
    where = "GPU" if device.type == "cuda" else "process (host memory)"
    log(f"memory plan: {plan.total_bytes / GiB:.2f} GiB per {where} predicted (peak in the {plan.peak_phase} phase)")
    for warning in warnings:
        log(f"warning: {warning}")
    return plan


def _train_locked(cfg, accelerator, device, out_dir, log, is_main, loaded) -> TrainResult:
    check_launcher(accelerator)
    monitor = MemoryMonitor(device)
    existing = latest_checkpoint(out_dir)
    resume_from = existing if cfg.resume else None
    if not cfg.resume and existing is not None:
        raise TrainingError(f"{out_dir} already holds checkpoints; pass --resume to continue that run or choose "
                            "another out_dir")
    model_path, data = _resolve_paths(cfg)
    world = accelerator.num_processes
    batch_size = cfg.per_process_batch(world)
    compute_dtype = resolve_dtype(cfg.quant.compute_dtype if cfg.quant else "auto", device)
    mesh = fsdp_mesh(device) if cfg.fsdp else None  # every process together, before the turns below
    plan = _memory_plan(cfg, model_path, batch_size, world, device, compute_dtype, log)

    def load_and_shard():
        if loaded is None:
            # under FSDP on GPUs: quantize on the GPU, stage the bytes on the host, FSDP moves each shard back
            storage = torch.device("cpu") if cfg.fsdp and device.type == "cuda" else None
            model, tokenizer = load_model(model_path, cfg.quant, cfg.lora, device=device, compute_dtype=compute_dtype,
                                          storage_device=storage)
        else:
            model, tokenizer = loaded
        params = count_parameters(model)
        if cfg.fsdp:  # FSDP2 replaces the parameters with shards (the optimizer is built on those below)
            shard_model(model, device, mesh)
            release_free_memory()  # give the freed whole copy back to the OS before the next process loads
        return model, tokenizer, params

    if cfg.fsdp and loaded is None and cfg.quant is not None and not is_prequantized(model_path):
        # the checkpoint is read and quantized once, by rank 0; the others receive their shards
        model, tokenizer, params = load_sharded(model_path, cfg.quant, cfg.lora, device, compute_dtype, mesh)
        log("fsdp: rank 0 read and quantized the checkpoint; every process received its shards from it")
    elif cfg.fsdp:
        # (a 4-bit checkpoint, quant=None, or a model handed in) the processes load one after another,
        # each freeing its whole copy once sharded: the host holds one whole model at a time
        model, tokenizer, params = in_turns(load_and_shard)
        log(f"fsdp: the {world} process(es) loaded the model in turns")
    else:
        model, tokenizer, params = load_and_shard()
    log(f"model {model_path}: {params}")
    base_bytes = resident_base_bytes(model)  # this process's share under FSDP; the whole base otherwise
    if cfg.fsdp:
        log(f"fsdp: {world} process(es); this one holds {base_bytes:,} bytes ({base_bytes / GiB:.2f} GiB) of the "
            "quantized base")
    monitor.mark("after_load")

    records = load_records(data)
    log(f"data: tokenizing {len(records):,} records")  # minutes for a large file: say what is happening
    train_records, eval_records = split_train_eval(records, cfg.eval_fraction, cfg.seed)
    train_set = build_dataset(train_records, tokenizer, cfg.seq_len, packing=cfg.packing, truncation=cfg.truncation)
    try:
        eval_set = build_dataset(eval_records, tokenizer, cfg.seq_len, truncation="truncate") if eval_records else None
    except DataError:  # the training records fit: say that the held-out ones are the problem
        raise DataError(f"none of the {len(eval_records)} held-out evaluation record(s) (eval_fraction="
                        f"{cfg.eval_fraction}) has a trainable token within seq_len={cfg.seq_len}; raise seq_len, "
                        "or set eval_fraction: 0") from None
    log(f"data: {train_set.summary()}")
    if eval_set is not None and len(eval_set) > MAX_EVAL_EXAMPLES:
        log(f"eval: {MAX_EVAL_EXAMPLES:,} of {len(eval_set):,} held-out examples (MAX_EVAL_EXAMPLES)")
        eval_set = eval_set.examples[:MAX_EVAL_EXAMPLES]

    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    if cfg.loss_chunk_tokens:
        why_not = supports_chunked_loss(model)
        if why_not is None:
            install_chunked_loss(model, cfg.loss_chunk_tokens)
        else:
            log(f"note: the loss uses the full logits: {why_not}")
    unwrap = (lambda m: m) if cfg.fsdp else accelerator.unwrap_model  # an FSDP2 model is the model itself
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, cfg, device, log)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    if not cfg.fsdp:
        model, optimizer = accelerator.prepare(model, optimizer)

    state = {"losses": [], "eval_losses": [], "tokens": 0, "world_size": world, "fsdp": cfg.fsdp}
    start_step = 0
    if resume_from is not None:
        state = _load_checkpoint(resume_from, unwrap(model), optimizer, scheduler, cfg.fsdp,
                                 accelerator.process_index, world)
        start_step = state["step"]
        log(f"resumed from {resume_from} at step {start_step}")
    batches = batch_iterator(train_set, batch_size, seed=cfg.seed, start_step=start_step * cfg.grad_accum,
                             rank=accelerator.process_index, world_size=world)
    metrics_file = out_dir / "metrics.jsonl"
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    pad_id = tokenizer.pad_token_id
    if eval_set is not None and start_step == 0:  # the baseline every later eval is compared with
        baseline = evaluate(model, eval_set, batch_size, pad_id, device, accelerator.process_index, world)
        state["eval_losses"].append([0, baseline])
        log(f"eval loss before training: {baseline:.4f}")
        if is_main:
            with open(metrics_file, "a") as handle:
                handle.write(json.dumps({"step": 0, "eval_loss": round(baseline, 6)}) + "\n")

    progress = None
    if cfg.progress and is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.max_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True)
    step, interrupted, t_start, tokens_run = start_step, False, time.perf_counter(), 0
    with _StopSignal() as stop:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            step_loss, step_tokens = 0.0, 0
            for micro in range(cfg.grad_accum):
                batch = {k: v.to(device) for k, v in collate(next(batches), pad_id).items()}
                with _gradient_sync(model, accelerator, cfg.fsdp, micro == cfg.grad_accum - 1):
                    loss = model(**batch).loss
                    if not torch.isfinite(loss):
                        last = latest_checkpoint(out_dir)
                        raise TrainingError(
                            f"loss became {loss.item()} at step {step + 1}; training stopped and nothing was "
                            f"overwritten (last good checkpoint: {last or 'none'}). Try a lower learning_rate, bf16 "
                            f"instead of fp16, or a smaller max_grad_norm")
                    accelerator.backward(loss / cfg.grad_accum)
                step_loss += loss.item() / cfg.grad_accum
                step_tokens += int(batch["attention_mask"].sum())
            grad_norm = torch.tensor(float("nan"))
            if cfg.max_grad_norm > 0:  # torch's clip handles FSDP's sharded grads (a DTensor norm)
                clip = torch.nn.utils.clip_grad_norm_ if cfg.fsdp else accelerator.clip_grad_norm_
                grad_norm = full_tensor(clip(trainable, cfg.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == start_step + 1:
                monitor.mark("first_step")
            stop_now = stop.received is not None
            if world > 1:  # one all-reduce: the global mean loss, and whether any process was told to stop
                # (every process must stop after the same step, or their collectives would no longer pair up)
                shared = accelerator.reduce(torch.tensor([step_loss, float(stop_now)], device=device), "sum")
                step_loss, stop_now = shared[0].item() / world, shared[1].item() > 0
            elapsed = time.perf_counter() - t0
            tokens_run += step_tokens * world
            state["losses"].append(step_loss)
            state["tokens"] += step_tokens * world
            record = {"step": step, "loss": round(step_loss, 6), "lr": scheduler.get_last_lr()[0],
                      "grad_norm": round(float(grad_norm), 6),
                      "tokens_per_s": round(step_tokens * world / elapsed, 1),  # all processes together
                      "step_s": round(elapsed, 4), **monitor.current()}
            if eval_set is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                eval_loss = evaluate(model, eval_set, batch_size, pad_id, device, accelerator.process_index, world)
                state["eval_losses"].append([step, eval_loss])
                record.update(eval_loss=round(eval_loss, 6), eval_ppl=round(math.exp(min(eval_loss, 50)), 3))
            if is_main and (step % cfg.log_every == 0 or "eval_loss" in record or step == cfg.max_steps):
                with open(metrics_file, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
            if progress:
                progress.set_postfix(loss=f"{step_loss:.3f}", lr=f"{record['lr']:.2e}",
                                     tok_s=f"{record['tokens_per_s']:.0f}", mem=monitor.short())
                progress.update(1)
            if step % cfg.save_every == 0 or step == cfg.max_steps or stop_now:
                gathered = _gather_training_state(unwrap(model), optimizer, cfg.fsdp, world)
                if is_main:
                    _save_checkpoint(out_dir, step, unwrap(model), gathered, scheduler, state, cfg.keep_last)
                accelerator.wait_for_everyone()
            if stop_now:
                interrupted = True
                log(f"received signal {stop.received or '(on another process)'}: checkpoint saved at step {step}; "
                    f"continue with --resume")
                break
    if progress:
        progress.close()
    monitor.mark("steady_state")
    unwrapped = unwrap(model)
    adapter_dir = None
    summary = {**monitor.summary(), "base_bytes_per_process": _gather_objects(base_bytes, world),
               "predicted": None if plan is None else {"total_bytes": plan.total_bytes, "peak_phase": plan.peak_phase,
                                                       "breakdown": plan.peak_breakdown()}}
    if not interrupted:
        tensors = adapter_state_dict(unwrapped)  # every rank: under FSDP this all-gathers
        if is_main:
            adapter_dir = save_adapter(unwrapped, out_dir / "adapter", base_model_name_or_path=str(model_path),
                                       tensors=tensors)
            atomic_write_text(out_dir / "memory.json", json.dumps(summary, indent=2))
    total_s = time.perf_counter() - t_start
    return TrainResult(out_dir, step, interrupted, state["losses"], [tuple(x) for x in state["eval_losses"]],
                       adapter_dir, tokens_run / total_s if total_s else 0.0, str(params), summary)


def _gather_objects(value: T, world: int) -> list[T]:
    """`value` from every process, in rank order (gloo/nccl through torch.distributed)."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    values: list = [None] * world
    dist.all_gather_object(values, value)
    return values
