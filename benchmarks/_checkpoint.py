"""Random Llama-shaped checkpoints for the benchmarks: shards of at most `shard_bytes`, plus the index."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch


def write_sharded(directory: Path, shapes: dict[str, tuple[int, ...]], shard_bytes: int,
                  make_tensor: Callable[[str, tuple[int, ...]], torch.Tensor]) -> int:
    """Write `make_tensor(name, shape)` (bf16) for every entry, in order, one shard in memory at a time.

    Returns the total bytes; model-0000k-of-0000n.safetensors + model.safetensors.index.json.
    """
    from safetensors.torch import save_file

    groups, size = [[]], 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    weight_map = {}
    for n, keys in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({key: make_tensor(key, shapes[key]) for key in keys}, str(directory / name), {"format": "pt"})
        weight_map |= dict.fromkeys(keys, name)
    total = sum(math.prod(s) * 2 for s in shapes.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total
