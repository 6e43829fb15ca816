"""Measured memory during a run: host RSS and, on CUDA, peak allocated/reserved per phase."""

from __future__ import annotations

import torch

__all__ = ["MemoryMonitor"]

GIB = 1024**3


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class MemoryMonitor:
    """`mark(phase)` records the peaks since the previous mark (CUDA peaks are reset after each)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.phases: dict[str, dict[str, int]] = {}
        self.peak_rss = _rss_bytes()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    def current(self) -> dict[str, int]:
        rss = _rss_bytes()
        self.peak_rss = max(self.peak_rss, rss)
        out = {"rss_bytes": rss}
        if self._cuda:
            out["cuda_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
            out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            out["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        return out

    def mark(self, phase: str) -> dict[str, int]:
        snapshot = self.current()
        snapshot["peak_rss_bytes"] = self.peak_rss
        self.phases[phase] = snapshot
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        return snapshot

    def short(self) -> str:
        if self._cuda:
            return f"{torch.cuda.max_memory_allocated(self.device) / GIB:.2f}G"
        return f"{self.peak_rss / GIB:.2f}G rss"

    def summary(self) -> dict[str, dict[str, int]]:
        return dict(self.phases)
