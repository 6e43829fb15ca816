"""The data package with the real embedded tokenizer (SmolLM2's ChatML template) and `datasets`."""

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
    count_tokens,
    embedded_dataset_path,
    load_records,
    mix,
    prepare_data,
    render_chat,
    split_train_eval,
    tokenize_record,
)
from qlora_lite.data import tokenize as tokenize_module
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


def canonical(rows):
    return [{"text": r["text"], "messages": r["messages"]} for r in rows]


def test_load_records_from_file_list_and_iterable(tmp_path):
    rows = [{"text": "a"}, {"instruction": "b", "output": "c"}, CHAT]
    lines = [json.dumps(rows[0]), "", "  ", json.dumps(rows[1]), json.dumps(rows[2])]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    expected = [{"text": "a", "messages": None},
                {"text": None, "messages": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]},
                {"text": None, "messages": CHAT["messages"]}]
    assert canonical(load_records(path, cache_dir=tmp_path / "c")) == expected
    assert canonical(load_records(str(path), cache_dir=tmp_path / "c")) == expected
    assert canonical(load_records(rows)) == expected
    assert canonical(load_records(iter(rows))) == expected  # any iterable of dicts


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ('{"text": "unclosed', ["d.jsonl:3", "invalid JSON"]),
        ('{"question": "x", "answer": "y"}', ["record 1", "['answer', 'question']", "match no known record shape"]),
        ('{"text": "x", "messages": [{"role": "user", "content": "q"}]}', ["record 1", "different record shapes"]),
        ('{"instruction": "x"}', ["record 1", "'output'"]),
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "narrator", "content": "a"}]}',
            ["record 1", "'narrator'", "system, user, assistant"],
        ),
        ('{"messages": [{"role": "user", "content": "q"}]}', ["record 1", "no assistant message"]),
    ],
)
def test_malformed_records_name_file_and_index(tmp_path, bad_line, expected):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"text": "ok"}', "", bad_line])
    with pytest.raises(DataError) as info:
        load_records(path, cache_dir=tmp_path / "c")
    for fragment in expected:
        assert fragment in str(info.value)


def test_empty_missing_and_hub_sources(tmp_path):
    with pytest.raises(DataError, match="empty"):
        load_records(write_jsonl(tmp_path / "blank.jsonl", ["", "   "]), cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="empty"):
        load_records([])
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="record 1: 'text' must be a non-empty string"):
        load_records([{"text": "x"}, {"text": ""}])
    with pytest.raises(DataError, match="one split"):
        load_records({"train": [{"text": "x"}]})
    with pytest.raises(DataError) as info:
        load_records("tatsu-lab/alpaca")
    assert "Hugging Face Hub name" in str(info.value) and "local data only" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match=r"record 0: 'instruction' must be .* \(keys \['text'\]\)"):
        load_records([{"text": "x"}], data_format="alpaca")


# --- every schema: the same tokens and labels as the equivalent messages record -------------

SYSTEM_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."},
               {"role": "assistant", "content": "5"}]
SCHEMAS = {  # name → (record, the equivalent messages)
    "alpaca": ({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
               [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]),
    "alpaca_system": ({"system": "Be brief.", "instruction": "Add 2 and 3.", "output": "5"}, SYSTEM_CHAT),
    "sharegpt": ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                    {"from": "gpt", "value": "Hello there."}, {"from": "human", "value": "Bye"},
                                    {"from": "gpt", "value": "Goodbye, friend!"}]}, CHAT["messages"]),
    "prompt_completion": ({"prompt": "Add 2 and 3.", "completion": "5"},
                          [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]),
    "prompt_completion_chat": ({"prompt": SYSTEM_CHAT[:2], "completion": SYSTEM_CHAT[2:]}, SYSTEM_CHAT),
    "messages": (CHAT, CHAT["messages"]),
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_schema_tokenizes_as_its_messages_record(tok, tmp_path, name):
    record, messages = SCHEMAS[name]
    expected = tokenize_record({"messages": messages}, tok, 256)
    fmt = name.removesuffix("_system").removesuffix("_chat")
    assert tokenize_record(record, tok, 256) == expected  # detected
    assert tokenize_record(record, tok, 256, data_format=fmt) == expected  # named
    renamed = {f"my_{k}": v for k, v in record.items()}
    assert tokenize_record(renamed, tok, 256, columns={k: f"my_{k}" for k in record}) == expected
    # through a file and a save_to_disk folder, via datasets and the cached map
    path = write_jsonl(tmp_path / "one.jsonl", [json.dumps(record)])
    from_file = build_dataset(path, tok, 256, cache_dir=tmp_path / "c")
    assert (len(from_file), from_file[0]) == (1, expected)
    import datasets

    datasets.Dataset.from_list([record]).save_to_disk(str(tmp_path / "saved"))
    assert build_dataset(tmp_path / "saved", tok, 256, data_format=fmt, cache_dir=tmp_path / "c")[0] == expected


def test_flat_schemas_read_alike_from_jsonl_csv_parquet_folders_and_datasets(tok, tmp_path):
    import datasets

    rows = [{"instruction": f"Say {w}.", "input": "", "output": w.capitalize()} for w in ("hi", "bye", "yes")]
    table = datasets.Dataset.from_list(rows)
    write_jsonl(tmp_path / "a.jsonl", [json.dumps(r) for r in rows])
    table.to_csv(str(tmp_path / "a.csv"))
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=1))  # one JSON document: a list of records
    (tmp_path / "shards" / "more").mkdir(parents=True)  # a folder is searched recursively, files in name order
    table.select([0]).to_parquet(str(tmp_path / "shards" / "0.parquet"))
    table.select([1, 2]).to_parquet(str(tmp_path / "shards" / "more" / "1.parquet"))
    reference = [tokenize_record(r, tok, 64) for r in rows]
    for source in (tmp_path / "a.jsonl", tmp_path / "a.json", tmp_path / "a.csv", tmp_path / "shards", table, rows):
        ds = build_dataset(source, tok, 64, cache_dir=tmp_path / "c")
        assert [ds[i] for i in range(len(ds))] == reference, source
    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(DataError) as info:
        load_records(tmp_path / "splits")
    assert str(info.value) == (f"{tmp_path / 'splits'} holds the splits ['test', 'train']; pass one split's folder, "
                               f"e.g. {tmp_path / 'splits'}/train")
    assert len(build_dataset(tmp_path / "splits" / "train", tok, 64, cache_dir=tmp_path / "c")) == 3
    (tmp_path / "shards" / "x.csv").write_text("instruction,output\na,b\n")
    with pytest.raises(DataError, match="mixes"):
        load_records(tmp_path / "shards")


# --- mixing -------------------------------------------------------------------------------


def test_mixing_follows_the_weights_and_the_seed(tmp_path):
    import datasets

    a = datasets.Dataset.from_list([{"text": f"a{i}"} for i in range(10_000)])
    b = datasets.Dataset.from_list([{"text": f"b{i}"} for i in range(10_000)])
    mixed = mix([a, b], [0.7, 0.3], seed=11)
    draws = mixed.select(range(10_000))["text"]
    share_a = sum(t.startswith("a") for t in draws) / 10_000
    assert abs(share_a - 0.7) < 4 * (0.7 * 0.3 / 10_000) ** 0.5  # within 4 standard errors (0.018)
    assert len(set(mixed["text"])) == 20_000  # every record drawn at least once (all_exhausted)
    assert list(mix([a, b], [0.7, 0.3], seed=11).select(range(1000))["text"]) == list(draws[:1000])
    assert list(mix([a, b], [0.7, 0.3], seed=12).select(range(1000))["text"]) != list(draws[:1000])


def test_run_mixture_is_deterministic_resumable_and_keeps_eval_out_of_train(tok, tmp_path):
    from qlora_lite.config import TrainConfig

    small = [{"instruction": f"Word {i}?", "output": f"w{i}"} for i in range(20)]
    big = write_jsonl(tmp_path / "big.jsonl", [json.dumps({"text": f"line {i}"}) for i in range(60)])
    cfg = TrainConfig(data=[{"path": small, "weight": 3.0}, {"path": str(big), "weight": 1.0}], seq_len=64,
                      eval_fraction=0.1, data_cache_dir=str(tmp_path / "c"))
    train, held = prepare_data(cfg.data, tok, cfg)
    again, _ = prepare_data(cfg.data, tok, cfg)
    decoded = [tok.decode(train[i]["input_ids"]) for i in range(len(train))]
    assert decoded == [tok.decode(again[i]["input_ids"]) for i in range(len(again))]
    assert len(held) == 2 + 6 and not {tok.decode(held[i]["input_ids"]) for i in range(len(held))} & set(decoded)
    share_small = sum("Word" in d for d in decoded) / len(decoded)
    assert 0.6 < share_small < 0.9  # 3:1 weights; the small set is repeated to keep up
    full = list(islice(batch_iterator(train, 4, seed=0), 10))
    assert list(islice(batch_iterator(again, 4, seed=0, start_step=6), 4)) == full[6:]


# --- the tokenization cache -----------------------------------------------------------------


def test_second_run_reads_the_cache_instead_of_tokenizing(tok, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in [CHAT, {"text": "abc"}] * 10])
    first = build_dataset(path, tok, 64, cache_dir=tmp_path / "c")
    files = sorted(p.name for p in (tmp_path / "c").glob("tokenized-*.arrow"))
    assert len(files) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(tokenize_module, "_tokenize_canonical", refuse)
    second = build_dataset(path, tok, 64, cache_dir=tmp_path / "c")
    assert [second[i] for i in range(len(second))] == [first[i] for i in range(len(first))]
    assert sorted(p.name for p in (tmp_path / "c").glob("tokenized-*.arrow")) == files
    # another template (or seq_len) is another key: tokenized afresh
    other = copy.deepcopy(tok)
    other.chat_template = None
    with pytest.raises(AssertionError, match="tokenized again"):
        build_dataset(path, other, 64, cache_dir=tmp_path / "c")
    with pytest.raises(AssertionError, match="tokenized again"):
        build_dataset(path, tok, 63, cache_dir=tmp_path / "c")


def test_tokenizing_in_two_processes_gives_the_same_rows(tok, tmp_path, monkeypatch):
    import datasets

    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in [CHAT, {"text": "abc"}, SCHEMAS["alpaca"][0]] * 4])
    one = build_dataset(path, tok, 64, cache_dir=tmp_path / "one")
    seen = []
    real_map = datasets.Dataset.map
    monkeypatch.setattr(datasets.Dataset, "map", lambda self, *a, **kw: seen.append(kw.get("num_proc"))
                        or real_map(self, *a, **kw))
    two = build_dataset(path, tok, 64, cache_dir=tmp_path / "two", num_proc=2)
    assert 2 in seen and [two[i] for i in range(len(two))] == [one[i] for i in range(len(one))]


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
    records = load_records(embedded_dataset_path()).select(range(40))
    plain = build_dataset(records, tok, 256)
    isolated = build_dataset(records, tok, 256, packing=True)
    concat = build_dataset(records, tok, 256, packing=True, packing_mode="concat")
    assert plain.total_tokens == sum(len(ex["input_ids"]) for ex in plain)
    # trained: labels after the one-token shift (a label at position 0 is never predicted)
    assert plain.trainable_tokens == sum(t != IGNORE_INDEX for ex in plain for t in ex["labels"][1:])
    assert (isolated.total_tokens, isolated.trainable_tokens) == (plain.total_tokens, plain.trainable_tokens)
    assert concat.trainable_tokens == sum(t != IGNORE_INDEX for row in concat for t in row["labels"][1:])
    assert len(isolated) == len(concat) < len(plain) / 3
    assert plain[1:3] == [plain[1], plain[2]] and isolated[-2:] == [isolated[len(isolated) - 2], isolated[-1]]
    assert all(len(row["input_ids"]) == len(row["labels"]) <= 256 for row in isolated)
    flat = lambda ds, key: [t for ex in ds for t in ex[key]]  # noqa: E731
    assert flat(isolated, "input_ids") == flat(concat, "input_ids") == flat(plain, "input_ids")
    assert flat(concat, "labels") == flat(plain, "labels")
    # isolated: positions restart per example, and no example's first token is a target
    assert flat(isolated, "position_ids") == [p for ex in plain for p in range(len(ex["input_ids"]))]
    assert flat(isolated, "labels") == [t for ex in plain for t in [IGNORE_INDEX, *ex["labels"][1:]]]
    assert "40 records, packed (isolated) into" in isolated.summary()


def test_collate_pads_and_masks():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = collate(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in out.values())
    assert count_tokens(out) == 4


def test_collate_packed_rows_carries_positions_and_no_mask():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, -100], "position_ids": [0, 1, 0]},
            {"input_ids": [8], "labels": [-100], "position_ids": [0]}]
    out = collate(rows, pad_token_id=0)
    assert set(out) == {"input_ids", "labels", "position_ids"}
    assert out["position_ids"].tolist() == [[0, 1, 0], [0, -1, -1]]
    assert out["labels"].tolist() == [[-100, 6, -100], [-100, -100, -100]]
    assert count_tokens(out) == 4
    flat = collate(rows, pad_token_id=0, flatten=True)  # FlashAttention's varlen form
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8]] and flat["position_ids"].tolist() == [[0, 1, 0, 0]]


def per_example_losses(model, batch, positions=None) -> list[float]:
    """Mean loss of each example in a collated batch, split where `positions` (default: the batch's position
    ids, or one example per row) restart at 0."""
    logits = model(**batch).logits.float()
    positions = batch.get("position_ids") if positions is None else positions
    losses = []
    for row in range(logits.shape[0]):
        targets = batch["labels"][row, 1:]
        token_loss = torch.nn.functional.cross_entropy(logits[row, :-1], targets, reduction="none",
                                                       ignore_index=IGNORE_INDEX)
        starts = (positions[row] == 0).nonzero().flatten().tolist() if positions is not None else [0]
        for a, b in zip(starts, starts[1:] + [logits.shape[1]], strict=True):
            keep = targets[a:b - 1] != IGNORE_INDEX  # targets of example tokens a+1 .. b-1
            if keep.any():
                losses.append(token_loss[a:b - 1][keep].mean().item())
    return losses


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_isolated_packing_equals_one_by_one(tiny_model_dir, attention):
    from conftest import MEMORIZE

    from qlora_lite.config import LoraConfig, QuantConfig
    from qlora_lite.load import load_model

    # the model training uses (NF4 base + LoRA; load_model turns the KV cache off, which transformers'
    # packed-sequence masks need)
    model, tok = load_model(tiny_model_dir, QuantConfig(), LoraConfig(), device="cpu", compute_dtype=torch.float32)
    model.set_attn_implementation(attention)

    records = [*MEMORIZE[:5], {"text": "The code word is apple ."}]
    plain = build_dataset(records, tok, 64)
    with torch.no_grad():
        alone = [per_example_losses(model, collate([plain[i]], tok.pad_token_id))[0] for i in range(len(plain))]
        isolated = build_dataset(records, tok, 64, packing=True)
        rows = [isolated[i] for i in range(len(isolated))]
        assert len(rows) == 3 and len(rows[2]["input_ids"]) < len(rows[0]["input_ids"])  # padding too
        packed = collate(rows, tok.pad_token_id)
        assert per_example_losses(model, packed) == pytest.approx(alone, abs=1e-5)
        # the same rows under plain causal attention (the concat mode) see each other: the losses change
        crossed = {"input_ids": packed["input_ids"], "labels": packed["labels"],
                   "attention_mask": (packed["position_ids"] >= 0).long()}
        assert per_example_losses(model, crossed, packed["position_ids"]) != pytest.approx(alone, abs=1e-3)


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
    assert list(records["messages"]) == [r["messages"] for r in module.build_records()]
    for record in records:
        answer = record["messages"][-1]["content"]
        assert answer.startswith("Ahoy! ") and answer.endswith(" — Captain Quill")
    ds = build_dataset(path, tok, 128)
    assert ds.n_truncated == 0 and max(len(ex["input_ids"]) for ex in ds) < 120


def test_config_data_fields_are_checked_together():
    from qlora_lite.config import TrainConfig

    with pytest.raises(ConfigError) as info:
        TrainConfig(data_format="alpacca", columns={"question": "q"}, packing_mode="x", data_num_proc=0)
    problems = info.value.problems
    assert len(problems) == 4 and problems[0].startswith("data_format='alpacca' must be one of auto, text, alpaca")
    assert TrainConfig(data=[{"path": "a.jsonl", "weight": 2}], columns={"instruction": "q"}).packing_mode == "isolated"
