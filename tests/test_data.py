"""data.py with the real embedded tokenizer (SmolLM2's ChatML template)."""

from __future__ import annotations

import copy
import importlib.util
import json
from itertools import islice
from pathlib import Path

import pytest
import torch

from qlora_lite.data import (
    IGNORE_INDEX,
    batch_iterator,
    batches_per_epoch,
    build_dataset,
    collate,
    embedded_dataset_path,
    load_records,
    render_chat,
    split_train_eval,
    tokenize_record,
)
from qlora_lite.errors import ConfigError, DataError

EOT = "<|im_end|>"  # SmolLM2's end-of-turn token (also its EOS)
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye, friend!"},
    ]
}


@pytest.fixture(scope="module")
def tok(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


def trained_spans(tok, example) -> list[str]:
    """Decode each maximal run of unmasked labels."""
    spans, run = [], []
    for label in example["labels"] + [IGNORE_INDEX]:
        if label == IGNORE_INDEX:
            if run:
                spans.append(tok.decode(run))
            run = []
        else:
            run.append(label)
    return spans


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- shapes and masking -----------------------------------------------------------------


def test_text_record_trains_every_token_and_ends_with_eos(tok):
    ex = tokenize_record({"text": "The sea is wide."}, tok, 64)
    assert ex["labels"] == ex["input_ids"]
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(ex["input_ids"]) == "The sea is wide." + EOT


def test_instruction_record_trains_only_the_output(tok):
    ex = tokenize_record({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}, tok, 128)
    assert "<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>" in tok.decode(ex["input_ids"])
    assert trained_spans(tok, ex) == ["5" + EOT]
    no_input = tokenize_record({"instruction": "Say hi.", "output": "Hi!"}, tok, 128)
    assert "<|im_start|>user\nSay hi.<|im_end|>" in tok.decode(no_input["input_ids"])


def test_chat_masks_exactly_the_assistant_turns(tok):
    ex = tokenize_record(CHAT, tok, 128)
    assert len(ex["input_ids"]) == len(ex["labels"])
    assert trained_spans(tok, ex) == ["Hello there." + EOT, "Goodbye, friend!" + EOT]
    for token, label in zip(ex["input_ids"], ex["labels"], strict=True):
        assert label in (IGNORE_INDEX, token)
    # The full sequence is the template's own rendering of the chat.
    rendered = tok.apply_chat_template(CHAT["messages"], tokenize=False)
    assert tok.decode(ex["input_ids"]) == rendered


def test_fallback_format_without_chat_template(tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert render_chat(plain, messages[:1]) == "### User:\nHi\n\n### Assistant:\n"
    ex = tokenize_record({"messages": messages}, plain, 64)
    assert tok.decode(ex["input_ids"]) == "### User:\nHi\n\n### Assistant:\nHello." + EOT + "\n\n"
    assert trained_spans(plain, ex) == ["Hello." + EOT]


# --- loading and errors -----------------------------------------------------------------


def test_load_records_from_file_list_and_iterable(tmp_path):
    rows = [{"text": "a"}, {"instruction": "b", "output": "c"}, CHAT]
    lines = [json.dumps(rows[0]), "", "  ", json.dumps(rows[1]), json.dumps(rows[2])]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    assert load_records(path) == rows
    assert load_records(str(path)) == rows
    assert load_records(rows) == rows
    assert load_records(iter(rows)) == rows  # any iterable of dicts, e.g. a datasets.Dataset


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ('{"text": "unclosed', ["d.jsonl:3", "invalid JSON"]),
        ('{"prompt": "x", "completion": "y"}', ["d.jsonl:3", "match no known record shape", '"messages"']),
        ('{"text": "x", "messages": []}', ["d.jsonl:3", "different record shapes"]),
        ('{"instruction": "x"}', ["d.jsonl:3", "'output'"]),
        ('["text"]', ["d.jsonl:3", "expected a JSON object"]),
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "narrator", "content": "a"}]}',
            ["d.jsonl:3", "'narrator'", "system, user, assistant"],
        ),
        ('{"messages": [{"role": "user", "content": "q"}]}', ["d.jsonl:3", "no assistant message"]),
    ],
)
def test_malformed_records_name_file_and_line(tmp_path, bad_line, expected):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"text": "ok"}', "", bad_line])
    with pytest.raises(DataError) as info:
        load_records(path)
    for fragment in expected:
        assert fragment in str(info.value)


def test_empty_and_missing_sources(tmp_path):
    with pytest.raises(DataError, match="empty"):
        load_records(write_jsonl(tmp_path / "blank.jsonl", ["", "   "]))
    with pytest.raises(DataError, match="empty"):
        load_records([])
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="record 1: 'text' must be a non-empty string"):
        load_records([{"text": "x"}, {"text": ""}])
    with pytest.raises(DataError, match="one split"):
        load_records({"train": [{"text": "x"}]})


# --- truncation, stats, packing ---------------------------------------------------------


def test_truncation_modes(tok):
    long = {"text": "word " * 50}
    cut = tokenize_record(long, tok, 16)
    assert len(cut["input_ids"]) == len(cut["labels"]) == 16
    with pytest.raises(DataError, match=r"record 1 has \d+ tokens, more than seq_len=16"):
        build_dataset([{"text": "short"}, long], tok, 16, truncation="error")
    ds = build_dataset([{"text": "short"}, long], tok, 16)
    assert (ds.n_records, ds.n_truncated, ds.n_skipped, len(ds)) == (2, 1, 0, 2)
    with pytest.raises(ConfigError):
        tokenize_record(long, tok, 16, truncation="drop")


def test_prompt_longer_than_seq_len_is_skipped(tok):
    long_prompt = {"instruction": "question " * 40, "output": "answer"}
    ds = build_dataset([long_prompt, {"instruction": "q", "output": "a"}], tok, 48)
    assert (ds.n_records, ds.n_truncated, ds.n_skipped, len(ds)) == (2, 1, 1, 1)
    with pytest.raises(DataError, match="no record has a trainable token"):
        build_dataset([long_prompt], tok, 48)


def test_stats_and_packing(tok):
    records = load_records(embedded_dataset_path())[:40]
    plain = build_dataset(records, tok, 256)
    packed = build_dataset(records, tok, 256, packing=True)
    assert plain.total_tokens == sum(len(ex["input_ids"]) for ex in plain)
    assert plain.trainable_tokens == sum(t != IGNORE_INDEX for ex in plain for t in ex["labels"])
    assert (packed.total_tokens, packed.trainable_tokens) == (plain.total_tokens, plain.trainable_tokens)
    assert len(packed) < len(plain) / 3
    assert all(len(row["input_ids"]) == len(row["labels"]) <= 256 for row in packed)
    flat = lambda ds, key: [t for ex in ds for t in ex[key]]  # noqa: E731
    assert flat(packed, "input_ids") == flat(plain, "input_ids")
    assert flat(packed, "labels") == flat(plain, "labels")
    assert "40 records, packed into" in packed.summary()


def test_collate_pads_and_masks():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = collate(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in out.values())


# --- order: determinism, resume, ranks --------------------------------------------------


def test_iterator_is_a_seeded_permutation_per_epoch():
    data = list(range(10))
    batches = list(batch_iterator(data, 5, seed=7, epochs=3))
    assert len(batches) == 3 * batches_per_epoch(10, 5)
    for epoch in range(3):
        expected = torch.randperm(10, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        assert batches[2 * epoch] + batches[2 * epoch + 1] == expected
    assert batches == list(batch_iterator(data, 5, seed=7, epochs=3))
    assert batches != list(batch_iterator(data, 5, seed=8, epochs=3))


@pytest.mark.parametrize("start", [0, 1, 3, 4, 9])
def test_resume_equals_tail_of_full_order(start):
    data = list(range(13))  # 4 batches of 3 per epoch, one example dropped each epoch
    full = list(islice(batch_iterator(data, 3, seed=1), 12))
    assert list(islice(batch_iterator(data, 3, seed=1, start_step=start), 12 - start)) == full[start:]


def test_ranks_split_each_global_batch():
    data = list(range(50))
    world = 3
    single = list(islice(batch_iterator(data, 2 * world, seed=3), 20))  # crosses epochs (8 per epoch)
    per_rank = [
        list(islice(batch_iterator(data, 2, seed=3, rank=r, world_size=world), 20)) for r in range(world)
    ]
    for k, global_batch in enumerate(single):
        union = [example for r in range(world) for example in per_rank[r][k]]
        assert union == global_batch and len(set(union)) == 2 * world
    resumed = list(islice(batch_iterator(data, 2, seed=3, rank=1, world_size=world, start_step=5), 3))
    assert resumed == per_rank[1][5:8]


def test_drop_last_false_pads_from_the_epoch_start():
    data = list(range(7))
    batches = list(batch_iterator(data, 3, seed=0, epochs=1, drop_last=False))
    order = torch.randperm(7, generator=torch.Generator().manual_seed(0)).tolist()
    assert batches == [order[0:3], order[3:6], [order[6], order[0], order[1]]]
    with pytest.raises(DataError, match="fewer than one global batch"):
        batches_per_epoch(7, 4, world_size=2)
    with pytest.raises(ConfigError):
        batch_iterator(data, 2, seed=0, rank=2, world_size=2)


def test_split_train_eval_is_deterministic_and_disjoint():
    records = [{"text": str(i)} for i in range(100)]
    train, held = split_train_eval(records, 0.1, seed=5)
    assert (len(train), len(held)) == (90, 10)
    assert sorted(train + held, key=lambda r: int(r["text"])) == records
    assert split_train_eval(records, 0.1, seed=5) == (train, held)
    assert split_train_eval(records, 0.1, seed=6)[1] != held
    assert split_train_eval(records, 0.0, seed=5) == (records, [])
    assert len(split_train_eval(records[:3], 0.01, seed=5)[1]) == 1
    with pytest.raises(DataError, match="too few"):
        split_train_eval(records[:1], 0.5, seed=5)


# --- the shipped demo data --------------------------------------------------------------


def test_demo_data_is_regenerated_by_its_script_and_fits(tok):
    path = embedded_dataset_path()
    records = load_records(path)
    assert 300 <= len(records) <= 400
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_data.py"
    spec = importlib.util.spec_from_file_location("make_demo_data", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert records == module.build_records()
    for record in records:
        answer = record["messages"][-1]["content"]
        assert answer.startswith("Ahoy! ") and answer.endswith(" — Captain Quill")
    ds = build_dataset(path, tok, 128)
    assert ds.n_truncated == 0 and max(len(ex["input_ids"]) for ex in ds) < 120
