"""The data sets a run trains and evaluates on, from sources to TokenizedDatasets.

    data_specs(data)                 one source, or weighted entries [{path, weight, ...}, ...]
      └ per source: load_records     → canonical records (sources.py; schemas.py)
                    tokenize_dataset → input_ids / labels, cached on disk (tokenize.py)
                    split_indices    → the same train / eval split of its records as before
    mix(train parts, weights, seed)  → one deterministic mixture (eval parts are concatenated)
    finish                           → drop untrainable examples, check truncation, pack (packing.py)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, DataError
from .batching import split_indices
from .packing import PACKING_MODES, PackingMode, TokenizedDataset, pack_rows
from .sources import data_specs, load_records, mix
from .tokenize import IGNORE_INDEX, Truncation, check_args, tokenize_dataset, too_long

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from ..config import TrainConfig

__all__ = ["build_dataset", "prepare_data", "finish"]


def finish(tokenized: datasets.Dataset, seq_len: int, *, packing: bool = False,
           packing_mode: PackingMode = "isolated", truncation: Truncation = "truncate") -> TokenizedDataset:
    """Drop examples without a trainable token, refuse over-long ones under truncation='error', pack.

    Examples whose trainable tokens all fall beyond seq_len are dropped and counted as skipped (an
    all-masked example only adds padding, and a NaN loss when alone in a batch).
    """
    import numpy as np

    check_args(seq_len, truncation)
    if packing_mode not in PACKING_MODES:
        raise ConfigError(f"packing_mode={packing_mode!r} must be one of {', '.join(PACKING_MODES)}", "data arguments")
    stats = tokenized.select_columns(["n_tokens", "n_trainable", "index"]).with_format("numpy")[:]
    n_tokens, n_trainable = stats["n_tokens"], stats["n_trainable"]
    over = np.flatnonzero(n_tokens > seq_len)
    if truncation == "error" and over.size:
        raise too_long(f"record {int(stats['index'][over[0]])}", int(n_tokens[over[0]]), seq_len)
    keep = np.flatnonzero(n_trainable > 0)
    if not keep.size:
        raise DataError(f"no record has a trainable token within seq_len={seq_len} (the first token of a "
                        "sequence is never predicted); raise seq_len")
    lengths = np.minimum(n_tokens[keep], seq_len)
    examples = tokenized.select(keep).select_columns(["input_ids", "labels"])
    rows = tuple(map(tuple, pack_rows(lengths.tolist(), seq_len))) if packing else None
    trainable = int(n_trainable[keep].sum())
    if packing and packing_mode == "concat":  # there an example's first label is a target, unless it opens a row
        trainable += sum(examples[j]["labels"][0] != IGNORE_INDEX for row in rows for j in row[1:])
    return TokenizedDataset(
        examples=examples, seq_len=seq_len, packed=packing, n_records=len(tokenized), n_truncated=int(over.size),
        n_skipped=len(tokenized) - int(keep.size), total_tokens=int(lengths.sum()), trainable_tokens=trainable,
        packing_mode=packing_mode, rows=rows)


def build_dataset(
    source: Any,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    *,
    packing: bool = False,
    packing_mode: PackingMode = "isolated",
    truncation: Truncation = "truncate",
    data_format: str = "auto",
    columns: Mapping[str, str] | None = None,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
) -> TokenizedDataset:
    """Load, validate and tokenize every record of one `source` (sources.load_records); optionally pack."""
    check_args(seq_len, truncation)
    records = load_records(source, data_format, columns, cache_dir=cache_dir)
    tokenized = tokenize_dataset(records, tokenizer, seq_len, cache_dir=cache_dir, num_proc=num_proc)
    return finish(tokenized, seq_len, packing=packing, packing_mode=packing_mode, truncation=truncation)


def prepare_data(data: Any, tokenizer: PreTrainedTokenizerBase, cfg: TrainConfig,
                 log: Callable[[str], Any] = lambda message: None) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """The (train, eval) sets of a run: `data` is the resolved `cfg.data` (see the module docstring).

    The eval split is taken from each source before mixing, so a record repeated by the mixture never
    lands on both sides. The eval set is never packed and always truncated.
    """
    from datasets import concatenate_datasets

    specs = data_specs(data, cfg.data_format, cfg.columns)
    train_parts, eval_parts = [], []
    for spec in specs:
        records = load_records(spec.path, spec.data_format, spec.columns, cache_dir=cfg.data_cache_dir)
        log(f"data: tokenizing {len(records):,} records")  # minutes for a large set: say what is happening
        tokenized = tokenize_dataset(records, tokenizer, cfg.seq_len, cache_dir=cfg.data_cache_dir,
                                     num_proc=cfg.data_num_proc)
        train, held_out = split_indices(len(tokenized), cfg.eval_fraction, cfg.seed)
        train_parts.append(tokenized.select(train))
        if held_out:
            eval_parts.append(tokenized.select(held_out))
    train_set = finish(mix(train_parts, [s.weight for s in specs], cfg.seed), cfg.seq_len, packing=cfg.packing,
                       packing_mode=cfg.packing_mode, truncation=cfg.truncation)
    if not eval_parts:
        return train_set, None
    held_out = concatenate_datasets(eval_parts)
    try:
        return train_set, finish(held_out, cfg.seq_len)
    except DataError:  # the training records fit: say that the held-out ones are the problem
        raise DataError(f"none of the {len(held_out)} held-out evaluation record(s) (eval_fraction="
                        f"{cfg.eval_fraction}) has a trainable token within seq_len={cfg.seq_len}; raise seq_len, "
                        "or set eval_fraction: 0") from None
