"""Training checkpoints and the state of an output directory: what a run may start from or continue.

    out_dir/checkpoints/step-NNNNNN/   adapter/ (+ qlora_lite.json), training_state.pt, trainer_state.json
    out_dir/metrics.jsonl              one JSON object per logged step; cut back to the checkpoint on resume

A checkpoint holds the adapter, optimizer, scheduler, every process's RNG state and the step, so a
resumed run continues bit-for-bit where an uninterrupted one would be. It also records the run
settings (settings.py): a resume on another base, quantization or LoRA shape is refused before the
model is loaded.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, TypeVar

import torch

from .adapter import adapter_state_dict, read_adapter, save_adapter
from .errors import TrainingError
from .fsdp import copy_into_parameter, load_sharded_optimizer_state, sharded_optimizer_state
from .fsutil import atomic_directory, atomic_write_text
from .inject import lora_layers
from .settings import RunSettings, check_resume

__all__ = ["CHECKPOINTS", "METRICS", "latest_checkpoint", "gather_training_state", "save_checkpoint",
           "read_trainer_state", "check_out_dir", "load_checkpoint", "truncate_metrics", "gather_objects"]

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
PREVIOUS_RUN = (METRICS, "adapter", "memory.json", CHECKPOINTS)  # what a finished or started run leaves
T = TypeVar("T")


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (temp dirs of an interrupted write are ignored)."""
    root = Path(out_dir) / CHECKPOINTS
    done = sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


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


def gather_objects(value: T, world: int) -> list[T]:
    """`value` from every process, in rank order (gloo/nccl through torch.distributed)."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    values: list = [None] * world
    dist.all_gather_object(values, value)
    return values


def gather_training_state(model, optimizer, fsdp: bool, world: int) -> tuple[dict, dict, list]:
    """(adapter tensors, optimizer state, every process's random state), whole. Every rank calls it:
    under FSDP it all-gathers. Each process keeps its own random stream (dropout masks; the streams
    differ, e.g. only rank 0 draws the LoRA init under FSDP), so a resume restores each one."""
    optimizer_state = sharded_optimizer_state(model, optimizer) if fsdp else optimizer.state_dict()
    return adapter_state_dict(model), optimizer_state, gather_objects(_rng_state(), world)


def save_checkpoint(out_dir: Path, step: int, model, gathered: tuple[dict, dict, list], scheduler, state: dict,
                    keep_last: int, settings: RunSettings | None = None) -> Path:
    """checkpoints/step-NNNNNN, written whole or not at all; the oldest beyond `keep_last` are removed."""
    target = out_dir / CHECKPOINTS / f"step-{step:06d}"
    adapter_tensors, optimizer_state, rng_states = gathered
    recorded = {} if settings is None else {"settings": settings.to_dict()}
    with atomic_directory(target, overwrite=True) as tmp:
        save_adapter(model, tmp / "adapter", tensors=adapter_tensors, settings=settings)
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng_states},
                   tmp / "training_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**state, **recorded, "step": step}, indent=2))
    old = sorted(p for p in (out_dir / CHECKPOINTS).glob("step-*") if p != target)
    for stale in old[: max(0, len(old) - (keep_last - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return target


def read_trainer_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainingError(f"{path}/trainer_state.json cannot be read ({exc}); delete {path} to resume from the "
                            "checkpoint before it") from None


def check_out_dir(out_dir: Path, resume: bool, overwrite: bool, settings: RunSettings, fsdp: bool,
                  world: int, is_main: bool = True) -> Path | None:
    """The checkpoint to resume from (None: a new run), after refusing what would mix two runs.

    A new run needs an out_dir without a previous run's files (unless `overwrite`: the main process
    removes them); a resume needs a checkpoint written with this run's settings, fsdp and process count.
    """
    existing = latest_checkpoint(out_dir)
    previous = [name for name in PREVIOUS_RUN if (out_dir / name).exists()]
    if resume and existing is not None:
        _check_compatible(existing, read_trainer_state(existing), settings, fsdp, world)
        return existing
    if not previous:
        return None
    if overwrite:
        for path in (out_dir / name for name in previous if is_main):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        return None
    if existing is not None:
        raise TrainingError(f"{out_dir} already holds checkpoints; pass --resume true to continue that run, "
                            "--overwrite_output_dir true to start over, or choose another out_dir")
    raise TrainingError(f"{out_dir} holds a previous run ({', '.join(previous)}) without a checkpoint to resume "
                        "from; choose another out_dir, or pass --overwrite_output_dir true to replace it")


def _check_compatible(path: Path, state: dict[str, Any], settings: RunSettings, fsdp: bool, world: int) -> None:
    if state.get("fsdp", False) != fsdp:
        raise TrainingError(f"{path} was written with fsdp={str(state.get('fsdp', False)).lower()} and this run has "
                            f"fsdp={str(fsdp).lower()}; the optimizer state is stored differently. Resume with the "
                            f"same setting, or start a new run initialised from {path / 'adapter'}")
    if state.get("world_size", 1) != world:
        raise TrainingError(
            f"{path} was written by a run on {state.get('world_size', 1)} process(es) but this run has "
            f"{world}; the data order and the per-process batch depend on it. Resume with "
            f"{state.get('world_size', 1)} process(es), or start a new run initialised from {path / 'adapter'}")
    check_resume(state.get("settings"), settings, path)


def load_checkpoint(path: Path, model, optimizer, scheduler, fsdp: bool, rank: int) -> dict:
    """Restore the adapter, optimizer, scheduler and this process's RNG; returns trainer_state.json."""
    state = read_trainer_state(path)
    state.pop("settings", None)  # written afresh with every checkpoint
    adapter = read_adapter(path / "adapter")
    layers = lora_layers(model)
    for module in adapter.modules:
        copy_into_parameter(layers[module].lora_A[layers[module].active_adapter], adapter.lora_A[module])
        copy_into_parameter(layers[module].lora_B[layers[module].active_adapter], adapter.lora_B[module])
        own_base = adapter.stored_base(module)
        if own_base is not None:  # LoftQ/PiSSA: the exact base trained on, not a recomputed SVD
            layers[module].weight.load_state_dict(own_base.state_dict(prefix="weight."))
        if module in adapter.magnitude:
            copy_into_parameter(layers[module].lora_magnitude_vector[layers[module].active_adapter],
                                adapter.magnitude[module])
    blob = torch.load(path / "training_state.pt", weights_only=False)
    if fsdp:
        load_sharded_optimizer_state(model, optimizer, blob["optimizer"])
    else:
        optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    _set_rng_state(blob["rng"][rank])
    return state


def truncate_metrics(metrics_file: Path, step: int) -> None:
    """Keep the lines up to `step` (a run killed after its last checkpoint logged steps it will redo)."""
    if not metrics_file.is_file():
        return
    lines = metrics_file.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] > step:
                break
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a line cut short by the kill: everything from here is past the checkpoint
        kept.append(line)
    if len(kept) != len(lines):
        atomic_write_text(metrics_file, "".join(kept))
