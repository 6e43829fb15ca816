"""Mixture-of-experts models (experts.py): NF4 experts, per-expert LoRA in PEFT's layout, merge, and
the planner's counts, on tiny Mixtral and Qwen3-MoE models built in code."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from qlora_lite.config import LoraConfig, QuantConfig
from qlora_lite.errors import ConfigError
from qlora_lite.experts import LoRAExperts4bit
from qlora_lite.inject import count_parameters, inject_lora
from qlora_lite.memory import _block_bytes_per_token, estimate_memory, fit_to_budget
from qlora_lite.memory_arch import model_shape
from qlora_lite.memory_moe import moe_mlp_bytes_per_token
from qlora_lite.nf4 import NF4Weight

SHARED = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
              max_position_embeddings=128)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_mixtral_config(**overrides) -> MixtralConfig:
    """4 experts, top-2, expert intermediate 96: the gate_up rows (192·64) fill whole NF4 blocks."""
    return MixtralConfig(**{**SHARED, "intermediate_size": 96, "num_local_experts": 4, "num_experts_per_tok": 2,
                            **overrides})


def tiny_qwen3_moe_config(**overrides) -> Qwen3MoeConfig:
    """8 experts, top-2, renormalised (as Qwen3-30B-A3B), expert intermediate 32, a dense MLP of 128."""
    return Qwen3MoeConfig(**{**SHARED, "intermediate_size": 128, "moe_intermediate_size": 32, "num_experts": 8,
                             "num_experts_per_tok": 2, "head_dim": 16, "norm_topk_prob": True, **overrides})


def build(kind: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if kind == "mixtral":
        return MixtralForCausalLM(tiny_mixtral_config(**overrides))
    return Qwen3MoeForCausalLM(tiny_qwen3_moe_config(**overrides))


KINDS = ["mixtral", "qwen3_moe"]


# ---- planner ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,overrides", [("mixtral", {}), ("qwen3_moe", {"mlp_only_layers": [1]}),
                                            ("qwen3_moe", {"tie_word_embeddings": True})])
@pytest.mark.parametrize("targets", [None, [], ["down_proj"]])
@pytest.mark.parametrize("quant", [QuantConfig(), None])
def test_planner_counts_equal_an_instantiated_moe_model(kind, overrides, targets, quant):
    model = build(kind, **overrides)
    lora = LoraConfig(r=4, lora_dropout=0.0, target_parameters=targets)
    inject_lora(model, lora, quant)
    counted = count_parameters(model)
    est = estimate_memory(model.config, seq_len=32, batch_size=1, lora=lora, quant=quant, device="cpu")
    assert (est.params_total, est.params_quantized, est.params_trainable) == (
        counted.total, counted.quantized, counted.trainable)
    nf4 = [m for m in model.modules() if isinstance(m, NF4Weight)]
    assert est.quantized_weights == sum(w.nbytes for w in nf4)
    routed = [layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    assert len(routed) == (1 if overrides.get("mlp_only_layers") else 2)
    # every expert's matrix its own NF4 weight (a 16-bit run keeps them 16-bit when adapted)
    expert_nf4 = [w for e in routed if isinstance(e, LoRAExperts4bit) for p in e.projections().values()
                  if p.quantized for w in p.weight]
    assert len(expert_nf4) == (2 * len(routed) * routed[0].num_experts if quant else 0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert est.lora_params == sum(p.numel() * p.element_size() for p in trainable)


def _saved_bytes_of_mlp(model, layer, ids) -> tuple[int, int]:
    """(bytes of the distinct storages autograd saves inside `layer.mlp`, the share that is a compute-dtype
    copy of a LoRA factor: per block, not per token; the planner leaves it out, as for linears)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    inside, saved, copies = [False], {}, {}
    layer.mlp.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    layer.mlp.register_forward_hook(lambda *a: inside.__setitem__(0, False))
    # the (E, r, in) and (out, r, E) views of A and B that the grouped matmul keeps in the compute dtype
    factor_shapes = {shape for p in layer.mlp.experts.projections().values() for name in p.adapters
                     for shape in ((p.num_experts, p.adapters[name].r, p.in_features),
                                   (p.out_features, p.adapters[name].r, p.num_experts))}

    def pack(t):
        storage = t.untyped_storage()
        if inside[0] and storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
            if tuple(t.shape) in factor_shapes:
                copies[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(saved.values()), sum(copies.values())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,targets", [(torch.bfloat16, None), (torch.float32, None), (torch.bfloat16, []),
                                           (torch.bfloat16, ["gate_up_proj"])])
def test_moe_formula_equals_what_autograd_saves(kind, dtype, targets):
    model = build(kind).to(dtype)
    lora = LoraConfig(r=4, lora_dropout=0.0, target_parameters=targets)
    names = inject_lora(model, lora, QuantConfig())
    model.train()
    batch, seq = 2, 16
    measured, copies = _saved_bytes_of_mlp(model, model.model.layers[1], torch.randint(0, 256, (batch, seq)))
    adapted = [n.rsplit(".", 1)[-1] for n in names if ".layers.1.mlp.experts." in n]
    predicted = batch * seq * moe_mlp_bytes_per_token(model_shape(model.config), 1, adapted, dtype=dtype, r=4)
    factors = sum(p.numel() for n, p in model.named_parameters() if ".layers.1.mlp.experts." in n and p.requires_grad)
    assert copies == (factors * dtype.itemsize if dtype != torch.float32 else 0)
    assert predicted + copies == measured


def test_block_formula_uses_the_routed_mlp():
    shape = model_shape(tiny_qwen3_moe_config(mlp_only_layers=[0]))
    assert shape.representative_layers() == [0, 1]
    dense = _block_bytes_per_token(shape, [], b=2, mask=1, r=4, dropout=0.0)
    routed = _block_bytes_per_token(shape, [], b=2, mask=1, r=4, dropout=0.0,
                                    moe_mlp=moe_mlp_bytes_per_token(shape, 1, [], dtype=torch.bfloat16, r=4))
    assert dense - 3 * 2 * 128 == routed - moe_mlp_bytes_per_token(shape, 1, [], dtype=torch.bfloat16, r=4)


def test_real_moe_shapes_are_planned():
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0)
    mixtral = estimate_memory("mixtral-8x7b", seq_len=2048, batch_size=1, lora=lora)
    qwen = estimate_memory("qwen3-30b-a3b", seq_len=2048, batch_size=1, lora=lora)
    # the published sizes: 46.7B and 30.5B parameters (the planner adds the adapters to the total)
    assert mixtral.params_total - mixtral.params_trainable == 46_702_792_704
    assert qwen.params_total - qwen.params_trainable == 30_532_122_624
    assert mixtral.params_quantized == 32 * (4096 * (2 * 4096 + 2 * 1024) + 8 * 3 * 4096 * 14336)  # attention + experts
    assert 22.3 * 2**30 < mixtral.quantized_weights < 22.4 * 2**30  # not 87 GiB of bf16 experts
    assert qwen.params_trainable == 48 * 16 * (2 * 4096 + 2 * 2048 + 2 * (512 + 2048)  # q, o, k, v
                                               + 128 * (2048 + 1536 + 768 + 2048))  # every expert's two pairs
    assert fit_to_budget("qwen3-30b-a3b", "24GiB", seq_len=2048, lora=lora).value == 1
    attention_only = dataclasses_replace(lora, target_parameters=[])
    assert fit_to_budget("qwen3-30b-a3b", "24GiB", seq_len=2048, lora=attention_only).value >= 1
    with pytest.raises(Exception, match="FSDP over 2 GPUs"):
        fit_to_budget("mixtral-8x7b", "24GiB", seq_len=2048, lora=lora)


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


@pytest.mark.parametrize("config,words", [
    ({"model_type": "qwen2_moe", "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
      "shared_expert_intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2, "vocab_size": 100},
     "besides its router and experts"),
    ({"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
      "num_attention_heads": 0, "vocab_size": 100, "num_local_experts": 4}, "num_attention_heads=0"),
])
def test_moe_layouts_it_cannot_count_are_refused_in_one_line(tmp_path, config, words):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=words) as info:
        estimate_memory(path, seq_len=64, batch_size=1)
    assert len(info.value.problems) == 1
    from qlora_lite.cli import main

    assert main(["memory", "--model", str(path)]) == 2


def test_moe_options_the_planner_does_not_model_are_refused():
    for kwargs, words in (({"recipe": "peft"}, "peer recipe"), ({"mlp_chunk_tokens": 16}, "tiled MLP")):
        with pytest.raises(ConfigError, match=words):
            estimate_memory(tiny_mixtral_config(), seq_len=64, batch_size=1, **kwargs)
