"""Data sets → tokenized, loss-masked, optionally packed batches (through Hugging Face `datasets`).

    sources.py   local files / folders / save_to_disk / datasets.Dataset / lists, and weighted mixtures
    schemas.py   text, alpaca, sharegpt, messages, prompt/completion → one canonical record form
    tokenize.py  chat template rendering, loss masks, the cached `datasets.map`
    packing.py   TokenizedDataset, packing without cross-talk (or plain concatenation), collate
    batching.py  the train/eval split and the seeded, resumable, rank-sliced batch order
    pipeline.py  build_dataset (one source) and prepare_data (a run's train and eval sets)

See docs/data.md for the formats and options.
"""

from .batching import batch_iterator, batches_per_epoch, split_indices, split_train_eval
from .packing import PackingMode, TokenizedDataset, collate, count_tokens, pack_rows
from .pipeline import build_dataset, finish, prepare_data
from .schemas import FORMATS, ROLES, detect_format, to_canonical
from .sources import DataSpec, data_specs, embedded_dataset_path, load_records, mix
from .tokenize import IGNORE_INDEX, Example, render_chat, tokenize_dataset, tokenize_record, tokenizer_fingerprint

__all__ = [
    "IGNORE_INDEX", "ROLES", "FORMATS", "Example", "PackingMode", "TokenizedDataset", "DataSpec",
    "load_records", "data_specs", "mix", "detect_format", "to_canonical", "render_chat", "tokenize_record",
    "tokenize_dataset", "tokenizer_fingerprint", "build_dataset", "finish", "prepare_data", "pack_rows",
    "split_indices", "split_train_eval", "collate", "count_tokens", "batches_per_epoch", "batch_iterator",
    "embedded_dataset_path",
]
