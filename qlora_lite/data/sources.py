"""Where records come from: local files and folders, `datasets` objects, Python lists, and mixtures.

Everything is read through Hugging Face `datasets` (Arrow tables, memory-mapped, cached on disk):

    a .jsonl / .json / .csv / .parquet file, or a folder of them   → datasets.load_dataset(<builder>)
    a folder written by Dataset.save_to_disk                        → datasets.load_from_disk
    a datasets.Dataset, or a list / iterable of dicts               → as given
    [{"path": ..., "weight": w, "data_format"?: ..., "columns"?: ...}, ...]  → a weighted mixture

Only local data is read: a hub-style name (``org/name``) without a local path is refused with the
command that downloads it. Each record is turned into the canonical form of schemas.py by a
`Dataset.map` (cached for file-backed sets like any `datasets` transform).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DataError
from .schemas import check_columns, to_canonical

if TYPE_CHECKING:
    import datasets

__all__ = ["DataSpec", "BUILDERS", "load_records", "data_specs", "mix", "embedded_dataset_path"]

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SPEC_KEYS = {"path", "weight", "data_format", "columns"}


@dataclass(frozen=True)
class DataSpec:
    """One data set of a run: its source, its mixing weight and how to read its records."""

    path: Any  # a local path, a datasets.Dataset or a list of dicts
    weight: float = 1.0
    data_format: str = "auto"
    columns: Mapping[str, str] | None = None


def _canonical_features() -> datasets.Features:
    from datasets import Features, List, Value

    return Features({"text": Value("string"),
                     "messages": List({"role": Value("string"), "content": Value("string")})})


def _hub_hint(path: Path) -> str:
    if _HUB_NAME.match(str(path)) and not path.suffix:
        return (f"; {path} looks like a Hugging Face Hub name, and qlora-lite reads local data only: download it "
                f"first (`hf download {path} --repo-type dataset --local-dir data/{path.name}`) and pass that folder")
    return "; pass a local .jsonl/.json/.csv/.parquet file, a folder of them, or a save_to_disk folder"


def _data_files(path: Path) -> tuple[str, list[str]]:
    """The `datasets` builder and files for a file or a folder of files (all of one kind)."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS)
        if not files:
            raise DataError(f"{path}: the folder holds no {'/'.join(BUILDERS)} file and no save_to_disk data set")
    kinds = {BUILDERS.get(p.suffix.lower()) for p in files}
    if None in kinds:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(BUILDERS)}")
    if len(kinds) > 1:
        raise DataError(f"{path}: the folder mixes {sorted(kinds)} files; keep one kind per data set "
                        "(or list each as its own entry under data:)")
    return kinds.pop(), [str(p) for p in files]


def _first_bad_json_line(files: Sequence[str]) -> str | None:
    """'file:line: invalid JSON (...)' (or not UTF-8) for the first line that does not parse (JSON Lines files)."""
    for name in files:
        with open(name, "rb") as handle:
            raw = handle.read()
        try:  # a .json file may be one JSON document (a list of records)
            json.loads(raw)
            continue
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
        for lineno, raw_line in enumerate(raw.split(b"\n"), start=1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"{name}:{lineno}: not valid UTF-8 (byte {e.start + 1} of the line); save the file as UTF-8"
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                return (f"{name}:{lineno}: invalid JSON ({e.msg}, column {e.colno}); each line must hold one "
                        "complete JSON object")
    return None


def _first_line_not_an_object(files: Sequence[str]) -> str | None:
    """'file:line: ...' for the first non-blank line of a JSON Lines file that does not start a JSON object.

    Checked before pyarrow reads the file: pyarrow 26's JSON reader crashes the process (a segfault, not an
    exception) on a line such as `null]` — JSON Lines records are objects, so such a line is refused here.
    A file holding one JSON document (a list of records) is left to the reader."""
    for name in files:
        with open(name, "rb") as handle:
            raw = handle.read()
        if raw.lstrip()[:1] == b"[":
            continue
        try:  # one JSON document (not JSON Lines): the reader decides what it holds
            json.loads(raw)
            continue
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
        for lineno, line in enumerate(raw.split(b"\n"), start=1):
            start = line.lstrip()[:1]
            if start and start != b"{":
                located = _first_bad_json_line([name])
                return located or (f"{name}:{lineno}: not a JSON object; each line must hold one record, "
                                   '{"text": ...} or {"messages": [...]}')
    return None


def _utf8_error(path: Path) -> str:
    """The message for a source whose text is not UTF-8: file and line where we can find them."""
    try:
        builder, files = _data_files(path)
    except DataError:  # (a save_to_disk folder, or a Dataset passed in)
        builder, files = None, []
    located = _first_bad_json_line(files) if builder == "json" else None
    return located or f"{path}: not valid UTF-8; save the file as UTF-8"


def _read_path(path: Path, cache_dir: str | None) -> datasets.Dataset:
    import datasets

    if not path.exists():
        raise DataError(f"{path}: no such file or folder{_hub_hint(path)}")
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            raise DataError(f"{path} holds the splits {sorted(loaded)}; pass one split's folder, e.g. {path}/train")
        return loaded
    builder, files = _data_files(path)
    not_an_object = _first_line_not_an_object(files) if builder == "json" else None
    if not_an_object:
        raise DataError(not_an_object)
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
    except Exception as exc:  # pyarrow / datasets raise many types; the user needs the file and the cause
        located = _first_bad_json_line(files) if builder == "json" else None
        if located:
            raise DataError(located) from None
        if "corresponds to no data" in str(exc):
            raise DataError(f"{path}: the data set is empty; it needs at least one record") from None
        cause = str(exc.__cause__ or exc).strip().splitlines()
        raise DataError(f"{path}: cannot read it as {builder} ({cause[0] if cause else type(exc).__name__}); "
                        "check that every record has the same keys with the same types") from None


def _canonical(source: Any, data_format: str, columns: Mapping[str, str] | None,
               cache_dir: str | None) -> datasets.Dataset:
    import datasets

    problems = check_columns(columns, data_format)
    if problems:
        raise DataError("; ".join(problems))
    features = _canonical_features()
    if isinstance(source, (str, os.PathLike)):
        raw, name = _read_path(Path(source), cache_dir), str(source)
    elif isinstance(source, datasets.Dataset):
        raw, name = source, "dataset"
    elif isinstance(source, Mapping):  # e.g. a datasets.DatasetDict: its rows would be split names
        raise DataError(f"got a mapping with keys {sorted(source)[:5]}; pass one split, e.g. data['train']")
    elif isinstance(source, Iterable):  # a list of dicts: validated here, so a bad row names its index
        rows = [to_canonical(row, data_format, columns, f"record {i}") for i, row in enumerate(source)]
        if not rows:
            raise DataError("the data set is empty; it needs at least one record")
        return datasets.Dataset.from_list(rows, features=features)
    else:
        raise DataError(f"cannot read records from a {type(source).__name__}; pass a local file or folder, "
                        "a list of dicts or a datasets.Dataset")
    if len(raw) == 0:
        raise DataError(f"{name}: the data set is empty; it needs at least one record")

    def canonical(record: dict, index: int) -> dict:
        return to_canonical(record, data_format, columns, f"{name} record {index}")

    try:
        return raw.map(canonical, with_indices=True, remove_columns=raw.column_names, features=features,
                       desc="reading records")
    except UnicodeDecodeError:  # Arrow keeps a file's bytes as they are; they fail on the way to Python
        raise DataError(_utf8_error(Path(name))) from None


def load_records(source: Any, data_format: str = "auto", columns: Mapping[str, str] | None = None, *,
                 cache_dir: str | None = None) -> datasets.Dataset:
    """One data set as a `datasets.Dataset` of canonical records (``text`` or ``messages``; schemas.py).

    Bad input raises DataError naming the file (and line, for JSON that does not parse) or the record's
    index and keys.
    """
    return _canonical(source, data_format, columns, cache_dir)


def data_specs(data: Any, data_format: str = "auto", columns: Mapping[str, str] | None = None) -> list[DataSpec]:
    """The data sets of a run: `data` is one source, or a list of ``{"path", "weight", ...}`` entries."""
    entries = list(data) if isinstance(data, (list, tuple)) else None
    if not entries or not all(isinstance(e, Mapping) and "path" in e and set(e) <= _SPEC_KEYS for e in entries):
        return [DataSpec(data, 1.0, data_format, columns)]
    specs = []
    for i, entry in enumerate(entries):
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise DataError(f"data[{i}]: weight={weight!r} must be a positive number")
        specs.append(DataSpec(entry["path"], float(weight), entry.get("data_format", data_format),
                              entry.get("columns", columns)))
    return specs


def mix(sets: Sequence[datasets.Dataset], weights: Sequence[float], seed: int) -> datasets.Dataset:
    """Interleave data sets, drawing each example from set i with probability weight_i / sum(weights).

    Deterministic given `seed` (the same mixture, example for example, so a resumed run continues at
    the same example). Draws go on until every set has been seen in full once ("all_exhausted"), so
    no record is left out; a set with a large weight but few records is repeated.
    """
    from datasets import interleave_datasets

    if len(sets) == 1:
        return sets[0]
    total = sum(weights)
    return interleave_datasets(list(sets), probabilities=[w / total for w in weights], seed=seed,
                               stopping_strategy="all_exhausted")


def embedded_dataset_path() -> Path:
    """Path of the shipped demo chat data (Captain Quill persona; see scripts/make_demo_data.py)."""
    return Path(str(resources.files("qlora_lite.datasets") / "demo_chat.jsonl"))
