"""The training loop on a tiny Llama: learning, frozen base, resume equivalence, faults."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from qlora_lite.adapter import read_adapter
from qlora_lite.config import LoraConfig, QuantConfig, TrainConfig
from qlora_lite.errors import TrainingError
from qlora_lite.inject import count_parameters, lora_layers
from qlora_lite.load import load_model
from qlora_lite.train import latest_checkpoint, train


def _cfg(model_dir, data, out, **kw):
    base = dict(model=str(model_dir), data=str(data), out_dir=str(out), seq_len=64, batch_size=4, max_steps=20,
                learning_rate=5e-3, warmup_steps=2, eval_fraction=0.1, eval_every=10, save_every=10, progress=False,
                device="cpu", lora=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1), quant=QuantConfig(backend="torch"))
    base.update(kw)
    return TrainConfig(**base)


def test_training_lowers_loss_and_moves_only_lora(tiny_model_dir, memorize_data, tmp_path):
    result = train(_cfg(tiny_model_dir, memorize_data, tmp_path / "run", max_steps=40, learning_rate=3e-3,
                        lora=LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0)))
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.8 * first, (first, last)  # a frozen random 2-layer base limits how far LoRA alone gets
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(0, 41)) and "eval_loss" in lines[-1] and "eval_loss" in lines[0]
    assert result.eval_losses[-1][1] < result.eval_losses[0][1]

    # The NF4 base after training is byte-identical to a fresh quantization of the checkpoint.
    fresh, _ = load_model(tiny_model_dir, QuantConfig(backend="torch"), LoraConfig(r=8), device="cpu")
    trained, _ = load_model(tiny_model_dir, QuantConfig(backend="torch"), LoraConfig(r=8), device="cpu")
    from qlora_lite.adapter import load_adapter

    load_adapter(trained, result.adapter_dir, name="trained")
    for name, layer in lora_layers(trained).items():
        fresh_sd = lora_layers(fresh)[name].base.state_dict()
        assert all(torch.equal(v, layer.base.state_dict()[k]) for k, v in fresh_sd.items())
    adapter = read_adapter(result.adapter_dir)
    assert any(b.abs().sum() > 0 for b in adapter.lora_B.values())  # B started at zero and moved


def test_log_every_thins_the_metrics_but_keeps_evals_and_the_last_step(tiny_model_dir, memorize_data, tmp_path):
    result = train(_cfg(tiny_model_dir, memorize_data, tmp_path / "run", max_steps=7, log_every=3, eval_every=5,
                        save_every=7))
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [0, 3, 5, 6, 7]
    assert [l["step"] for l in lines if "eval_loss" in l] == [0, 5, 7]
    assert len(result.losses) == 7  # every step's loss is still kept (and checkpointed)


def test_the_memory_plan_is_logged_before_loading_and_kept_next_to_the_measurement(tiny_model_dir, memorize_data,
                                                                                   tmp_path):
    messages: list[str] = []
    train(_cfg(tiny_model_dir, memorize_data, tmp_path / "run", max_steps=2), log=messages.append)
    plan = next(i for i, m in enumerate(messages) if m.startswith("memory plan: "))
    assert plan < next(i for i, m in enumerate(messages) if m.startswith("model "))  # before the load
    assert not any(m.startswith("warning:") for m in messages)  # a tiny model fits this machine
    memory = json.loads((tmp_path / "run" / "memory.json").read_text())
    predicted = memory["predicted"]
    assert predicted["total_bytes"] == sum(predicted["breakdown"].values()) > 0
    assert f"{predicted['total_bytes'] / 2**30:.2f} GiB per process" in messages[plan]


def test_trainable_count_is_r_times_in_plus_out(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, QuantConfig(backend="torch"), LoraConfig(r=8), device="cpu",
                          with_tokenizer=False)
    expected = sum(8 * (l.in_features + l.out_features) for l in lora_layers(model).values())
    # per layer: q (64->64), k, v (64->32), o (64->64), gate, up (64->128), down (128->64)
    by_hand = 2 * 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert count_parameters(model).trainable == expected == by_hand


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(tiny_model_dir, memorize_data, tmp_path):
    straight = train(_cfg(tiny_model_dir, memorize_data, tmp_path / "straight", max_steps=20, save_every=20))
    first_half = _cfg(tiny_model_dir, memorize_data, tmp_path / "resumed", max_steps=20, save_every=10)
    # Stop after 10 steps exactly as a crash would: keep only the step-10 checkpoint.
    cfg10 = _cfg(tiny_model_dir, memorize_data, tmp_path / "resumed", max_steps=20, save_every=10)
    object.__setattr__(cfg10, "max_steps", 20)
    import qlora_lite.train as train_module

    original = train_module._save_checkpoint
    calls = []

    def save_then_crash(*args, **kwargs):
        path = original(*args, **kwargs)
        calls.append(path)
        raise KeyboardInterrupt  # the process dies right after the step-10 checkpoint

    train_module._save_checkpoint = save_then_crash
    try:
        with pytest.raises(KeyboardInterrupt):
            train(first_half)
    finally:
        train_module._save_checkpoint = original
    assert latest_checkpoint(tmp_path / "resumed").name == "step-000010"
    resumed = train(_cfg(tiny_model_dir, memorize_data, tmp_path / "resumed", max_steps=20, save_every=10,
                         resume=True))
    assert resumed.steps == 20
    a, b = read_adapter(straight.adapter_dir), read_adapter(resumed.adapter_dir)
    for module in a.modules:
        torch.testing.assert_close(a.lora_A[module], b.lora_A[module], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a.lora_B[module], b.lora_B[module], atol=1e-6, rtol=1e-5)
    assert straight.losses[10:] == pytest.approx(resumed.losses[10:], rel=1e-5)


def test_existing_run_without_resume_is_refused(tiny_model_dir, memorize_data, tmp_path):
    train(_cfg(tiny_model_dir, memorize_data, tmp_path / "run", max_steps=2, save_every=1))
    with pytest.raises(TrainingError, match="--resume"):
        train(_cfg(tiny_model_dir, memorize_data, tmp_path / "run", max_steps=4))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_model_dir, memorize_data, tmp_path, monkeypatch):
    import qlora_lite.train as train_module

    real_collate = train_module.collate
    calls = {"n": 0}

    def poisoned_collate(batch, pad_id):
        calls["n"] += 1
        out = real_collate(batch, pad_id)
        if calls["n"] == 4:  # the 4th training batch: make the model's embeddings produce NaN
            torch.nn.Embedding.forward = lambda self, x: torch.full((*x.shape, self.embedding_dim), float("nan"))
        return out

    embedding_forward = torch.nn.Embedding.forward
    monkeypatch.setattr(train_module, "collate", poisoned_collate)
    try:
        with pytest.raises(TrainingError, match="lower learning_rate") as info:
            train(_cfg(tiny_model_dir, memorize_data, tmp_path / "run", max_steps=10, save_every=2, eval_fraction=0.0))
    finally:
        torch.nn.Embedding.forward = embedding_forward
    assert "step-000002" in str(info.value)
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "step-000002"
    assert all(torch.isfinite(t).all() for t in read_adapter(ckpt / "adapter").lora_A.values())


def test_sigint_writes_a_checkpoint_and_resume_finishes(tiny_model_dir, memorize_data, tmp_path):
    out = tmp_path / "run"
    code = (
        "import sys; from qlora_lite.train import train; from qlora_lite.config import *;"
        f"r = train(TrainConfig(model={str(tiny_model_dir)!r}, data={str(memorize_data)!r}, out_dir={str(out)!r},"
        " seq_len=64, batch_size=4, max_steps=400, save_every=1000, eval_every=1000, progress=False, device='cpu',"
        " lora=LoraConfig(r=4), quant=QuantConfig(backend='torch')));"
        "sys.exit(130 if r.interrupted else 0)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and "checkpoint saved" in err
    adapter = read_adapter(ckpt / "adapter")
    steps_done = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert 2 <= steps_done < 400 and adapter.modules
    result = train(_cfg(tiny_model_dir, memorize_data, out, max_steps=steps_done + 2, resume=True,
                        lora=LoraConfig(r=4), save_every=1000, eval_every=1000))
    assert result.steps == steps_done + 2 and not result.interrupted


def test_two_runs_on_one_directory_do_not_collide(tiny_model_dir, memorize_data, tmp_path):
    from qlora_lite.errors import QLoraLiteError
    from qlora_lite.fsutil import RunLock

    with RunLock(tmp_path / "run"):
        with pytest.raises(QLoraLiteError, match="in use"):
            train(_cfg(tiny_model_dir, memorize_data, tmp_path / "run", max_steps=2))
