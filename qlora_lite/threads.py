"""How many CPU threads torch should use now, on a machine other work may be using.

Used by the demo, `qlora-lite train` on a CPU, and the test suite; `OMP_NUM_THREADS` always wins.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

__all__ = ["pick_threads"]


def _other_runnable_processes(samples: int = 3) -> int | None:
    """Processes on a CPU or waiting for one right now, besides this one (/proc/loadavg; None off Linux)."""
    try:
        counts = []
        for _ in range(samples):
            counts.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1)
            time.sleep(0.01)
        return max(counts)
    except (OSError, ValueError, IndexError):
        return None


def pick_threads(max_threads: int | None = None, load: float | None = None, running: int | None = None) -> int:
    """CPU threads for torch now: the cores that other work leaves idle, at least 1.

    A training step is hundreds of small ops, each ending at an OpenMP barrier; a thread that
    shares its core with another process makes every one of them wait, so on a busy machine
    fewer threads are faster (measured in docs/benchmarks.md, "Threads on a busy machine").
    Other work = the 1-minute load average, capped by the processes runnable right now besides
    this one (the average still counts work that just ended, e.g. the previous test). OMP_NUM_THREADS,
    when set, is the user's choice and wins.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        running = _other_runnable_processes() if running is None else running
    busy = load if running is None else min(load, running)
    return max(1, min(cores, max_threads or cores, round(cores - busy)))
