"""Measuring memory during a run, and comparing it with the planner's prediction (memory.py).

`MemoryMonitor.mark(phase)` records host RSS with its true peak since the previous mark (Linux
VmHWM, reset through /proc/self/clear_refs) and, on CUDA, torch's peak allocated/reserved bytes;
the training loop marks after_load, first_step and steady_state and writes them to memory.json.
`PeakRSS` (rss.py, re-exported here) measures the peak around one block of work. `preflight` sets the
planner's prediction against what this machine has, before training loads anything.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .memory import _COMPONENTS, GiB, MemoryBudgetError, MemoryEstimate, estimate_memory
from .memory_fit import fit_to_budget
from .rss import PeakRSS, peak_rss, reset_peak_rss

__all__ = ["MemoryMonitor", "PeakRSS", "compare", "preflight"]


class MemoryMonitor:
    """`mark(phase)` records host RSS (with its true peak since the previous mark on Linux) and, on CUDA,
    torch's peak allocated/reserved bytes since the previous mark; peaks are reset after each mark."""

    def __init__(self, device: torch.device | str = "cpu"):
        import psutil

        self.device, self.phases, self._t0 = torch.device(device), {}, time.perf_counter()
        self._process = psutil.Process()
        self._cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._reset()

    def _reset(self) -> None:
        self._hwm = reset_peak_rss()
        self.peak_rss = self._process.memory_info().rss
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def current(self) -> dict[str, int]:
        rss = self._process.memory_info().rss
        self.peak_rss = max(self.peak_rss, rss, peak_rss() if self._hwm else 0)
        out = {"rss_bytes": rss, "peak_rss_bytes": self.peak_rss}
        if self._cuda:
            out.update(cuda_allocated_bytes=torch.cuda.memory_allocated(self.device),
                       cuda_peak_allocated_bytes=torch.cuda.max_memory_allocated(self.device),
                       cuda_peak_reserved_bytes=torch.cuda.max_memory_reserved(self.device))
        return out

    def mark(self, phase: str) -> dict[str, Any]:
        record = {**self.current(), "time_s": round(time.perf_counter() - self._t0, 3)}
        self.phases[phase] = record
        self._reset()
        return record

    def short(self) -> str:
        now = self.current()
        return f"{now.get('cuda_peak_allocated_bytes', now['peak_rss_bytes']) / GiB:.2f}G"

    def summary(self) -> dict[str, dict[str, Any]]:
        return dict(self.phases)


def compare(estimate: MemoryEstimate, measured: dict[str, Any]) -> str:
    """Predicted vs measured with the ratio, for each quantity in `measured`: a `mark()` record, a
    `summary()` (maximum over phases), or breakdown component names."""
    if measured and all(isinstance(v, dict) for v in measured.values()):
        measured = {k: max(r[k] for r in measured.values() if k in r) for r in measured.values() for k in r}
    total, peak = estimate.total_bytes, estimate.peak_breakdown()
    pairs = {"cuda_peak_allocated_bytes": ("CUDA peak allocated vs allocated_bytes", estimate.allocated_bytes),
             "cuda_peak_reserved_bytes": ("CUDA peak reserved vs reserved_bytes", estimate.reserved_bytes),
             "peak_rss_bytes": ("host peak RSS vs total", total),
             "rss_growth_bytes": ("RSS growth in a step vs activations+logits", estimate.transient_bytes),
             **{k: (_COMPONENTS[k], peak[k]) for k in _COMPONENTS}}
    lines = [f"{'quantity':<44}{'predicted':>12}{'measured':>12}{'ratio':>8}"]
    for key, (label, predicted) in pairs.items():
        if measured.get(key) is not None:
            ratio = measured[key] / predicted if predicted else float("inf")
            lines.append(f"{label:<44}{predicted / GiB:>10.3f}Gi{measured[key] / GiB:>10.3f}Gi{ratio:>8.2f}")
    return "\n".join(lines if len(lines) > 1 else lines + [f"(nothing to compare in {sorted(measured)})"])


def preflight(config: Any, device: torch.device | str, **estimate_kwargs: Any) -> tuple[MemoryEstimate, list[str]]:
    """The planner's prediction for a run and, if this machine looks too small for it, warnings that
    say what would fit: the GPU's memory and the host memory the load needs (CUDA), or the host's
    available memory for every process of the run (CPU). `estimate_kwargs` go to `estimate_memory`
    (seq_len, batch_size, lora, quant, world_size, fsdp, ...; `device` is set from `device`).
    """
    import psutil

    device = torch.device(device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    estimate = estimate_memory(config, device=kind, **estimate_kwargs)
    available, warnings = psutil.virtual_memory().available, []
    if kind == "cuda":
        budget, where = torch.cuda.get_device_properties(device).total_memory, torch.cuda.get_device_name(device)
        needed = estimate.required_bytes
        if estimate.host_load_bytes > available:
            warnings.append(f"loading needs about {estimate.host_load_bytes / GiB:.1f} GiB of host memory and "
                            f"{available / GiB:.1f} GiB is available; free memory or add swap before a long load")
    else:
        budget, where = available, "this machine's available memory"
        needed = estimate.total_bytes * estimate.world_size  # every process on this host
    if needed > budget:
        model = config if isinstance(config, (str, Path)) else "<model>"
        advice = f"`qlora-lite memory --model {model} --gpu {budget / GiB:.1f}GiB` finds what fits"
        if estimate.world_size == 1 or kind == "cuda":
            try:
                fit = fit_to_budget(config, budget, seq_len=estimate.seq_len, device=kind,
                                    **{k: v for k, v in estimate_kwargs.items() if k not in ("seq_len", "batch_size")})
                advice = f"batch_size {fit.value} fits at seq_len {estimate.seq_len}"
            except MemoryBudgetError as exc:
                advice = str(exc)
        warnings.append(f"the planner predicts {needed / GiB:.2f} GiB but {where} has {budget / GiB:.2f} GiB; {advice}")
    return estimate, warnings
