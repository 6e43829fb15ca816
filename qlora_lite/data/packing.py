"""Tokenized examples → (optionally packed) rows → padded batches.

Packing puts whole examples, in order, into rows of at most ``seq_len`` tokens so batches carry
little padding. Two modes:

- ``isolated`` (the default): no cross-talk. Each row carries ``position_ids`` that restart at 0 for
  every example, and the first label of every example is masked (one by one, nothing predicts an
  example's first token). `collate` then leaves out the 2-D ``attention_mask``, and transformers
  derives the block-diagonal causal mask from the position ids (masking_utils'
  find_packed_sequence_indices; SDPA/eager/flex). Each example's loss equals its loss alone
  (tests/test_data.py::test_isolated_packing_equals_one_by_one). transformers only does so without a KV
  cache (load_model sets use_cache=False; a cache would silently bring back plain causal attention). FlashAttention's variable-length
  path reads the same position ids but only for a batch flattened into one row: ``collate(...,
  flatten=True)``.
- ``concat``: the examples simply follow each other under plain causal attention, so a token also
  attends to the examples before it in its row (the end-of-turn token tells the model where one
  ends). Kept because SDPA can then use its causal kernel without a mask; the price is cross-talk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .tokenize import IGNORE_INDEX, Example

__all__ = ["PackingMode", "TokenizedDataset", "pack_rows", "collate", "count_tokens"]

PackingMode = Literal["isolated", "concat"]
PACKING_MODES = ("isolated", "concat")
PAD_POSITION = -1  # position id of padding in packed batches: marks it (count_tokens), each pad its own segment


def pack_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Greedily group consecutive examples (by index) into rows of at most seq_len tokens."""
    rows: list[list[int]] = []
    row: list[int] = []
    used = 0
    for index, length in enumerate(lengths):
        if row and used + length > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(index)
        used += length
    if row:
        rows.append(row)
    return rows


@dataclass(frozen=True)
class TokenizedDataset(Sequence[Example]):
    """Tokenized examples (packed into rows when `packed`) plus the statistics a user wants first.

    `examples` holds ``{"input_ids", "labels"}`` per example: a list, or a memory-mapped
    `datasets.Dataset`, read one row at a time, so a large set is never held as Python lists.
    """

    examples: Sequence[Example]
    seq_len: int
    packed: bool
    n_records: int  # records read
    n_truncated: int  # records cut to seq_len
    n_skipped: int  # records left without any trainable token after truncation (dropped)
    total_tokens: int
    trainable_tokens: int  # labels != -100 after the one-token shift (what the loss trains on)
    packing_mode: PackingMode = "isolated"
    rows: tuple[tuple[int, ...], ...] | None = None  # packed: the example indices of each row

    def __len__(self) -> int:
        return len(self.rows) if self.packed else len(self.examples)

    def __getitem__(self, index: int | slice) -> Example | list[Example]:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not self.packed:
            example = self.examples[index]
            return {"input_ids": list(example["input_ids"]), "labels": list(example["labels"])}
        row: Example = {"input_ids": [], "labels": []}
        if self.packing_mode == "isolated":
            row["position_ids"] = []
        for j in self.rows[index]:
            example = self.examples[j]
            row["input_ids"] += example["input_ids"]
            if self.packing_mode == "isolated":
                row["labels"] += [IGNORE_INDEX, *example["labels"][1:]]
                row["position_ids"] += range(len(example["input_ids"]))
            else:
                row["labels"] += example["labels"]
        return row

    def summary(self) -> str:
        packed = f", packed ({self.packing_mode}) into {len(self)} rows" if self.packed else ""
        return (
            f"{self.n_records} records{packed}: {self.total_tokens} tokens, "
            f"{self.trainable_tokens} trained; {self.n_truncated} truncated to {self.seq_len}, "
            f"{self.n_skipped} skipped (no trainable token left)"
        )


def collate(batch: Sequence[Example], pad_token_id: int, flatten: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example: input_ids with pad_token_id, labels with -100.

    Plain examples get a 2-D attention_mask. Isolated packed rows (with ``position_ids``) get none:
    their position ids carry the example boundaries, and padding gets position -1 (each padding
    token then forms its own one-token segment). ``flatten=True`` concatenates packed rows into one
    row without padding, the form FlashAttention's variable-length path needs.
    """
    if not batch:
        raise ValueError("collate needs at least one example")
    packed = "position_ids" in batch[0]
    if flatten and packed:
        batch = [{key: [v for ex in batch for v in ex[key]] for key in ("input_ids", "labels", "position_ids")}]
    width = max(len(ex["input_ids"]) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.full((len(batch), width), PAD_POSITION, dtype=torch.long) if packed else \
        torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        input_ids[i, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        mask[i, :n] = torch.tensor(ex["position_ids"], dtype=torch.long) if packed else 1
    return {"input_ids": input_ids, "labels": labels, ("position_ids" if packed else "attention_mask"): mask}


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (not padding) tokens in a collated batch."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int((batch["position_ids"] != PAD_POSITION).sum())
