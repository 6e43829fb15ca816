"""Which examples go where: the train/eval split and the seeded, resumable, rank-sliced batch order."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch

from ..errors import ConfigError, DataError

__all__ = ["split_indices", "split_train_eval", "batches_per_epoch", "batch_iterator"]

T = TypeVar("T")


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices of n records, each in increasing order; see split_train_eval."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction={eval_fraction!r} must be in [0, 1)", "data arguments")
    n_eval = max(1, round(n * eval_fraction)) if eval_fraction > 0 else 0
    if n_eval >= n:
        raise DataError(f"{n} records are too few to hold out {n_eval}; add data or lower eval_fraction")
    held_out = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_eval].tolist())
    return [i for i in range(n) if i not in held_out], sorted(held_out)


def split_train_eval(records: Sequence[T], eval_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Hold out round(eval_fraction·n) items (at least one if eval_fraction > 0) for evaluation.

    The choice depends only on (n, eval_fraction, seed); both parts keep the input order.
    """
    train, held_out = split_indices(len(records), eval_fraction, seed)
    if hasattr(records, "select"):  # a datasets.Dataset: index views, no copy
        return records.select(train), records.select(held_out)
    return [records[i] for i in train], [records[i] for i in held_out]


def batches_per_epoch(n_examples: int, batch_size: int, world_size: int = 1, drop_last: bool = True) -> int:
    """Global batches (of batch_size·world_size examples) in one epoch of `batch_iterator`."""
    global_batch = batch_size * world_size
    if n_examples == 0 or (drop_last and n_examples < global_batch):
        raise DataError(
            f"{n_examples} examples are fewer than one global batch of {global_batch} "
            f"(batch_size {batch_size} x {world_size} processes); add data, lower the batch size "
            "or use drop_last=False"
        )
    return n_examples // global_batch if drop_last else -(-n_examples // global_batch)


def batch_iterator(
    dataset: Sequence[T],
    batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
    epochs: int | None = None,
) -> Iterator[list[T]]:
    """Yield this rank's batches of `batch_size` examples, endlessly or for `epochs` epochs.

    Epoch e visits the examples in the order ``torch.randperm(n, generator=seed + e)``, cut
    into global batches of batch_size·world_size; rank r gets the r-th contiguous slice of
    each, so the ranks' batches together equal a single process's global batch.
    `start_step` is the global batch index to start from (batches, not optimizer steps), so a
    resumed run sees exactly the batches an uninterrupted one would. An epoch's incomplete
    last global batch is dropped (drop_last=True) or completed from the start of the same
    epoch's order (as torch's DistributedSampler pads), so every rank always gets a full batch.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or start_step < 0:
        raise ConfigError(
            f"need batch_size ≥ 1, world_size ≥ 1, 0 ≤ rank < world_size and start_step ≥ 0; got "
            f"batch_size={batch_size}, world_size={world_size}, rank={rank}, start_step={start_step}",
            "batch iterator arguments",
        )
    n = len(dataset)
    per_epoch = batches_per_epoch(n, batch_size, world_size, drop_last)

    def batches() -> Iterator[list[T]]:  # a generator inside, so the checks above run at the call
        step, order_epoch, order = start_step, -1, []
        while epochs is None or step < epochs * per_epoch:
            epoch, k = divmod(step, per_epoch)
            if epoch != order_epoch:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
                order_epoch = epoch
            first = (k * world_size + rank) * batch_size
            yield [dataset[order[(first + j) % n]] for j in range(batch_size)]
            step += 1

    return batches()
