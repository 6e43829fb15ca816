"""This process's resident set size and its exact peak, with nothing above it to import.

On Linux the kernel keeps the peak resident set size (VmHWM in /proc/self/status) and resets it when
"5" is written to /proc/self/clear_refs (Linux >= 4.0), so a peak over a block of work is exact, not
sampled. Elsewhere `PeakRSS` falls back to sampling RSS in a thread. `monitor` (the run's memory marks)
and `merge` (its report) both measure with these; tests and benchmarks do so in fresh processes.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

__all__ = ["PeakRSS", "current_rss", "peak_rss", "reset_peak_rss"]


def reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS to the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return 0


def peak_rss() -> int:
    """The kernel's peak RSS since the last `reset_peak_rss` (or process start), in bytes; 0 where unknown."""
    return _status_kib("VmHWM")


def current_rss() -> int:
    """This process's RSS in bytes."""
    import psutil

    return psutil.Process().memory_info().rss


class PeakRSS:
    """`with PeakRSS() as rss: ...`: afterwards `rss.baseline` is the RSS on entry and `rss.peak` the largest
    RSS during the block. `rss.exact` says how: True when the kernel's peak (VmHWM, reset on entry) was read,
    False when RSS was sampled every `interval` seconds in a daemon thread (a short spike can be missed).
    Resetting VmHWM also resets it for anyone else reading it in this process (e.g. a MemoryMonitor)."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval

    def __enter__(self) -> PeakRSS:
        self.exact = reset_peak_rss() and peak_rss() > 0
        self.baseline = self.peak = current_rss()
        if not self.exact:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, current_rss())

    def __exit__(self, *exc_info: Any) -> None:
        if self.exact:
            self.peak = max(self.peak, peak_rss())
        else:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, current_rss())
