"""Issue 19's hostile cases, one row each: every one ends in a clear error (or the right result) and loses
nothing. docs/reliability.md names the row for each case. Each row failed (silently wrong, data lost or a
traceback) before its fix."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_lite import cli
from qlora_lite import merge as merge_mod
from qlora_lite.adapter import load_adapter, read_adapter, save_adapter
from qlora_lite.config import LoraConfig, QuantConfig, TrainConfig
from qlora_lite.errors import (CheckpointError, ConfigError, DataError, MergeError, QLoraLiteError,
                               VerificationError)
from qlora_lite.fsutil import DiskFullError, OutputExistsError, RunLock, atomic_directory
from qlora_lite.inject import lora_layers
from qlora_lite.load import load_model, resolve_device
from qlora_lite.merge import merge
import conftest

TINY = conftest.TINY | dict(vocab_size=256, tie_word_embeddings=False)


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # conftest


def _save_tiny(directory: Path, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**(TINY | overrides))).save_pretrained(directory, max_shard_size="100KB")
    return directory


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A sharded tiny Llama (untied head) and an adapter on q/v with non-zero B."""
    root = tmp_path_factory.mktemp("pristine")
    base = _save_tiny(root / "base")
    model, _ = load_model(base, QuantConfig(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), device="cpu",
                          compute_dtype=torch.float32, with_tokenizer=False)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for b in layer.lora_B.values():
                b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    save_adapter(model, root / "adapter")
    return root


@pytest.fixture
def run(pristine, tmp_path) -> Path:
    """A fresh copy of base/ and adapter/ per case (cases corrupt them)."""
    shutil.copytree(pristine, tmp_path / "run")
    return tmp_path / "run"


def _shard_holding(base: Path, key: str) -> Path:
    weight_map = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    return base / weight_map[key]


def _edit_tensor(base: Path, key: str, edit) -> None:
    shard = _shard_holding(base, key)
    tensors = load_file(shard)
    tensors[key] = edit(tensors[key])
    save_file(tensors, shard, {"format": "pt"})


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _load(run: Path):
    return load_model(run / "base", QuantConfig(), None, device="cpu", with_tokenizer=False)


def _merge(run: Path, out: Path | None = None, **kwargs):
    return merge(run / "base", run / "adapter", out or run.parent / "merged", progress=False, **kwargs)


# ---- silently wrong or data lost ---------------------------------------------------------------

def case_merge_out_is_the_run_dir(run):
    _merge(run, out=run / "adapter", overwrite=True)


def case_merge_out_contains_the_inputs(run):
    _merge(run, out=run, overwrite=True)


def case_merge_out_inside_the_base(run):
    _merge(run, out=run / "base" / "merged")


def case_quantize_out_is_the_model(run):
    from qlora_lite.quantize import write_quantized

    write_quantized(run / "base", run / "base", overwrite=True)


def case_existing_out_names_the_cli_flag(run):
    (run.parent / "merged").mkdir()
    _merge(run)


def case_concurrent_merge_into_one_out(run):
    with RunLock.beside(run.parent / "merged"):  # what a merge in progress holds
        _merge(run)


def case_out_appears_during_the_merge(run, monkeypatch):
    real = merge_mod._merge_input_shard

    def another_writer_finishes_first(*args, **kwargs):
        (run.parent / "merged").mkdir(exist_ok=True)
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_mod, "_merge_input_shard", another_writer_finishes_first)
    _merge(run)


def case_inf_norm_weight_at_load(run):
    _edit_tensor(run / "base", "model.norm.weight", lambda t: t.index_fill(0, torch.tensor([3]), float("inf")))
    _load(run)


def case_inf_norm_weight_at_merge(run):
    _edit_tensor(run / "base", "model.norm.weight", lambda t: t.index_fill(0, torch.tensor([3]), float("inf")))
    _merge(run)


def case_nan_logits_fail_verification(run, monkeypatch):
    from transformers import AutoModelForCausalLM

    from qlora_lite import verify

    merged = _merge(run).out_dir
    tensors = load_file(merged / "model.safetensors")
    tensors["model.norm.weight"][3] = float("inf")
    save_file(tensors, merged / "model.safetensors", {"format": "pt"})
    # the case: base and merge both compute NaN, so every difference is NaN and max(0.0, nan) == 0.0
    monkeypatch.setattr(verify, "_reference_model",
                        lambda *a: AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval())
    verify.verify_merge(merged, run / "base", run / "adapter")


def case_tensor_in_two_shards(run):
    key = "model.layers.1.mlp.down_proj.weight"
    stale = load_file(_shard_holding(run / "base", key))[key] * 0
    other = next(f for f in sorted((run / "base").glob("*.safetensors")) if f != _shard_holding(run / "base", key))
    tensors = load_file(other)
    save_file(tensors | {key: stale}, other, {"format": "pt"})
    _load(run)


def case_index_points_elsewhere(run):
    index = run / "base" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shards = sorted(set(data["weight_map"].values()))
    key = "model.norm.weight"
    data["weight_map"][key] = next(s for s in shards if s != data["weight_map"][key])
    index.write_text(json.dumps(data))
    _load(run)


def _tie_with_a_different_head(run):
    _edit_json(run / "base" / "config.json", tie_word_embeddings=True)


def case_tied_config_different_head_at_load(run):
    _tie_with_a_different_head(run)
    _load(run)


def case_tied_config_different_head_at_merge(run):
    _tie_with_a_different_head(run)
    _merge(run)


def _nan_adapter(run):
    file = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, file, {"format": "pt"})


def case_nan_adapter_in_generate(run):
    _nan_adapter(run)
    model, _ = _load(run)
    load_adapter(model, run / "adapter")


def case_nan_adapter_in_analyze(run):
    from qlora_lite.analysis import analyze

    _nan_adapter(run)
    analyze(run / "adapter", out_dir=run.parent / "analysis")


def case_negative_temperature(run):
    from qlora_lite.generate import answer

    answer(None, None, "hi", temperature=-1)


def case_overlapping_ranges_in_analysis(run):
    from qlora_lite.analysis import account

    shard = _shard_holding(run / "base", "model.norm.weight")
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    by_size = {}
    for name in (k for k in header if k != "__metadata__"):
        by_size.setdefault(header[name]["data_offsets"][1] - header[name]["data_offsets"][0], []).append(name)
    first, second = next(names for names in by_size.values() if len(names) > 1)[:2]
    header[second]["data_offsets"] = list(header[first]["data_offsets"])  # two names, one set of bytes
    blob = json.dumps(header).encode()
    shard.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])
    account(run / "adapter", run / "base")


HOSTILE = {
    # id: (case, error type, message fragment)
    "1 merge --out <run dir holding the adapter> --overwrite": (case_merge_out_is_the_run_dir, ConfigError,
                                                                "is the adapter"),
    "1 merge --out <folder holding base/ and adapter/>": (case_merge_out_contains_the_inputs, ConfigError,
                                                          "contains the base model"),
    "1 merge --out <inside the base>": (case_merge_out_inside_the_base, ConfigError, "is inside the base model"),
    "1 quantize --model X --out X --overwrite": (case_quantize_out_is_the_model, ConfigError, "is the model"),
    "1 refusal names the CLI flag": (case_existing_out_names_the_cli_flag, OutputExistsError, "--overwrite true"),
    "2 concurrent merges into one --out": (case_concurrent_merge_into_one_out, QLoraLiteError, "in use by pid"),
    "2 --out created during the merge": (case_out_appears_during_the_merge, OutputExistsError, "appeared while"),
    "3 inf in model.norm.weight: load": (case_inf_norm_weight_at_load, CheckpointError,
                                         "model.norm.weight contains NaN or inf"),
    "3 inf in model.norm.weight: merge": (case_inf_norm_weight_at_merge, MergeError, "model.norm.weight"),
    "3 NaN logits fail --verify": (case_nan_logits_fail_verification, VerificationError, "NaN or inf logits"),
    "4 overlapping byte ranges (analysis reads the validated header)": (case_overlapping_ranges_in_analysis,
                                                                        CheckpointError, "overlap"),
    "5 tensor stored in two shards": (case_tensor_in_two_shards, CheckpointError, "stored twice"),
    "5 index names another shard": (case_index_points_elsewhere, CheckpointError, "disagree"),
    "6 tied config, different lm_head: load": (case_tied_config_different_head_at_load, CheckpointError,
                                               "tie_word_embeddings=true but the checkpoint stores a lm_head"),
    "6 tied config, different lm_head: merge": (case_tied_config_different_head_at_merge, CheckpointError,
                                                "tie_word_embeddings=true but the checkpoint stores a lm_head"),
    "11 NaN adapter: generate": (case_nan_adapter_in_generate, CheckpointError, "NaN or inf"),
    "11 NaN adapter: analyze": (case_nan_adapter_in_analyze, CheckpointError, "NaN or inf"),
    "12 generate --temperature -1": (case_negative_temperature, ConfigError, "temperature=-1"),
}


MAKE_THEIR_OWN_OUTPUT = {case_existing_out_names_the_cli_flag, case_out_appears_during_the_merge,
                         case_nan_logits_fail_verification}


@pytest.mark.parametrize("case, error, message", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_case_ends_in_a_clear_error_and_keeps_the_inputs(run, monkeypatch, case, error, message):
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    args = (run, monkeypatch) if case.__code__.co_argcount == 2 else (run,)
    with pytest.raises(error, match=message.replace("(", r"\(").replace("|", r"\|")):
        case(*args)
    inputs = {p for p in before if p.parent.name in ("base", "adapter")}
    after = {p for p in run.rglob("*") if p.is_file()}
    assert inputs <= after, f"inputs lost: {sorted(map(str, inputs - after))}"
    assert not (run.parent / "merged").exists() or case in MAKE_THEIR_OWN_OUTPUT
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".")], "temp or lock litter"


def test_tied_head_stored_identically_still_loads(run):
    """The refusal is for a head that differs; a checkpoint that stores the tied copy too is fine."""
    _edit_json(run / "base" / "config.json", tie_word_embeddings=True)
    embed = load_file(_shard_holding(run / "base", "model.embed_tokens.weight"))["model.embed_tokens.weight"]
    _edit_tensor(run / "base", "lm_head.weight", lambda t: embed.clone())
    model, _ = _load(run)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, embed)


# ---- unclear: one line that says what to fix, no traceback -------------------------------------

def _cli(argv, capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("error: ") and "--debug" in err[1], err
    return err[0]


@pytest.mark.parametrize("argv_of, message", [
    (lambda d: ["train", "--config", str(_write(d / "run.yaml", "seq_len: 64\nlora:\n\tr: 8\n"))],
     "run.yaml line 3, column 1 is not valid YAML"),
    (lambda d: ["train", "--model", "m", "--data", "x.jsonl", "--device", "cuda:abc"], "device='cuda:abc'"),
    (lambda d: ["train", "--model", "m", "--data", "x.jsonl", "--seed", str(2**70)], "seed=1180591620717411303424"),
    (lambda d: ["memory", "--model", str(_write(d / "data.jsonl", '{"text": "a"}\n{"text": "b"}\n'))],
     "data.jsonl: not readable JSON"),
    (lambda d: ["generate", "--model", str(_model_with_bad_config(d)), "--prompt", "hi"],
     "config.json is not valid JSON"),
    (lambda d: ["generate", "--prompt", "hi", "--temperature", "-1"], "temperature=-1"),
], ids=["yaml syntax", "device cuda:abc", "huge seed", "memory --model data.jsonl", "config.json not JSON",
        "negative temperature"])
def test_unclear_inputs_are_one_line(tmp_path, capsys, argv_of, message):
    assert message in _cli(argv_of(tmp_path), capsys)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _model_with_bad_config(directory: Path) -> Path:
    model = directory / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama",')
    (model / "model.safetensors").write_bytes(b"")
    return model


def test_resolve_device_names_a_bad_device():
    with pytest.raises(ConfigError, match="device='cuda:abc' is not a device"):
        resolve_device("cuda:abc")


def test_invalid_utf8_names_file_and_line(tmp_path):
    from qlora_lite.data import load_records

    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: not valid UTF-8"):
        load_records(data)


@pytest.mark.parametrize("config, message", [
    ({"peft_type": "LORA", "r": 4, "lora_alpha": None, "target_modules": ["q_proj"]}, "lora_alpha=None"),
    (["r", 4], "not a JSON object"),
])
def test_malformed_adapter_config_is_named(run, config, message):
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        read_adapter(run / "adapter")


def test_full_disk_in_torch_save_is_disk_full_and_keeps_the_previous(tmp_path, monkeypatch):
    """torch.save reports ENOSPC as RuntimeError("... file write failed"); the checkpoint before survives."""
    import qlora_lite.fsutil as fsutil

    target = tmp_path / "step"
    with atomic_directory(target) as tmp:
        torch.save({"step": 1}, tmp / "state.pt")

    def full(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(fsutil.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(DiskFullError, match="no space left while writing"):
        with atomic_directory(target, overwrite=True) as tmp:
            torch.save({"step": 2}, tmp / "state.pt")
    monkeypatch.undo()
    assert torch.load(target / "state.pt") == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["step"]


def test_file_size_limit_during_merge_names_the_file(run, monkeypatch):
    def too_large(*args):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(merge_mod.os, "pwrite", too_large)
    with pytest.raises(OSError, match=r"model-00001-of-\d+\.safetensors.*ulimit -f"):
        _merge(run, max_shard_size="100KB")
    assert not (run.parent / "merged").exists()


def test_lora_on_a_tied_lm_head_is_refused(tmp_path):
    base = _save_tiny(tmp_path / "tied", tie_word_embeddings=True)
    with pytest.raises(ConfigError, match="lm_head, which is tied"):
        load_model(base, QuantConfig(), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]), device="cpu",
                   with_tokenizer=False)


def test_held_out_records_too_long_are_named(tmp_path, tiny_model_dir, monkeypatch):
    """9 of 10 records fit seq_len; the held-out one does not: the error says so (it blamed every record)."""
    import qlora_lite.train as train_mod

    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "apple"}]}
    long = {"messages": [{"role": "user", "content": "river " * 80}, {"role": "assistant", "content": "apple"}]}
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [short] * 9 + [long]))
    # hold out exactly the long record, whatever the seeded split would pick
    import qlora_lite.data.pipeline as pipeline

    monkeypatch.setattr(pipeline, "split_indices", lambda n, fraction, seed: (list(range(9)), [9]))
    with pytest.raises(DataError, match=r"none of the 1 held-out evaluation record"):
        train_mod.train(TrainConfig(model=str(tiny_model_dir), data=str(data), out_dir=str(tmp_path / "out"),
                                    seq_len=32, max_steps=1, warmup_steps=0, eval_fraction=0.1, device="cpu", lora={"r": 4},
                                    quant={"backend": "torch"}))


# ---- the rest of the issue ---------------------------------------------------------------------

def test_stale_temp_dirs_of_dead_writers_are_removed(tmp_path):
    """A killed merge leaves `.<out>.tmp-<pid>-*`; the next write beside it removes it, a live one's stays."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".out.tmp-{dead_pid}-deadbeef"
    live = tmp_path / f".out.tmp-{os.getppid()}-cafef00d"
    unrelated = tmp_path / f".other.tmp-{dead_pid}-deadbeef"
    for d in (stale, live, unrelated):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 100)
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "a").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, unrelated.name, "out"])


def test_evaluation_is_capped_and_announced(tmp_path, tiny_model_dir, memorize_data, monkeypatch, capsys):
    """A large held-out set made the step-0 evaluation look hung; every evaluation uses the same capped subset."""
    import qlora_lite.train as train_mod

    sizes, real = [], train_mod.evaluate

    def spy(model, examples, *args, **kwargs):
        sizes.append(len(examples))
        return real(model, examples, *args, **kwargs)

    monkeypatch.setattr(train_mod, "MAX_EVAL_EXAMPLES", 3)
    monkeypatch.setattr(train_mod, "evaluate", spy)
    train_mod.train(TrainConfig(model=str(tiny_model_dir), data=str(memorize_data), out_dir=str(tmp_path / "out"),
                                seq_len=32, max_steps=2, warmup_steps=0, eval_every=1, eval_fraction=0.5,
                                device="cpu", lora={"r": 4}, quant={"backend": "torch"}, progress=False))
    err = capsys.readouterr().err
    assert sizes == [3, 3, 3], sizes  # step 0, 1 and 2, each on 3 of the 16 held-out examples
    assert "tokenizing 32 records" in err and "eval: 3 of 16 held-out examples" in err, err


def test_gpt2_conv1d_is_named_as_unsupported():
    """GPT-2's Conv1D projections were described as "matches no linear layer"."""
    from accelerate import init_empty_weights
    from transformers import GPT2Config, GPT2LMHeadModel

    from qlora_lite.inject import find_targets

    with init_empty_weights():
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ConfigError, match=r"\['c_attn', 'c_fc', 'c_proj'\] are GPT-2-style Conv1D"):
        find_targets(model, "all-linear")
