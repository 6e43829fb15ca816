"""Run settings travel with the adapter: merge/verify/generate/analyze/resume rebuild the model it trained on."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import write_tiny_model
from qlora_lite.adapter import read_adapter
from qlora_lite.config import LoraConfig, QuantConfig, TrainConfig
from qlora_lite.errors import CheckpointError, ConfigError
from qlora_lite.merge import merge
from qlora_lite.nf4 import NF4Weight
from qlora_lite.settings import SETTINGS_NAME, fingerprint_base, read_settings
from qlora_lite.shards import ShardReader
from qlora_lite.train import train

QUANT = QuantConfig(blocksize=128, double_quant=False, backend="torch")  # not the defaults (64, true)


def _cfg(model_dir, data, out, **kw):
    values = dict(model=str(model_dir), data=str(data), out_dir=str(out), seq_len=64, batch_size=4, max_steps=3,
                  learning_rate=5e-3, warmup_steps=1, eval_fraction=0.0, save_every=2, progress=False, device="cpu",
                  max_grad_norm=0.0, lora=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0), quant=QUANT)
    return TrainConfig(**{**values, **kw})


@pytest.fixture(scope="module")
def run(tiny_model_dir, memorize_data, tmp_path_factory):
    """A 3-step run with blocksize 128 and no double quantization (checkpoints at steps 2 and 3)."""
    out = tmp_path_factory.mktemp("settings") / "run"
    return train(_cfg(tiny_model_dir, memorize_data, out))


def test_the_adapter_records_every_setting_and_stays_peft_loadable(run, tiny_model_dir):
    settings = read_settings(run.adapter_dir)
    assert settings.quant == {"quant_type": "nf4", "blocksize": 128, "double_quant": False}
    assert settings.compute_dtype == "float32"
    assert settings.lora["init_lora_weights"] == "kaiming" and settings.lora["lora_dtype"] == "float32"
    assert settings.base["fingerprint"] == fingerprint_base(tiny_model_dir)
    assert json.loads((run.adapter_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                                           str(run.adapter_dir))
    assert model.peft_config["default"].r == 4


def test_merge_rebuilds_the_base_with_the_recorded_quantization(run, tiny_model_dir, tmp_path):
    report = merge(tiny_model_dir, run.adapter_dir, tmp_path / "merged", dtype="float32", verify=True,
                   progress=False)
    assert report.verification is not None
    adapter, module = read_adapter(run.adapter_dir), "model.layers.0.self_attn.q_proj"
    with ShardReader(tiny_model_dir / "model.safetensors") as base, \
            ShardReader(tmp_path / "merged" / "model.safetensors") as merged:
        w0, got = base.get(f"{module}.weight"), merged.get(f"{module}.weight")
    want = NF4Weight.from_tensor(w0, 128, False, backend="torch").dequantize(torch.float32)
    want += adapter.delta_weight(module)
    assert torch.equal(got, want)  # onto quantize-with-defaults(W0) this differs
    with pytest.raises(ConfigError, match=r"blocksize=64 was passed but the adapter was trained with blocksize=128"):
        merge(tiny_model_dir, run.adapter_dir, tmp_path / "wrong", quant=QuantConfig(), progress=False)
    with pytest.raises(ConfigError, match=r"double_quant=true was passed .* double_quant=false"):
        merge(tiny_model_dir, run.adapter_dir, tmp_path / "wrong", quant={"double_quant": True}, progress=False)
    assert not (tmp_path / "wrong").exists()


def test_a_different_base_of_the_same_shapes_is_refused_unless_forced(run, tiny_model_dir, tmp_path):
    other = tmp_path / "other"
    write_tiny_model(other, tiny_model_dir, seed=1)  # same config, other weights
    with pytest.raises(CheckpointError, match=r"is not the base this adapter was trained on .*checksum"):
        merge(other, run.adapter_dir, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()
    merge(other, run.adapter_dir, tmp_path / "merged", progress=False, force=True)
    from qlora_lite.analysis import analyze

    with pytest.raises(CheckpointError, match="is not the base"):
        analyze(run.adapter_dir, other, out_dir=tmp_path / "analysis", plots=False)


def test_the_fingerprint_ignores_a_moved_or_re_saved_config(tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["transformers_version"], config["_name_or_path"] = "0.0.0", "elsewhere"
    (copy / "config.json").write_text(json.dumps(config))
    assert fingerprint_base(copy) == fingerprint_base(tiny_model_dir)
    config["rms_norm_eps"] = 1e-3
    (copy / "config.json").write_text(json.dumps(config))
    assert fingerprint_base(copy)["config_sha256"] != fingerprint_base(tiny_model_dir)["config_sha256"]


@pytest.mark.parametrize("change, message", [
    (dict(lora=LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0)), "lora.r 4 but this run has 8"),
    (dict(quant=QuantConfig(backend="torch")), "quantization quant_type=nf4, blocksize=128, double_quant=false but "
                                               "this run has quant_type=nf4, blocksize=64, double_quant=true"),
    (dict(quant=None), "but this run has no quantization"),
])
def test_a_resume_with_other_model_settings_is_refused(run, tiny_model_dir, memorize_data, monkeypatch, change,
                                                       message):
    import qlora_lite.train as train_module

    monkeypatch.setattr(train_module, "load_model", lambda *a, **k: pytest.fail("refused only after loading"))
    with pytest.raises(CheckpointError, match=message):
        train(_cfg(tiny_model_dir, memorize_data, run.out_dir, resume=True, **change))


def test_a_resume_on_another_base_is_refused(run, tiny_model_dir, memorize_data, tmp_path):
    other = tmp_path / "other"
    write_tiny_model(other, tiny_model_dir, seed=1)
    with pytest.raises(CheckpointError, match=r"was trained on .* another base \(tensor .* checksum"):
        train(_cfg(other, memorize_data, run.out_dir, resume=True))


def test_generate_leaves_the_global_random_state_alone(tiny_model_dir):
    from qlora_lite.generate import answer
    from qlora_lite.load import load_model

    model, tokenizer = load_model(tiny_model_dir, QuantConfig(backend="torch"), None, device="cpu")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = answer(model, tokenizer, "What is the code word number 1?", max_new_tokens=4, temperature=1.0, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert answer(model, tokenizer, "What is the code word number 1?", max_new_tokens=4, temperature=1.0,
                  seed=7) == first
    with pytest.raises(ConfigError, match="temperature=-1"):
        answer(model, tokenizer, "x", temperature=-1)


def test_batched_answers_equal_one_question_at_a_time(tiny_model_dir):
    """The demo asks its questions as one left-padded batch; greedy answers must not depend on it."""
    from qlora_lite.generate import answer, answers
    from qlora_lite.load import load_model

    model, tokenizer = load_model(tiny_model_dir, QuantConfig(backend="torch"), None, device="cpu")
    questions = ["What is the code word number 1?", "Hi", "Tell me, please, the code word number twelve."]
    assert len({len(tokenizer(q)["input_ids"]) for q in questions}) == 3  # the batch needs padding
    batched = answers(model, tokenizer, questions, max_new_tokens=6)
    assert batched == [answer(model, tokenizer, q, max_new_tokens=6) for q in questions]
    assert tokenizer.padding_side == "right"  # restored


def test_a_settings_file_that_is_not_json_is_a_clear_error(run, tmp_path):
    broken = tmp_path / "adapter"
    shutil.copytree(run.adapter_dir, broken)
    (broken / SETTINGS_NAME).write_text("{")
    with pytest.raises(CheckpointError, match=f"{SETTINGS_NAME} is not valid JSON"):
        read_settings(broken)


def test_the_merge_command_refuses_a_flag_that_contradicts_the_adapter(run, tiny_model_dir, tmp_path, capsys):
    from qlora_lite.cli import main

    code = main(["merge", "--base", str(tiny_model_dir), "--adapter", str(run.adapter_dir), "--out",
                 str(tmp_path / "merged"), "--blocksize", "64"])
    err = capsys.readouterr().err
    assert code == 2 and "blocksize=64 was passed but the adapter was trained with blocksize=128" in err
    assert len(err.strip().splitlines()) == 2  # the error and the --debug hint
    assert not (tmp_path / "merged").exists()
