"""The embedded SmolLM2-135M: a short QLoRA fine-tune lowers held-out loss, and NF4 loses
nothing against 16-bit LoRA trained through the same code path (the QLoRA paper's claim)."""

from __future__ import annotations

import pytest

from qlora_lite.config import LoraConfig, QuantConfig, TrainConfig
from qlora_lite.train import train


@pytest.fixture(scope="module")
def runs(embedded_dir, tmp_path_factory):
    out = {}
    for label, quant in (("nf4", QuantConfig()), ("16bit", None)):
        cfg = TrainConfig(model=str(embedded_dir), data="embedded", out_dir=str(tmp_path_factory.mktemp(label)),
                          seq_len=128, batch_size=4, max_steps=12, learning_rate=1e-3, warmup_steps=2,
                          eval_fraction=0.1, eval_every=12, save_every=12, progress=False, device="cpu", seed=0,
                          lora=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0), quant=quant)
        out[label] = train(cfg, log=lambda _msg: None)
    return out


def test_short_fine_tune_lowers_held_out_loss(runs):
    result = runs["nf4"]
    before, after = result.eval_losses[0][1], result.eval_losses[-1][1]
    print(f"NF4 held-out loss {before:.3f} -> {after:.3f}")
    assert after < 0.7 * before


def test_nf4_held_out_loss_within_2_percent_of_16_bit_lora(runs):
    nf4, bf = runs["nf4"].eval_losses[-1][1], runs["16bit"].eval_losses[-1][1]
    print(f"held-out loss after 12 steps: NF4 {nf4:.4f}, 16-bit {bf:.4f} ({100 * (nf4 / bf - 1):+.2f}%)")
    assert nf4 == pytest.approx(bf, rel=0.02)
