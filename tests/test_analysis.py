"""analysis.py / plots.py on tiny matrices and a tiny Llama: spectra, φ, accounting, reports."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qlora_lite import analysis as an
from qlora_lite.errors import CheckpointError

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 128, 2, 4, 2, 256
KV = HIDDEN // HEADS * KV_HEADS  # 32


# ---------------------------------------------------------------- tiny models and adapters

def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_base")
    _tiny_llama().save_pretrained(path)
    return path


def _our_adapter(path, targets, r, seed=0):
    from qlora_lite.adapter import save_adapter
    from qlora_lite.config import LoraConfig
    from qlora_lite.inject import inject_lora, lora_layers

    model = _tiny_llama()
    inject_lora(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets), quant=None)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if "default" in layer.lora_B:
                layer.lora_B["default"].copy_(torch.randn(layer.lora_B["default"].shape, generator=gen) * 0.1)
    return save_adapter(model, path)


@pytest.fixture(scope="module")
def adapter_qv(tmp_path_factory):
    return _our_adapter(tmp_path_factory.mktemp("a") / "qv_r4", ["q_proj", "v_proj"], 4)


# ---------------------------------------------------------------- spectrum

def test_rank_two_delta_has_two_singular_values_and_zero_error_at_k2():
    torch.manual_seed(0)
    A = torch.randn(4, 20)
    B = torch.randn(16, 2) @ torch.randn(2, 4)  # rank 2, so ΔW = B·A has rank 2
    S = an.delta_spectrum(A, B, 0.5)
    assert S.shape == (4,)
    assert (S[:2] > 1e-3).all()
    assert (S[2:] < 1e-5 * S[0]).all()
    curve = an.truncation_error_curve(S)
    assert len(curve) == 5 and curve[0] == pytest.approx(1.0)
    assert curve[2] == pytest.approx(0.0, abs=1e-6) and curve[4] == 0.0
    assert an.energy_share(S, 2) == pytest.approx(1.0)


def test_small_factor_svd_matches_the_formed_matrix():
    torch.manual_seed(1)
    A, B, s = torch.randn(6, 40), torch.randn(30, 6), 1.7
    delta = s * B @ A
    U, S, Vh = an.delta_svd(A, B, s)
    assert U.shape == (30, 6) and Vh.shape == (6, 40)
    torch.testing.assert_close(S, torch.linalg.svdvals(delta)[:6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, delta, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(6), atol=1e-5, rtol=0)


def test_rank_above_layer_width_is_a_clear_error():
    with pytest.raises(ValueError, match="exceeds min"):
        an.delta_svd(torch.randn(8, 4), torch.randn(16, 8), 1.0)


def test_effective_rank():
    assert an.effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert an.effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert an.effective_rank(torch.zeros(4)) == 0.0
    assert 1.0 < an.effective_rank(torch.tensor([4.0, 2.0, 1.0])) < 3.0
    assert an.truncation_error_curve(torch.zeros(3)) == [0.0] * 4


# ---------------------------------------------------------------- subspace similarity

def test_phi_identical_is_one_and_orthogonal_is_zero():
    torch.manual_seed(2)
    A = torch.randn(4, 32)
    grid = an.similarity_grid(A, A)
    assert grid.shape == (4, 4)
    torch.testing.assert_close(grid, torch.ones(4, 4), atol=1e-5, rtol=0)
    # a different A with the same row space: still 1 wherever one span contains the other (i or j = 4)
    mixed = torch.randn(4, 4) @ A
    assert an.subspace_similarity(A, mixed, 4, 4) == pytest.approx(1.0, abs=1e-5)
    assert an.subspace_similarity(A, mixed, 1, 4) == pytest.approx(1.0, abs=1e-5)
    eye = torch.eye(16)
    assert an.subspace_similarity(eye[:4] * 3, eye[4:12], 4, 8) == pytest.approx(0.0, abs=1e-7)
    assert an.similarity_grid(eye[:4], eye[4:12]).abs().max() < 1e-7
    # nested: the top-2 of A1 lie inside A2's span
    assert an.subspace_similarity(torch.diag(torch.tensor([3.0, 2.0])) @ eye[:2], eye[:6], 2, 6) == pytest.approx(1.0)


def test_phi_random_subspaces_near_chance():
    gen = torch.Generator().manual_seed(3)
    A1, A2 = torch.randn(4, 512, generator=gen), torch.randn(8, 512, generator=gen)
    assert an.subspace_similarity(A1, A2, 4, 8) < 0.1  # chance: 8/512


# ---------------------------------------------------------------- amplification, NF4

def test_amplification_of_w_by_itself_is_one():
    torch.manual_seed(4)
    A, B = torch.randn(3, 24), torch.randn(20, 3)
    W = 2.0 * B @ A
    amp = an.amplification(W, A, B, 2.0)
    assert amp["factor"] == pytest.approx(1.0, rel=1e-5)
    assert amp["proj_delta"] == pytest.approx(amp["w_fro"], rel=1e-5)
    assert amp["proj_random"] < amp["proj_delta"]


def test_quantization_error_is_small_and_relative_to_delta():
    torch.manual_seed(5)
    W = torch.randn(64, 128)
    err = an.quantization_error(W, delta_fro=2.0)
    assert 0.0 < err["nf4_error_rel"] < 0.15
    assert err["nf4_error_over_delta"] == pytest.approx(err["nf4_error_fro"] / 2.0)


# ---------------------------------------------------------------- accounting

def _linear_sizes():
    per_layer = [HIDDEN * HIDDEN, KV * HIDDEN, KV * HIDDEN, HIDDEN * HIDDEN, INTER * HIDDEN, INTER * HIDDEN,
                 HIDDEN * INTER]
    return per_layer * LAYERS


def test_accounting_matches_hand_counts(base_dir, adapter_qv):
    from transformers import LlamaConfig

    tied = LlamaConfig().tie_word_embeddings
    linear = sum(_linear_sizes())
    other = VOCAB * HIDDEN * (1 if tied else 2) + LAYERS * 2 * HIDDEN + HIDDEN
    trainable = LAYERS * (4 * (HIDDEN + HIDDEN) + 4 * (HIDDEN + KV))  # r=4 on q (64→64) and v (64→32)
    acc = an.account(adapter_qv, base_dir)
    assert acc.trainable_params == trainable == 1792
    assert acc.total_params == linear + other
    assert acc.linear_params == linear
    assert acc.trainable_ratio == pytest.approx(trainable / (linear + other))
    assert acc.full_16bit_bytes == 2 * (linear + other)
    nf4 = sum(n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4 for n in _linear_sizes())
    assert acc.nf4_base_bytes == nf4 + 2 * other
    assert an.nf4_bytes(HIDDEN * HIDDEN) == 2048 + 64 + 4 + 4
    assert acc.lora_optimizer_bytes == 8 * trainable and acc.full_ft_optimizer_bytes == 8 * (linear + other)
    assert acc.adapter_tensor_bytes == 4 * trainable
    assert acc.adapter_file_bytes > acc.adapter_tensor_bytes
    assert acc.adapted_base_params == LAYERS * (HIDDEN * HIDDEN + KV * HIDDEN)
    # the safetensors file itself is accepted too; no base: base fields stay None
    alone = an.account(adapter_qv / "adapter_model.safetensors")
    assert alone.trainable_params == trainable and alone.total_params is None


def test_prequantized_base_counts_unpacked_shapes(tmp_path, base_dir, adapter_qv):
    """A bnb-4bit base (packed uint8 + quant state) is counted by its logical shapes and dequantized for W."""
    import shutil

    from safetensors.torch import load_file, save_file

    from qlora_lite.nf4 import NF4Weight

    tensors = load_file(str(base_dir / "model.safetensors"))
    out = {}
    for key, value in tensors.items():
        if value.dim() == 2 and "embed" not in key and "lm_head" not in key:
            out |= NF4Weight.from_tensor(value, backend="torch").state_dict(prefix=f"{key}.")
        else:
            out[key] = value
    (tmp_path / "q").mkdir()
    save_file({k: v.contiguous() for k, v in out.items()}, str(tmp_path / "q" / "model.safetensors"))
    shutil.copy(base_dir / "config.json", tmp_path / "q" / "config.json")
    assert an.account(adapter_qv, tmp_path / "q").total_params == an.account(adapter_qv, base_dir).total_params
    report = an.analyze(adapter_qv, tmp_path / "q", out_dir=tmp_path / "out", plots=False)
    assert all("nf4_error_rel" not in m.base and m.base["factor"] > 0 for m in report.modules)


def test_nf4_bytes_matches_the_container():
    from qlora_lite.nf4 import NF4Weight

    for shape in [(64, 64), (33, 70), (300, 200)]:
        assert an.nf4_bytes(shape[0] * shape[1]) == NF4Weight.from_tensor(torch.randn(shape), backend="torch").nbytes


def test_gpt3_row():
    row = an.gpt3_175b_accounting(r=4)
    assert row["trainable_params"] == 96 * 2 * 4 * (12288 + 12288) == 18_874_368
    assert 5_000 < row["fewer_trainable_x"] < 20_000  # the paper's "10,000×"
    assert 30e6 < row["adapter_16bit_bytes"] < 40e6  # the paper's "35 MB"
    assert an.gpt3_175b_accounting(r=1)["trainable_params"] == 4_718_592  # the paper's "4.7M" row


# ---------------------------------------------------------------- PEFT adapters, comparison, reports

def test_adapter_saved_by_peft(tmp_path, base_dir):
    import peft

    model = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False))
    model.save_pretrained(tmp_path / "peft")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    acc = an.account(tmp_path / "peft", base_dir)
    assert acc.trainable_params == trainable
    report = an.analyze(tmp_path / "peft", base_dir, out_dir=tmp_path / "out", plots=False)
    assert len(report.modules) == 2 * LAYERS
    assert {m.kind for m in report.modules} == {"q_proj", "v_proj"}
    assert report.modules[0].module == "model.layers.0.self_attn.q_proj"
    assert all(m.base["factor"] > 0 for m in report.modules)
    # ΔW from PEFT's own delta weight equals ours
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    expected = torch.linalg.svdvals(layer.get_delta_weight("default").detach())[:4]
    got = next(m for m in report.modules if m.module == "model.layers.1.self_attn.v_proj").singular_values
    torch.testing.assert_close(torch.tensor(got), expected, rtol=1e-4, atol=1e-6)


def test_mismatched_adapters_compare_common_modules(tmp_path, adapter_qv):
    other = _our_adapter(tmp_path / "qk_r8", ["q_proj", "k_proj"], 8, seed=1)
    report = an.analyze(adapter_qv, compare_to=other, out_dir=tmp_path / "out", plots=False)
    comp = report.comparison
    assert comp["common"] == LAYERS and list(comp["kinds"]) == ["q_proj"]
    assert comp["skipped"]["only_in_adapter"] == [f"model.layers.{i}.self_attn.v_proj" for i in range(LAYERS)]
    assert comp["skipped"]["only_in_compare"] == [f"model.layers.{i}.self_attn.k_proj" for i in range(LAYERS)]
    grid = comp["kinds"]["q_proj"]["grid_A_mean"]
    assert len(grid) == 4 and len(grid[0]) == 8
    assert "only_in_adapter 2" in (tmp_path / "out" / "report.md").read_text()


def test_adapter_with_rank_above_width_is_rejected(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "bad").mkdir()
    save_file({"base_model.model.x.lora_A.weight": torch.randn(8, 4),
               "base_model.model.x.lora_B.weight": torch.randn(16, 8)},
              str(tmp_path / "bad" / "adapter_model.safetensors"))
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 8}))
    with pytest.raises(CheckpointError, match="r=8 > min"):
        an.analyze(tmp_path / "bad", out_dir=tmp_path / "out", plots=False)


def test_analyze_writes_plots_and_reports(tmp_path, base_dir, adapter_qv):
    other = _our_adapter(tmp_path / "qv_r8", ["q_proj", "v_proj"], 8, seed=1)
    out = tmp_path / "analysis"
    report = an.analyze(adapter_qv, base_dir, compare_to=other, out_dir=out)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["amplification.png", "spectra.png", "subspace_similarity.png", "truncation_error.png"]
    for png in out.glob("*.png"):
        assert png.stat().st_size > 5_000 and png.read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "## Accounting" in md and "spectra.png" in md and "GPT-3 175B" in md
    data = json.loads((out / "report.json").read_text())
    assert data["accounting"]["trainable_params"] == 1792 and len(data["modules"]) == 4
    lines = an.headline(report)
    assert 2 <= len(lines) <= 4 and "effective rank" in lines[1]
    text = an.analyze_command(str(adapter_qv), str(base_dir), str(other), str(tmp_path / "cmd"))
    assert "report.md" in text and (tmp_path / "cmd" / "spectra.png").is_file()
    as_json = json.loads(an.analyze_command(str(adapter_qv), out=str(tmp_path / "cmd2"), json_output=True))
    assert as_json["accounting"]["total_params"] is None or as_json["accounting"]["total_params"] > 0
