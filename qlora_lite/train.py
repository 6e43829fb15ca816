"""The training recipe: setup (out_dir, data, model, optimizer, resume), the loop, save.

    TrainConfig ──► TrainingRun.setup():
        check_out_dir     refuse what would mix two runs; a resume must match the checkpoint's settings
        setup_data        tokenizer + records ──► train / eval sets (errors here cost no model load)
        setup_model       NF4 base + LoRA: load_model, or FSDP (rank 0 quantizes; or in turns)
        setup_optimizer   checkpointing, chunked loss, AdamW / paged AdamW, warmup + cosine
        resume            adapter, optimizer, scheduler, RNG from the newest checkpoint
        │
        ▼  accelerate.Accelerator (CPU, one GPU, or N processes under `accelerate launch` / torchrun)
        │  N processes: DDP (each holds the base; LoRA grads all-reduced), or fsdp=true: FSDP2 shards
        │  the NF4 bytes, LoRA and optimizer state 1/N per process (fsdp.py)
    TrainingRun.train_loop(): per step grad_accum × (batch ─► forward ─► loss/accum ─► backward)
              [per-block checkpointing; the loss chunk by chunk through the LM head (loss.py)]
              non-finite loss? stop, keep the last good checkpoint
              clip (max norm 0.3) ─► paged AdamW step ─► warmup + cosine schedule
              emit_metrics (metrics.jsonl) every log_every steps + progress bar; eval every N;
              checkpoint every N and on SIGINT/SIGTERM (checkpoint.py)
        │
        ▼  TrainingRun.save()
    out_dir/adapter (PEFT format + qlora_lite.json), out_dir/metrics.jsonl, out_dir/memory.json,
    out_dir/checkpoints/step-000050 (zero-padded step number)
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
from typing import Any

import torch

from .adapter import adapter_state_dict, save_adapter
from .checkpoint import (METRICS, check_out_dir, gather_objects, gather_training_state, latest_checkpoint,
                         load_checkpoint, save_checkpoint, truncate_metrics)
from .config import TrainConfig, resolve_dtype
from .data import batch_iterator, collate, count_tokens, embedded_dataset_path, prepare_data
from .errors import TrainingError
from .fsdp import fsdp_mesh, full_tensor, in_turns, load_sharded, resident_base_bytes, shard_model
from .fsutil import RunLock, atomic_write_text
from .kernels import apply_speedups
from .layers import release_dequantize_buffers
from .load import is_prequantized, load_model, load_tokenizer, release_free_memory, resolve_device
from .loss import ChunkedLoss, install_chunked_loss, supports_chunked_loss
from .memory import GiB, MemoryEstimate
from .monitor import MemoryMonitor, preflight
from .offload import install_activation_offload, install_base_offload, install_tiled_mlp
from .settings import RunSettings
from .tracking import Trackers

__all__ = ["train", "TrainingRun", "TrainResult", "evaluate", "latest_checkpoint", "build_optimizer", "lr_lambda",
           "enable_checkpointing", "check_launcher"]

# Evaluations (step 0 and every eval_every) use at most this many held-out examples: a 304k-record file
# held out ~30k and its step-0 evaluation ran for minutes without output. The held-out split is already a
# seeded random sample, so its first examples are one too; every evaluation uses the same ones.
MAX_EVAL_EXAMPLES = 1000


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
    """bitsandbytes' paged AdamW on CUDA; where paging cannot run (CPU, FSDP) torch AdamW, or off FSDP for
    16-bit adapters bitsandbytes' unpaged AdamW32bit: the states stay 32-bit wherever the kernels run."""
    if _optimizer_in_use(cfg, device) != "adamw":
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw_8bit" else bnb.optim.PagedAdamW32bit
        return cls(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer != "adamw" and cfg.fsdp:  # FSDP shards the states 1/N: most of what paging would buy
        log(f"note: {cfg.optimizer} does not take FSDP's sharded parameters; using torch.optim.AdamW")
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    params = list(params)
    if not cfg.fsdp and any(p.dtype != torch.float32 for p in params):
        # torch AdamW would keep exp_avg/exp_avg_sq in the adapters' 16-bit dtype; bitsandbytes' 32-bit
        # AdamW (its CPU kernel, no paging) keeps them in fp32, as the paged one does on CUDA
        import bitsandbytes as bnb

        log(f"note: 16-bit adapters on {device.type}: bitsandbytes' AdamW with 32-bit states")
        return bnb.optim.AdamW32bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer != "adamw":
        log(f"note: {cfg.optimizer} needs CUDA; using torch.optim.AdamW on {device.type}")
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def enable_checkpointing(model) -> None:
    """Per-block non-reentrant activation checkpointing (transformers 5.2x renamed the switch)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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
                                   fsdp=cfg.fsdp, loss_chunk_tokens=cfg.loss_chunk_tokens,
                                   offload_activations=cfg.offload_activations,
                                   mlp_chunk_tokens=cfg.mlp_chunk_tokens, offload_base=cfg.offload_base)
    except Exception as exc:  # any planner limit (an unusual architecture) is the planner's, not the run's
        log(f"note: no memory plan for this model ({type(exc).__name__}: {exc})")
        return None
    where = "GPU" if device.type == "cuda" else "process (host memory)"
    log(f"memory plan: {plan.total_bytes / GiB:.2f} GiB per {where} predicted (peak in the {plan.peak_phase} phase)")
    for warning in warnings:
        log(f"warning: {warning}")
    return plan




class TrainingRun:
    """One training run in steps (the layout of a torchtune recipe): `setup()`, `train_loop()`, `save()`.

    Each step is a method, so a test (or a subclass) can observe or replace one of them with
    monkeypatch; `train()` runs them in order under the output directory's lock.
    """

    def __init__(self, cfg: TrainConfig, accelerator, device: torch.device, log, loaded=None):
        from .embedded import embedded_model_dir

        self.cfg, self.accelerator, self.device, self.log, self.loaded = cfg, accelerator, device, log, loaded
        self.is_main, self.rank, self.world = (accelerator.is_main_process, accelerator.process_index,
                                               accelerator.num_processes)
        self.out_dir = Path(cfg.out_dir)
        self.metrics_file = self.out_dir / METRICS
        self.model_path = embedded_model_dir() if cfg.model == "embedded" else Path(cfg.model)
        self.data_source = embedded_dataset_path() if cfg.data == "embedded" else cfg.data
        self.batch_size = cfg.per_process_batch(self.world)
        self.compute_dtype = resolve_dtype(cfg.quant.compute_dtype if cfg.quant else "auto", device)
        self.monitor = MemoryMonitor(device)
        self.state: dict[str, Any] = {"losses": [], "eval_losses": [], "tokens": 0, "world_size": self.world,
                                      "fsdp": cfg.fsdp}
        self.start_step = 0
        self.plan: MemoryEstimate | None = None
        self.chunked_loss: ChunkedLoss | None = None  # installed for this run's loop only (train_loop removes it)

    # ---- setup ------------------------------------------------------------------------------

    def setup(self) -> None:
        check_launcher(self.accelerator)
        self.settings = RunSettings.for_run(self.model_path, self.cfg.quant, self.cfg.lora, self.compute_dtype,
                                             self.device)
        self.resume_from = check_out_dir(self.out_dir, self.cfg.resume, self.cfg.overwrite_output_dir, self.settings,
                                         self.cfg.fsdp, self.world, self.is_main)
        self.setup_data()
        self.plan = _memory_plan(self.cfg, self.model_path, self.batch_size, self.world, self.device,
                                 self.compute_dtype, self.log)
        self.setup_model()
        self.setup_optimizer()
        if self.resume_from is not None:
            self.resume(self.resume_from)

    def setup_data(self) -> None:
        """Tokenize the data before the model loads: a bad file costs seconds, not a model load."""
        cfg = self.cfg
        self.tokenizer = self.loaded[1] if self.loaded is not None else load_tokenizer(self.model_path)
        self.train_set, self.eval_set = prepare_data(self.data_source, self.tokenizer, cfg, log=self.log)
        self.log(f"data: {self.train_set.summary()}")
        if self.eval_set is not None and len(self.eval_set) > MAX_EVAL_EXAMPLES:
            self.log(f"eval: {MAX_EVAL_EXAMPLES:,} of {len(self.eval_set):,} held-out examples (MAX_EVAL_EXAMPLES)")
            self.eval_set = self.eval_set[:MAX_EVAL_EXAMPLES]

    def setup_model(self) -> None:
        """The NF4 base + LoRA: loaded here (three ways, see below) or handed in (`loaded`)."""
        cfg, device, world = self.cfg, self.device, self.world
        mesh = fsdp_mesh(device) if cfg.fsdp else None  # every process together, before the turns below
        if cfg.fsdp and self.loaded is None and cfg.quant is not None and not is_prequantized(self.model_path):
            # the checkpoint is read and quantized once, by rank 0; the others receive their shards
            model, _, params = load_sharded(self.model_path, cfg.quant, cfg.lora, device, self.compute_dtype, mesh)
            self.log("fsdp: rank 0 read and quantized the checkpoint; every process received its shards from it")
        elif cfg.fsdp:
            # (a 4-bit checkpoint, quant=None, or a model handed in) the processes load one after another,
            # each freeing its whole copy once sharded: the host holds one whole model at a time
            model, params = in_turns(lambda: self._load_and_shard(mesh))
            self.log(f"fsdp: the {world} process(es) loaded the model in turns")
        else:
            model, params = self._load_and_shard(mesh)
        self.model, self.params = model, params
        self.log(f"model {self.model_path}: {params}")
        self.base_bytes = resident_base_bytes(model)  # this process's share under FSDP; the whole base otherwise
        if cfg.fsdp:
            self.log(f"fsdp: {world} process(es); this one holds {self.base_bytes:,} bytes "
                     f"({self.base_bytes / GiB:.2f} GiB) of the quantized base")
        self.monitor.mark("after_load")

    def _load_and_shard(self, mesh):
        from .inject import count_parameters

        cfg = self.cfg
        if self.loaded is None:
            # under FSDP on GPUs: quantize on the GPU, stage the bytes on the host, FSDP moves each shard back;
            # offload_base: the base stays on the host (install_base_offload moves the rest to the GPU)
            on_host = (cfg.fsdp or cfg.offload_base) and self.device.type == "cuda"
            storage = torch.device("cpu") if on_host else None
            model, _ = load_model(self.model_path, cfg.quant, cfg.lora, device=self.device,
                                  compute_dtype=self.compute_dtype, storage_device=storage, with_tokenizer=False)
        else:
            model = self.loaded[0]
        params = count_parameters(model)
        if cfg.fsdp:  # FSDP2 replaces the parameters with shards (the optimizer is built on those below)
            shard_model(model, self.device, mesh)
            release_free_memory()  # give the freed whole copy back to the OS before the next process loads
        return model, params

    def setup_optimizer(self) -> None:
        cfg, model = self.cfg, self.model
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        if cfg.offload_base:  # the NF4 base in host memory, layer by layer on the device (offload.py)
            if self.world > 1:
                raise TrainingError(f"offload_base=true runs in one process and {self.world} were launched: launch "
                                    "one, or shard the base over the GPUs with fsdp: true instead")
            self.base_offloader = install_base_offload(model, self.device)
            self.log(f"offload_base: {self.base_offloader.host_bytes / GiB:.2f} GiB of NF4 base in host memory, "
                     f"{len(self.base_offloader.layers)} layers fetched one at a time")
        apply_speedups(model, cfg.fused_kernels, cfg.compile, self.device, self.log, cfg.lean_ops)
        if cfg.mlp_chunk_tokens:  # long context (offload.py): chunks of the (fused) MLP; block inputs on the host
            install_tiled_mlp(model, cfg.mlp_chunk_tokens)
        if cfg.offload_activations:
            self.offloader = install_activation_offload(model, self.device)
        model.train()
        if cfg.loss_chunk_tokens:
            why_not = supports_chunked_loss(model)
            if why_not is None:
                self.chunked_loss = install_chunked_loss(model, cfg.loss_chunk_tokens)
            else:
                self.log(f"note: the loss uses the full logits: {why_not}")
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(self.trainable, cfg, self.device, self.log)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        if not cfg.fsdp:
            # (offload_base: the model is placed already; accelerate's placement would move the base too)
            self.model, optimizer = self.accelerator.prepare(model, optimizer,
                                                             device_placement=[not cfg.offload_base, True])
        self.optimizer = optimizer

    def unwrapped(self):
        """The model itself (DDP wraps it; an FSDP2 model is the model)."""
        return self.model if self.cfg.fsdp else self.accelerator.unwrap_model(self.model)

    def resume(self, checkpoint: Path) -> None:
        self.state = load_checkpoint(checkpoint, self.unwrapped(), self.optimizer, self.scheduler, self.cfg.fsdp,
                                     self.rank)
        self.start_step = self.state["step"]
        if self.is_main:
            truncate_metrics(self.metrics_file, self.start_step)
        self.log(f"resumed from {checkpoint} at step {self.start_step}")

    # ---- the loop ---------------------------------------------------------------------------

    def evaluate(self) -> float:
        return evaluate(self.model, self.eval_set, self.batch_size, self.tokenizer.pad_token_id, self.device,
                        self.rank, self.world)

    def emit_metrics(self, record: dict[str, Any]) -> None:
        """The one place a step's metrics leave the run (metrics.jsonl; valid JSON: no NaN or inf)."""
        if not self.is_main:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_file, "a") as handle:
            handle.write(json.dumps(clean, allow_nan=False) + "\n")
        self.trackers.log(clean, clean["step"])

    def train_step(self, batches: Iterator, step: int) -> tuple[float, int, float]:
        """One optimizer step over grad_accum micro-batches: (mean loss, tokens, gradient norm).

        The host reads from the device once per step (the losses and the norm together, before the
        optimizer touches the weights): every read waits for the GPU to finish all queued work, and a
        wait per micro-batch would leave the GPU idle while the host launches the next one.
        """
        cfg, device = self.cfg, self.device
        losses, step_tokens = [], 0
        for micro in range(cfg.grad_accum):
            batch = collate(next(batches), self.tokenizer.pad_token_id)
            step_tokens += count_tokens(batch)  # on the host copy: no wait
            # from pinned memory the copy is queued like a kernel; from pageable memory it would wait
            batch = {k: v.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else v.to(device)
                     for k, v in batch.items()}
            with _gradient_sync(self.model, self.accelerator, cfg.fsdp, micro == cfg.grad_accum - 1):
                loss = self.model(**batch).loss
                self.accelerator.backward(loss / cfg.grad_accum)
            losses.append(loss.detach().float())
        norm = None
        if cfg.max_grad_norm > 0:  # torch's clip handles FSDP's sharded grads (a DTensor norm)
            clip = torch.nn.utils.clip_grad_norm_ if cfg.fsdp else self.accelerator.clip_grad_norm_
            norm = full_tensor(clip(self.trainable, cfg.max_grad_norm)).float().reshape(1)
        read = (torch.stack(losses) if norm is None else torch.cat([torch.stack(losses), norm.to(device)])).tolist()
        micro_losses = read[:cfg.grad_accum]
        bad = [v for v in micro_losses if not math.isfinite(v)]
        if bad:
            last = latest_checkpoint(self.out_dir)
            raise TrainingError(
                f"loss became {bad[0]} at step {step + 1}; training stopped and nothing was "
                f"overwritten (last good checkpoint: {last or 'none'}). Try a lower learning_rate, bf16 "
                f"instead of fp16, or a smaller max_grad_norm")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        grad_norm = read[-1] if norm is not None else float("nan")  # (not computed without clipping)
        return sum(micro_losses) / cfg.grad_accum, step_tokens, grad_norm

    def train_loop(self) -> tuple[int, bool]:
        """Steps from the start (or resumed) step to max_steps; returns (last step, interrupted)."""
        cfg, world = self.cfg, self.world
        self.trackers = Trackers(cfg.report_to if self.is_main else [], self.out_dir, cfg.to_dict(),
                                 constants=None if self.plan is None else {"predicted_bytes": self.plan.total_bytes})
        if self.eval_set is not None and self.start_step == 0:  # the baseline every later eval is compared with
            baseline = self.evaluate()
            self.state["eval_losses"].append([0, baseline])
            self.log(f"eval loss before training: {baseline:.4f}")
            self.emit_metrics({"step": 0, "eval_loss": round(baseline, 6)})
        batches = batch_iterator(self.train_set, self.batch_size, seed=cfg.seed,
                                 start_step=self.start_step * cfg.grad_accum, rank=self.rank, world_size=world)
        progress = None
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm

            progress = tqdm(total=cfg.max_steps, initial=self.start_step, desc="training", unit="step",
                            dynamic_ncols=True)
        step, interrupted, self.t_start, self.tokens_run = self.start_step, False, time.perf_counter(), 0
        with _StopSignal() as stop:
            while step < cfg.max_steps:
                t0 = time.perf_counter()
                step_loss, step_tokens, grad_norm = self.train_step(batches, step)
                step += 1
                if step == self.start_step + 1:
                    self.monitor.mark("first_step")
                stop_now = stop.received is not None
                if world > 1:  # one all-reduce: the global mean loss, and whether any process was told to stop
                    # (every process must stop after the same step, or their collectives would no longer pair up)
                    shared = self.accelerator.reduce(torch.tensor([step_loss, float(stop_now)], device=self.device),
                                                     "sum")
                    step_loss, stop_now = shared[0].item() / world, shared[1].item() > 0
                elapsed = time.perf_counter() - t0
                self.tokens_run += step_tokens * world
                self.state["losses"].append(step_loss)
                self.state["tokens"] += step_tokens * world
                record = {"step": step, "loss": round(step_loss, 6), "lr": self.scheduler.get_last_lr()[0],
                          "grad_norm": round(grad_norm, 6),
                          "tokens_per_s": round(step_tokens * world / elapsed, 1),  # all processes together
                          "step_s": round(elapsed, 4), **self.monitor.current()}
                if self.eval_set is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                    eval_loss = self.evaluate()
                    self.state["eval_losses"].append([step, eval_loss])
                    record.update(eval_loss=round(eval_loss, 6), eval_ppl=round(math.exp(min(eval_loss, 50)), 3))
                if step % cfg.log_every == 0 or "eval_loss" in record or step == cfg.max_steps:
                    self.emit_metrics(record)
                if progress:
                    progress.set_postfix(loss=f"{step_loss:.3f}", lr=f"{record['lr']:.2e}",
                                         tok_s=f"{record['tokens_per_s']:.0f}", mem=self.monitor.short())
                    progress.update(1)
                if step % cfg.save_every == 0 or step == cfg.max_steps or stop_now:
                    self.save_checkpoint(step)
                if stop_now:
                    interrupted = True
                    self.log(f"received signal {stop.received or '(on another process)'}: checkpoint saved at step "
                             f"{step}; continue with --resume")
                    break
        if progress:
            progress.close()
        if self.chunked_loss is not None:
            self.chunked_loss.remove()
        self.trackers.finish()
        self.monitor.mark("steady_state")
        return step, interrupted

    def save_checkpoint(self, step: int) -> None:
        gathered = gather_training_state(self.unwrapped(), self.optimizer, self.cfg.fsdp, self.world)
        if self.is_main:
            save_checkpoint(self.out_dir, step, self.unwrapped(), gathered, self.scheduler, self.state,
                            self.cfg.keep_last, self.settings)
        self.accelerator.wait_for_everyone()

    # ---- save -------------------------------------------------------------------------------

    def save(self, step: int, interrupted: bool) -> TrainResult:
        """The adapter (with its run settings) and memory.json, unless interrupted; the result."""
        plan = self.plan
        summary = {**self.monitor.summary(), "base_bytes_per_process": gather_objects(self.base_bytes, self.world),
                   "predicted": None if plan is None else {"total_bytes": plan.total_bytes,
                                                           "peak_phase": plan.peak_phase,
                                                           "breakdown": plan.peak_breakdown()}}
        adapter_dir = None
        if not interrupted:
            unwrapped = self.unwrapped()
            tensors = adapter_state_dict(unwrapped)  # every rank: under FSDP this all-gathers
            if self.is_main:
                adapter_dir = save_adapter(unwrapped, self.out_dir / "adapter",
                                           base_model_name_or_path=str(self.model_path), tensors=tensors,
                                           settings=self.settings)
                atomic_write_text(self.out_dir / "memory.json", json.dumps(summary, indent=2))
        total_s = time.perf_counter() - self.t_start
        return TrainResult(self.out_dir, step, interrupted, self.state["losses"],
                           [tuple(x) for x in self.state["eval_losses"]], adapter_dir,
                           self.tokens_run / total_s if total_s else 0.0, str(self.params), summary)


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
    device = accelerator.device if cfg.device == "auto" else resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    with RunLock(cfg.out_dir) if is_main else contextlib.nullcontext():
        run = TrainingRun(cfg, accelerator, device, log, loaded)
        run.setup()
        try:
            step, interrupted = run.train_loop()
        finally:
            release_dequantize_buffers()  # one weight's worth of CPU memory the steps reused
        return run.save(step, interrupted)
