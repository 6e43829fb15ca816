"""Data sets → tokenized, loss-masked, optionally packed batches.

Flow::

    load_records(source)              .jsonl file / list of dicts / datasets.Dataset → validated dicts
    split_train_eval(records, f, s)   → deterministic (train, eval) split of the records
    build_dataset(source, tok, L)     → TokenizedDataset: one example per record (tokenize_record),
                                        truncated to L, optionally packed, with token stats
    batch_iterator(ds, B, seed=...)   → deterministic, resumable, rank-sliced batches of examples
    collate(batch, pad_id)            → padded input_ids / labels / attention_mask tensors

A record has one of three shapes: ``{"text": ...}`` (plain language modelling: every token is
trained), ``{"instruction": ..., "input": ... (optional), "output": ...}`` (rendered as a
one-turn chat) or ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``.
Chats go through the tokenizer's chat template, so training sees exactly the format the
model is prompted with at inference; only assistant tokens, including the template's
end-of-turn token, count in the loss (all other labels are -100). The assistant spans are
found by rendering prefixes of the conversation and tokenizing them, which works for any
template without knowing its markers.

Packing concatenates whole examples, in order, into rows of at most ``seq_len`` tokens so
batches carry little padding. The packed rows use plain causal attention, so a token can
attend to the examples before it in its row; like most fine-tuning tools we accept that
(the end-of-turn / end-of-text token between examples tells the model where one ends).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch

from .errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX", "ROLES", "TokenizedDataset", "load_records", "render_chat", "tokenize_record",
    "build_dataset", "split_train_eval", "collate", "batches_per_epoch", "batch_iterator",
    "embedded_dataset_path",
]

IGNORE_INDEX = -100  # label value the cross-entropy loss skips (PyTorch's and transformers' default)
ROLES = ("system", "user", "assistant")
Example = dict[str, list[int]]
Truncation = Literal["truncate", "error"]
Source = str | os.PathLike[str] | Iterable[Mapping[str, Any]]  # a .jsonl path, dicts, a datasets.Dataset
T = TypeVar("T")

_SHAPES = (
    '{"text": str}, {"instruction": str, "input": str (optional), "output": str} '
    'or {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}'
)


def _record_shape(record: Any, where: str) -> str:
    """Validate one record and return its shape: "text", "instruction" or "chat"."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}; use {_SHAPES}")
    keys = [key for key in ("text", "instruction", "messages") if key in record]
    if not keys:
        raise DataError(f"{where}: keys {sorted(record)} match no known record shape; use {_SHAPES}")
    if len(keys) > 1:
        raise DataError(f"{where}: keys {keys} belong to different record shapes; keep one of {_SHAPES}")

    def need_str(key: str, allow_empty: bool = False) -> None:
        value = record.get(key)
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            kind = "a string" if allow_empty else "a non-empty string"
            raise DataError(f"{where}: {key!r} must be {kind}, got {value!r:.60}")

    if keys == ["text"]:
        need_str("text")
        return "text"
    if keys == ["instruction"]:
        need_str("instruction")
        if "output" not in record:
            raise DataError(f"{where}: an instruction record needs an 'output' (the answer to train on)")
        need_str("output", allow_empty=True)
        if record.get("input") is not None:
            need_str("input", allow_empty=True)
        return "instruction"

    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for j, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: messages[{j}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(
                f"{where}: messages[{j}] has role {message['role']!r}; allowed roles: {', '.join(ROLES)}"
            )
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: messages[{j}]['content'] must be a string")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: the chat starts with an assistant message; start with a user/system one")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the chat has no assistant message, so nothing to train on")
    return "chat"


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass the path of a .jsonl file with one record per line")
    located = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start + 1} of the line); save the file "
                                "as UTF-8") from None
            if not line.strip():
                continue
            where = f"{path}:{lineno} (record {len(located)})"
            try:
                located.append((where, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno}); "
                    "each line must hold one complete JSON object"
                ) from None
    return located


def _load_located(source: Source) -> list[tuple[str, str, dict]]:
    """Read and validate records as (location for messages, shape, record) triples."""
    if isinstance(source, (str, os.PathLike)):
        located = _read_jsonl(Path(source))
        name = str(source)
    elif isinstance(source, Mapping):  # e.g. a datasets.DatasetDict: rows would be split names
        raise DataError(f"got a mapping with keys {sorted(source)[:5]}; pass one split, e.g. data['train']")
    elif isinstance(source, Iterable):  # a list of dicts, or a datasets.Dataset (iterates dicts)
        located = [(f"record {i}", row) for i, row in enumerate(source)]
        name = type(source).__name__
    else:
        raise DataError(
            f"cannot read records from a {type(source).__name__}; "
            "pass a .jsonl path, a list of dicts or a datasets.Dataset"
        )
    if not located:
        raise DataError(f"{name}: the data set is empty; it needs at least one record shaped {_SHAPES}")
    return [(where, _record_shape(record, where), dict(record)) for where, record in located]


def load_records(source: Source) -> list[dict]:
    """Load and validate records from a .jsonl path, a list of dicts or a `datasets.Dataset`.

    Blank lines are skipped. Errors name the file and line (or record index) and the fix.
    """
    return [record for _, _, record in _load_located(source)]


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool = True,
) -> str:
    """Render a conversation as the model sees it, for training and for prompting alike.

    Uses the tokenizer's chat template. A tokenizer without one (a base model) gets a plain
    format: each message as "### User:\\n<content>\\n\\n" (System/Assistant likewise), with
    the EOS token right after each assistant content so the model learns to stop, and
    "### Assistant:\\n" as the generation prompt.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
        )
    eos = tokenizer.eos_token or ""
    text = "".join(
        f"### {m['role'].capitalize()}:\n{m['content']}{eos if m['role'] == 'assistant' else ''}\n\n"
        for m in messages
    )
    return text + ("### Assistant:\n" if add_generation_prompt else "")


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # Rendered chats already contain their special tokens (BOS included, where a template has one).
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _chat_messages(record: Mapping[str, Any], shape: str) -> list[Mapping[str, str]]:
    if shape == "instruction":
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    return list(record["messages"])


def _tokenize_full(
    record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, shape: str
) -> tuple[list[int], list[int]]:
    """Untruncated input_ids and labels for a validated record."""
    if shape == "text":
        ids = list(tokenizer(record["text"])["input_ids"])
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        return ids, list(ids)

    messages = _chat_messages(record, shape)
    ids = _encode(tokenizer, render_chat(tokenizer, messages, add_generation_prompt=False))
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # Tokens shared with the rendered prompt (history + generation prompt) are context.
        prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        start = _common_prefix(ids, _encode(tokenizer, prompt))
        # The turn ends at its end-of-turn marker; template whitespace after it is not trained.
        turn = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False).rstrip()
        end = _common_prefix(ids, _encode(tokenizer, turn))
        labels[start:end] = ids[start:end]
    return ids, labels


def _check_args(seq_len: int, truncation: str) -> None:
    problems = []
    if not isinstance(seq_len, int) or seq_len < 1:
        problems.append(f"seq_len={seq_len!r} must be a positive integer")
    if truncation not in ("truncate", "error"):
        problems.append(f"truncation={truncation!r} must be 'truncate' or 'error'")
    if problems:
        raise ConfigError(problems, "data arguments")


def _fit(ids: list[int], labels: list[int], seq_len: int, truncation: Truncation, where: str) -> bool:
    """Truncate `ids`/`labels` in place to seq_len; return whether they were cut."""
    if len(ids) <= seq_len:
        return False
    if truncation == "error":
        raise DataError(
            f"{where} has {len(ids)} tokens, more than seq_len={seq_len}; "
            "raise seq_len, shorten the record, or use truncation='truncate'"
        )
    del ids[seq_len:], labels[seq_len:]
    return True


def tokenize_record(
    record: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    truncation: Truncation = "truncate",
    *,
    where: str = "record",
) -> Example:
    """Tokenize one record into ``{"input_ids", "labels"}`` (lists of ints, equal length).

    Text records train on every token plus an appended EOS; instruction and chat records
    train on assistant tokens only (see the module docstring). Longer than `seq_len`:
    "truncate" keeps the first seq_len tokens, "error" raises DataError naming `where`.
    """
    _check_args(seq_len, truncation)
    ids, labels = _tokenize_full(record, tokenizer, _record_shape(record, where))
    _fit(ids, labels, seq_len, truncation, where)
    return {"input_ids": ids, "labels": labels}


@dataclass(frozen=True)
class TokenizedDataset(Sequence[Example]):
    """Tokenized examples plus the statistics a user wants before training on them."""

    examples: list[Example]
    seq_len: int
    packed: bool
    n_records: int  # records read
    n_truncated: int  # records cut to seq_len
    n_skipped: int  # records left without any trainable token after truncation (dropped)
    total_tokens: int
    trainable_tokens: int  # labels != -100 after the one-token shift (what the loss trains on)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:  # type: ignore[override]
        return self.examples[index]

    def summary(self) -> str:
        packed = f", packed into {len(self)} rows" if self.packed else ""
        return (
            f"{self.n_records} records{packed}: {self.total_tokens} tokens, "
            f"{self.trainable_tokens} trained; {self.n_truncated} truncated to {self.seq_len}, "
            f"{self.n_skipped} skipped (no trainable token left)"
        )


def _pack(examples: list[Example], seq_len: int) -> list[Example]:
    """Greedily concatenate whole examples, in order, into rows of at most seq_len tokens."""
    rows: list[Example] = []
    row: Example = {"input_ids": [], "labels": []}
    for ex in examples:
        if row["input_ids"] and len(row["input_ids"]) + len(ex["input_ids"]) > seq_len:
            rows.append(row)
            row = {"input_ids": [], "labels": []}
        row["input_ids"] += ex["input_ids"]
        row["labels"] += ex["labels"]
    rows.append(row)
    return rows


def build_dataset(
    source: Source,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    *,
    packing: bool = False,
    truncation: Truncation = "truncate",
) -> TokenizedDataset:
    """Load, validate and tokenize every record of `source`; optionally pack them.

    Records whose trainable tokens all fall beyond seq_len are dropped and counted as
    skipped (an all-masked example only adds padding and a NaN loss when alone in a batch).
    """
    _check_args(seq_len, truncation)
    examples: list[Example] = []
    located = _load_located(source)
    n_truncated = 0
    for where, shape, record in located:
        ids, labels = _tokenize_full(record, tokenizer, shape)
        n_truncated += _fit(ids, labels, seq_len, truncation, where)
        # the model predicts token i+1 from tokens ≤ i: a label at position 0 is never trained
        if any(label != IGNORE_INDEX for label in labels[1:]):
            examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise DataError(f"no record has a trainable token within seq_len={seq_len} (the first token of a "
                        "sequence is never predicted); raise seq_len")
    rows = _pack(examples, seq_len) if packing else examples
    return TokenizedDataset(
        examples=rows,
        seq_len=seq_len,
        packed=packing,
        n_records=len(located),
        n_truncated=n_truncated,
        n_skipped=len(located) - len(examples),
        total_tokens=sum(len(ex["input_ids"]) for ex in examples),
        trainable_tokens=sum(label != IGNORE_INDEX for ex in rows for label in ex["labels"][1:]),
    )


def split_train_eval(records: Sequence[T], eval_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Hold out round(eval_fraction·n) items (at least one if eval_fraction > 0) for evaluation.

    The choice depends only on (n, eval_fraction, seed); both parts keep the input order.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction={eval_fraction!r} must be in [0, 1)", "data arguments")
    n = len(records)
    n_eval = max(1, round(n * eval_fraction)) if eval_fraction > 0 else 0
    if n_eval >= n:
        raise DataError(f"{n} records are too few to hold out {n_eval}; add data or lower eval_fraction")
    held_out = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_eval].tolist())
    train = [r for i, r in enumerate(records) if i not in held_out]
    return train, [r for i, r in enumerate(records) if i in held_out]


def collate(batch: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example: input_ids with pad_token_id, labels with -100."""
    if not batch:
        raise ValueError("collate needs at least one example")
    width = max(len(ex["input_ids"]) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        input_ids[i, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


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


def embedded_dataset_path() -> Path:
    """Path of the shipped demo chat data (Captain Quill persona; see scripts/make_demo_data.py)."""
    return Path(str(resources.files("qlora_lite.datasets") / "demo_chat.jsonl"))
