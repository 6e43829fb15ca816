"""The training loop on a tiny Llama: learning, frozen base, resume equivalence, faults."""

from __future__ import annotations

import json
import shutil
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
from qlora_lite.train import TrainingRun, latest_checkpoint, train
from conftest import HANG_S


def _cfg(model_dir, data, out, **kw):
    base = dict(model=str(model_dir), data=str(data), out_dir=str(out), seq_len=64, batch_size=4, max_steps=20,
                learning_rate=5e-3, warmup_steps=2, eval_fraction=0.1, eval_every=10, save_every=10, progress=False,
                device="cpu", lora=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1), quant=QuantConfig(backend="torch"))
    base.update(kw)
    return TrainConfig(**base)


def test_training_lowers_loss_and_moves_only_lora(tiny_model_dir, memorize_data, tmp_path):
    cfg = _cfg(tiny_model_dir, memorize_data, tmp_path / "run", max_steps=40, learning_rate=3e-3,
               lora=LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0))
    torch.manual_seed(cfg.seed)  # the LoRA init, as train() would draw it
    model, tokenizer = load_model(tiny_model_dir, cfg.quant, cfg.lora, device="cpu")
    frozen = {name: {k: v.clone() for k, v in layer.weight.state_dict().items()}
              for name, layer in lora_layers(model).items()}
    result = train(cfg, loaded=(model, tokenizer))  # the very model object trained
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.8 * first, (first, last)  # a frozen random 2-layer base limits how far LoRA alone gets
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(0, 41)) and "eval_loss" in lines[-1] and "eval_loss" in lines[0]
    assert result.eval_losses[-1][1] < result.eval_losses[0][1]

    # The NF4 base the model trained on is byte for byte what it held before training; only LoRA moved.
    adapter = read_adapter(result.adapter_dir)
    for name, layer in lora_layers(model).items():
        assert all(torch.equal(v, layer.weight.state_dict()[k]) for k, v in frozen[name].items()), name
        torch.testing.assert_close(adapter.lora_B[name], layer.lora_B[layer.active_adapter].detach(), rtol=0, atol=0)
    assert any(b.abs().sum() > 0 for b in adapter.lora_B.values())  # B started at zero and moved


def test_log_every_thins_the_metrics_but_keeps_evals_and_the_last_step(tiny_model_dir, memorize_data, tmp_path):
    result = train(_cfg(tiny_model_dir, memorize_data, tmp_path / "run", max_steps=7, log_every=3, eval_every=5,
                        save_every=7))
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [0, 3, 5, 6, 7]
    assert [l["step"] for l in lines if "eval_loss" in l] == [0, 5, 7]
    assert len(result.losses) == 7  # every step's loss is still kept (and checkpointed)


def test_the_steps_reuse_a_cpu_dequantize_buffer_that_the_run_frees_at_its_end(tiny_model_dir, memorize_data, tmp_path,
                                                                                monkeypatch):
    from qlora_lite import layers

    buffers = layers._DequantizeBuffers()
    monkeypatch.setattr(layers, "_CPU_BUFFERS", buffers)
    held: list[dict] = []
    step = TrainingRun.train_step
    monkeypatch.setattr(TrainingRun, "train_step",
                        lambda self, *a: (out := step(self, *a), held.append(dict(buffers.by_dtype)))[0])
    train(_cfg(tiny_model_dir, memorize_data, tmp_path / "run", max_steps=2, eval_every=2, save_every=2))
    assert len(held) == 2 and all(torch.float32 in h for h in held)
    assert buffers.by_dtype == {}


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


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(tiny_model_dir, memorize_data, tmp_path, monkeypatch):
    straight = train(_cfg(tiny_model_dir, memorize_data, tmp_path / "straight", max_steps=20, save_every=20))
    real_save = TrainingRun.save_checkpoint

    def save_then_crash(run, step):
        real_save(run, step)
        raise KeyboardInterrupt  # the process dies right after the step-10 checkpoint

    monkeypatch.setattr(TrainingRun, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_model_dir, memorize_data, tmp_path / "resumed", max_steps=20, save_every=10))
    monkeypatch.undo()
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
        if calls["n"] == 4:  # the 4th training batch: make the model's embeddings produce NaN
            monkeypatch.setattr(torch.nn.Embedding, "forward",
                                lambda self, x: torch.full((*x.shape, self.embedding_dim), float("nan")))
        return real_collate(batch, pad_id)

    monkeypatch.setattr(train_module, "collate", poisoned_collate)
    with pytest.raises(TrainingError, match="lower learning_rate") as info:
        train(_cfg(tiny_model_dir, memorize_data, tmp_path / "run", max_steps=10, save_every=2, eval_fraction=0.0))
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
    deadline = time.time() + HANG_S
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=HANG_S)
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


def _steps(out_dir) -> list[int]:
    def no_nan(name):
        raise AssertionError(f"{name} in metrics.jsonl is not valid JSON")

    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=no_nan)["step"] for line in lines]


def test_a_killed_run_resumes_without_logging_a_step_twice(tiny_model_dir, memorize_data, tmp_path):
    out = tmp_path / "run"
    # max_grad_norm 0: no gradient norm is computed; it is logged as null, never as NaN
    train(_cfg(tiny_model_dir, memorize_data, out, max_steps=2, save_every=2, eval_fraction=0.0, max_grad_norm=0.0))
    with open(out / "metrics.jsonl", "a") as handle:  # kill -9 after step 3 was logged, mid-way through step 4's line
        handle.write(json.dumps({"step": 3, "loss": 1.0}) + '\n{"step": 4, "lo')
    train(_cfg(tiny_model_dir, memorize_data, out, max_steps=4, save_every=2, eval_fraction=0.0, max_grad_norm=0.0,
               resume=True))
    assert _steps(out) == [1, 2, 3, 4]


def test_a_previous_run_without_checkpoints_is_refused_unless_overwritten(tiny_model_dir, memorize_data, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny_model_dir, memorize_data, out, max_steps=2, eval_fraction=0.0))
    shutil.rmtree(out / "checkpoints")
    for resume in (False, True):
        with pytest.raises(TrainingError, match=r"holds a previous run \(metrics.jsonl, adapter, memory.json\)"):
            train(_cfg(tiny_model_dir, memorize_data, out, max_steps=2, eval_fraction=0.0, resume=resume))
    train(_cfg(tiny_model_dir, memorize_data, out, max_steps=2, eval_fraction=0.0, overwrite_output_dir=True))
    assert _steps(out) == [1, 2]  # one run's metrics, not two


@pytest.mark.parametrize("data, seq_len, message", [
    ("missing.jsonl", 64, "no such file"),
    # a text record trains every token, but the first one is never predicted: nothing left at seq_len 1
    ("text.jsonl", 1, "no record has a trainable token within seq_len=1"),
])
def test_the_data_is_checked_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch, data, seq_len, message):
    import qlora_lite.train as train_module
    from qlora_lite.errors import DataError

    (tmp_path / "text.jsonl").write_text('{"text": "The code word number 1 is apple."}\n' * 4)
    monkeypatch.setattr(train_module, "load_model", lambda *a, **k: pytest.fail("the model loaded first"))
    path = tmp_path / data
    with pytest.raises(DataError, match=message):
        train(_cfg(tiny_model_dir, path, tmp_path / "run", seq_len=seq_len))


def test_a_non_finite_max_grad_norm_is_refused():
    from qlora_lite.errors import ConfigError

    for value in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="max_grad_norm=.* must be a finite number"):
            TrainConfig(max_grad_norm=value)


def test_sixteen_bit_adapters_on_cpu_get_32_bit_optimizer_states_and_adamws_update():
    """torch AdamW would keep the moments of a bf16 adapter in bf16; the CPU run keeps them fp32 (bitsandbytes'
    32-bit AdamW, as the paged one on CUDA), and each step is fp32 AdamW on the bf16 weight, rounded once."""
    from qlora_lite.train import build_optimizer

    gen = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 32, generator=gen).to(torch.bfloat16))
    reference = torch.nn.Parameter(weight.detach().float().clone())
    cfg = TrainConfig(model="m", data="d", out_dir="o", learning_rate=1e-2, weight_decay=0.1, device="cpu")
    optimizer = build_optimizer([weight], cfg, torch.device("cpu"), log=lambda _msg: None)
    fp32_adamw = torch.optim.AdamW([reference], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        grad = torch.randn(64, 32, generator=gen)
        weight.grad, reference.grad = grad.to(torch.bfloat16), grad.to(torch.bfloat16).float()
        optimizer.step()
        fp32_adamw.step()
        reference.data = reference.data.to(torch.bfloat16).float()  # the weight is stored bf16 after each step
    states = [t for t in optimizer.state[weight].values() if torch.is_tensor(t) and t.numel() > 1]
    assert len(states) == 2 and all(t.dtype == torch.float32 for t in states)
    torch.testing.assert_close(weight.detach().float(), reference.detach(), rtol=2 ** -7, atol=1e-6)
