"""Canonical records → token ids and loss labels, one `datasets.map` cached on disk.

Chats go through the tokenizer's chat template, so training sees exactly the format the model is
prompted with at inference; only assistant tokens, including the template's end-of-turn token,
count in the loss (all other labels are -100). The assistant spans are found by rendering prefixes
of the conversation and tokenizing them, which works for any template without knowing its markers.
Text records train on every token plus an appended EOS.

The tokenized set is written to ``<cache_dir>/tokenized-<key>.arrow``, where the key hashes the
source's `datasets` fingerprint, the tokenizer (vocabulary, special tokens, chat template), seq_len
and TOKENIZATION_VERSION: a second run on the same data memory-maps that file instead of
tokenizing again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import ConfigError, DataError
from .schemas import to_canonical

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

__all__ = ["IGNORE_INDEX", "TOKENIZATION_VERSION", "Example", "Truncation", "render_chat", "tokenize_record",
           "tokenize_dataset", "tokenizer_fingerprint", "default_cache_dir"]

IGNORE_INDEX = -100  # label value the cross-entropy loss skips (PyTorch's and transformers' default)
# Bump when the token ids or labels this module produces change, so old cache files are not reused.
TOKENIZATION_VERSION = 1
Example = dict[str, list[int]]
Truncation = Literal["truncate", "error"]


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


def _tokenize_canonical(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Untruncated input_ids and labels for a canonical record (schemas.to_canonical)."""
    if record.get("text") is not None:
        ids = list(tokenizer(record["text"])["input_ids"])
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        return ids, list(ids)

    messages = record["messages"]
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


def check_args(seq_len: int, truncation: str) -> None:
    problems = []
    if not isinstance(seq_len, int) or seq_len < 1:
        problems.append(f"seq_len={seq_len!r} must be a positive integer")
    if truncation not in ("truncate", "error"):
        problems.append(f"truncation={truncation!r} must be 'truncate' or 'error'")
    if problems:
        raise ConfigError(problems, "data arguments")


def too_long(where: str, n_tokens: int, seq_len: int) -> DataError:
    return DataError(f"{where} has {n_tokens} tokens, more than seq_len={seq_len}; "
                     "raise seq_len, shorten the record, or use truncation='truncate'")


def tokenize_record(
    record: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    truncation: Truncation = "truncate",
    *,
    data_format: str = "auto",
    columns: Mapping[str, str] | None = None,
    where: str = "record",
) -> Example:
    """Tokenize one record of any schema into ``{"input_ids", "labels"}`` (lists of ints, equal length).

    Longer than `seq_len`: "truncate" keeps the first seq_len tokens, "error" raises DataError naming `where`.
    """
    check_args(seq_len, truncation)
    ids, labels = _tokenize_canonical(to_canonical(record, data_format, columns, where), tokenizer)
    if len(ids) > seq_len and truncation == "error":
        raise too_long(where, len(ids), seq_len)
    return {"input_ids": ids[:seq_len], "labels": labels[:seq_len]}


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything about `tokenizer` that changes token ids: vocabulary and merges (the fast
    tokenizer's serialisation), special tokens, the chat template and the class."""
    from datasets.fingerprint import Hasher

    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return Hasher.hash([type(tokenizer).__name__, vocabulary, tokenizer.special_tokens_map,
                        getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id, tokenizer.bos_token_id])


def default_cache_dir() -> Path:
    """Where tokenized sets are cached unless `data_cache_dir` says otherwise: beside `datasets`' own cache."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "qlora-lite"


def tokenize_dataset(
    records: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    *,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Tokenize canonical records (sources.load_records) with `datasets.map`, truncated to seq_len.

    Columns: input_ids, labels, n_tokens (the length before truncation), n_trainable (labels that
    are not -100 after truncation, from position 1: the model predicts token i+1 from tokens ≤ i, so a
    label at position 0 is never trained), index (the record's position in `records`). Cached on disk (see
    the module docstring); `num_proc` processes share a large set; a progress bar shows the work.
    """
    from datasets import Features, List, Value
    from datasets.fingerprint import Hasher

    check_args(seq_len, "truncate")
    key = Hasher.hash([records._fingerprint, tokenizer_fingerprint(tokenizer), seq_len, TOKENIZATION_VERSION])
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)

    def tokenize(record: dict, index: int) -> dict:
        ids, labels = _tokenize_canonical(record, tokenizer)
        return {"input_ids": ids[:seq_len], "labels": labels[:seq_len], "n_tokens": len(ids),
                "n_trainable": sum(label != IGNORE_INDEX for label in labels[1:seq_len]), "index": index}

    features = Features({"input_ids": List(Value("int32")), "labels": List(Value("int32")),
                         "n_tokens": Value("int64"), "n_trainable": Value("int64"), "index": Value("int64")})
    return records.map(tokenize, with_indices=True, remove_columns=records.column_names, features=features,
                       num_proc=num_proc if num_proc and num_proc > 1 and len(records) > 1 else None,
                       cache_file_name=str(directory / f"tokenized-{key}.arrow"), new_fingerprint=key,
                       load_from_cache_file=True, desc="tokenizing")
