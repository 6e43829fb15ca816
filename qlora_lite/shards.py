"""Read safetensors shards one tensor at a time, with plain reads instead of a memory map.

safetensors' `safe_open` maps the whole file: every page a tensor touched stays resident (and
counted in RSS) until the file is closed, and any tensor kept from it pins the mapping. Reading
each tensor with `seek` + `readinto` bounds the transient memory of a streaming load or merge to
one tensor. The header is validated first, so a truncated or corrupt file is a clear error
before anything is loaded.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .dtypes import SAFETENSORS_DTYPES
from .errors import CheckpointError, ConfigError

__all__ = ["TensorEntry", "read_header", "ShardReader", "read_quant_shape", "parse_size", "size_bytes", "SIZE_UNITS"]

_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offsets
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(file: str | Path) -> dict[str, TensorEntry]:
    """Parse and check a safetensors header as safetensors itself does: JSON, known dtypes, sizes that match
    the shapes, and byte ranges that lie in the file, are disjoint and cover the data exactly (an overlap
    would silently alias two tensors)."""
    file = Path(file)
    fix = "re-download or re-save it"
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file} is {size} bytes, too short for a safetensors file; {fix}")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{file}: header length {header_len} exceeds the file ({size} bytes); "
                                      f"the file is truncated or not safetensors; {fix}")
            raw = handle.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{file} cannot be read ({exc})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: corrupt safetensors header (not JSON: {exc}); {fix}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object); {fix}")
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{file}: corrupt header entry for {name!r}; {fix}") from None
        if dtype_name not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unknown dtype {dtype_name!r}; {fix}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise CheckpointError(f"{file}: tensor {name!r} has an invalid shape {shape!r}; {fix}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise CheckpointError(f"{file}: tensor {name!r} has invalid offsets {[begin, end]}; {fix}")
        dtype = SAFETENSORS_DTYPES[dtype_name]
        expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected:
            raise CheckpointError(f"{file}: tensor {name!r} spans {end - begin} bytes but its shape needs "
                                  f"{expected}; {fix}")
        if data_start + end > size:
            raise CheckpointError(f"{file}: tensor {name!r} ends at byte {data_start + end} but the file has "
                                  f"{size}; the file is truncated; {fix}")
        entries[name] = TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)
    _check_layout(file, entries, data_start, size, fix)
    return entries


def _check_layout(file: Path, entries: dict[str, TensorEntry], data_start: int, size: int, fix: str) -> None:
    """Byte ranges back to back from the data start to the end of the file (safetensors' own rule)."""
    position, previous = data_start, None
    for entry in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if entry.start < position:
            raise CheckpointError(f"{file}: tensors {previous!r} and {entry.name!r} overlap (bytes "
                                  f"{entry.start - data_start}..{position - data_start} of the data); corrupt header; {fix}")
        if entry.start > position:
            raise CheckpointError(f"{file}: bytes {position - data_start}..{entry.start - data_start} of the data "
                                  f"belong to no tensor (before {entry.name!r}); corrupt header; {fix}")
        position, previous = entry.end, entry.name
    if position != size:
        raise CheckpointError(f"{file}: {size - position} bytes after the last tensor belong to no tensor; "
                              f"corrupt or not safetensors; {fix}")


def read_quant_shape(reader: ShardReader, key: str) -> tuple[int, ...]:
    """The logical shape of a bitsandbytes 4-bit weight from its `….quant_state.bitsandbytes__nf4` tensor."""
    try:
        return tuple(json.loads(bytes(reader.get(key).numpy()))["shape"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{reader.file}: unreadable quant state {key} ({exc}); re-save it") from None


class ShardReader:
    """`with ShardReader(file) as shard: shard.get(name)` — a fresh tensor per call, nothing mapped."""

    def __init__(self, file: str | Path):
        self.file = Path(file)
        self.entries = read_header(self.file)
        self._handle = None

    def __enter__(self) -> ShardReader:
        self._handle = open(self.file, "rb", buffering=0)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        out = torch.empty(entry.shape, dtype=entry.dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if entry.nbytes else memoryview(b"")
        self._handle.seek(entry.start)
        filled = 0
        while filled < entry.nbytes:  # one read returns at most 2,147,479,552 bytes on Linux (and less on a signal)
            read = self._handle.readinto(view[filled:])
            if not read:
                raise CheckpointError(f"{self.file}: tensor {name!r} is cut short ({filled} of {entry.nbytes} "
                                      "bytes); the file is truncated; re-download or re-save it")
            filled += read
        return out


SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def size_bytes(text: str, unit_required: bool = False) -> int | None:
    """Bytes from '2GB' (10**9), '1GiB' (2**30), '1.5 MiB' or, unless `unit_required`, a bare '500';
    None when `text` is not a positive size. The one reading of sizes: max_shard_size and memory budgets."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", text)
    if not match or float(match[1]) <= 0 or (unit_required and not match[2]):
        return None
    factor = SIZE_UNITS.get(match[2].lower() or "b")
    return int(float(match[1]) * factor) if factor else None


def parse_size(size: int | str) -> int:
    """'2GB' -> 2_000_000_000, '1GiB' -> 2**30, 500_000 -> 500_000 (as transformers reads max_shard_size)."""
    value = None if isinstance(size, bool) else size_bytes(str(size))
    if value is None:
        raise ConfigError(f"max_shard_size={size!r} is not a positive size; use bytes or e.g. '500MB', '2GB', '1GiB'")
    return value
