"""Mixture-of-experts models (experts.py): NF4 experts, per-expert LoRA in PEFT's layout, merge, and
the planner's counts, on tiny Mixtral and Qwen3-MoE models built in code."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from qlora_lite.config import LoraConfig, QuantConfig
from qlora_lite.errors import ConfigError
from qlora_lite.experts import LoRAExperts4bit
from qlora_lite.inject import count_parameters, inject_lora
from qlora_lite.memory import _block_bytes_per_token, estimate_memory
from qlora_lite.memory_fit import fit_to_budget
from qlora_lite.memory_arch import model_shape
from qlora_lite.memory_moe import moe_mlp_bytes_per_token
from qlora_lite.nf4 import NF4Weight

SHARED = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
              max_position_embeddings=128)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


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
    attention_only = dataclasses.replace(lora, target_parameters=[])
    assert fit_to_budget("qwen3-30b-a3b", "24GiB", seq_len=2048, lora=attention_only).value > 1  # frozen experts: room
    with pytest.raises(Exception, match="FSDP over 2 GPUs"):
        fit_to_budget("mixtral-8x7b", "24GiB", seq_len=2048, lora=lora)


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


# ---- NF4 experts ----------------------------------------------------------------------------------

def _randomize_adapters(model, seed: int = 1) -> None:
    """Non-zero A and B everywhere (B starts at 0), so every LoRA term shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _dequantized_reference(model, reference):
    """`reference` (the model before injection) with every NF4 weight replaced by its dequantized value."""
    from qlora_lite.inject import lora_layers

    with torch.no_grad():
        for path, layer in lora_layers(model).items():
            target = reference.get_submodule(path.rpartition(".")[0]) if hasattr(layer, "num_experts") else None
            if target is not None:
                getattr(target, path.rpartition(".")[2]).copy_(layer.base_weight(torch.float32))
            else:
                reference.get_submodule(path).weight.copy_(layer.base_weight(torch.float32))
    return reference


@pytest.mark.parametrize("kind", KINDS)
def test_nf4_experts_logits_equal_a_dequantized_reference(kind):
    model = build(kind).eval()
    reference = copy.deepcopy(model)
    inject_lora(model, LoraConfig(r=4, lora_dropout=0.0, target_parameters=[]), QuantConfig())
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, LoRAExperts4bit) and experts.gate_up_proj.quantized
    _dequantized_reference(model, reference)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # and NF4 changed the experts: the reference is not the original model
    with torch.no_grad():
        assert (build(kind).eval()(ids).logits - theirs).abs().max() > 1e-3


def test_each_expert_is_bitsandbytes_nf4_of_its_own_matrix():
    import bitsandbytes.functional as bnbf

    model = build("mixtral")
    original = model.model.layers[1].mlp.experts.gate_up_proj.detach().clone()
    inject_lora(model, LoraConfig(r=4, lora_dropout=0.0), QuantConfig())
    stored = model.model.layers[1].mlp.experts.gate_up_proj.weight
    for e in range(original.shape[0]):
        packed, state = bnbf.quantize_4bit(original[e].contiguous(), blocksize=64, compress_statistics=True,
                                           quant_type="nf4")
        assert torch.equal(stored[e].packed, packed) and torch.equal(stored[e].absmax, state.absmax)
        assert torch.equal(stored[e].nested_absmax, state.state2.absmax)


def test_only_the_routed_experts_are_dequantized(monkeypatch):
    model = build("qwen3_moe").eval()
    inject_lora(model, LoraConfig(r=4, lora_dropout=0.0), QuantConfig())
    experts = model.model.layers[0].mlp.experts
    index = {id(w): e for e, w in enumerate(experts.gate_up_proj.weight)}
    dequantized, routed = set(), set()
    real = NF4Weight.dequantize
    monkeypatch.setattr(NF4Weight, "dequantize",
                        lambda self, dtype=None, out=None: (dequantized.add(index.get(id(self))),
                                                            real(self, dtype, out))[1])
    model.model.layers[0].mlp.gate.register_forward_hook(lambda m, a, out: routed.update(out[2].flatten().tolist()))
    with torch.no_grad():
        model(torch.tensor([[5, 9, 17]]))  # 3 tokens × top-2: at most 6 of the 8 experts
    assert routed and len(routed) < experts.num_experts
    assert dequantized - {None} == routed


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_routed_experts_lora_and_no_other(kind):
    model = build(kind)
    inject_lora(model, LoraConfig(r=4, lora_dropout=0.0), QuantConfig())
    _randomize_adapters(model)
    model.train()
    routed: list[torch.Tensor] = []
    model.model.layers[1].mlp.gate.register_forward_hook(lambda m, a, out: routed.append(out[2].flatten()))
    ids = torch.tensor([[3, 7, 11]])
    model(input_ids=ids, labels=ids).loss.backward()
    chosen = set(routed[0].tolist())
    experts = model.model.layers[1].mlp.experts
    assert 0 < len(chosen) < experts.num_experts
    for proj in experts.projections().values():
        r, e_count = proj.adapters["default"].r, proj.num_experts
        grad_a = proj.lora_A["default"].grad.view(e_count, r, -1)
        grad_b = proj.lora_B["default"].grad.view(-1, r, e_count)
        for e in range(e_count):
            nonzero = bool(grad_a[e].abs().sum() > 0) and bool(grad_b[:, :, e].abs().sum() > 0)
            assert nonzero == (e in chosen), (e, chosen)
    assert all(p.grad is None for n, p in model.named_parameters() if ".gate." in n)  # the router stays frozen


def test_expert_gradients_equal_the_dense_reference():
    """Output and gradients (input, every A and B) equal autograd's through W_e + s·B_e·A_e, token by token."""
    from qlora_lite.inject import make_experts_layer

    gen = torch.Generator().manual_seed(0)
    experts, hidden, inter, tokens, k = 4, 16, 12, 7, 2
    weights = {"gate_up_proj": torch.randn(experts, 2 * inter, hidden, generator=gen, dtype=torch.float64),
               "down_proj": torch.randn(experts, hidden, inter, generator=gen, dtype=torch.float64)}
    layer = make_experts_layer(weights, torch.nn.SiLU(), LoraConfig(r=2, lora_dropout=0.0),
                               {"gate_up_proj", "down_proj"})
    for proj in layer.projections().values():
        with torch.no_grad():
            proj.lora_A["default"].copy_(torch.randn(proj.lora_A["default"].shape, generator=gen))
            proj.lora_B["default"].copy_(torch.randn(proj.lora_B["default"].shape, generator=gen))
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([[0, 2], [2, 0], [2, 1], [0, 2], [1, 0], [2, 1], [0, 1]])  # expert 3 never routed
    route = torch.rand(tokens, k, generator=gen, dtype=torch.float64, requires_grad=True)
    for proj in layer.projections().values():
        proj.lora_A["default"].data = proj.lora_A["default"].data.double()
        proj.lora_B["default"].data = proj.lora_B["default"].data.double()
    ours = layer(x, index, route)
    factors = {n: (p.lora_A["default"].detach().clone().requires_grad_(),
                   p.lora_B["default"].detach().clone().requires_grad_(), p.scaling)
               for n, p in layer.projections().items()}
    # PEFT's layout, in fp64: A (E·r, in) has expert e's rows at [e·r, (e+1)·r), B (out, r·E) its columns e::E
    def delta(a, b, s):
        r = a.shape[0] // experts
        return s * torch.stack([b[:, e::experts] @ a[e * r:(e + 1) * r] for e in range(experts)])

    w = {n: weights[n] + delta(a, b, s) for n, (a, b, s) in factors.items()}
    rows = []
    for t in range(tokens):
        out = 0
        for j in range(k):
            e = int(index[t, j])
            gate, up = (x[t] @ w["gate_up_proj"][e].T).chunk(2)
            out = out + route[t, j] * ((torch.nn.functional.silu(gate) * up) @ w["down_proj"][e].T)
        rows.append(out)
    theirs = torch.stack(rows)
    torch.testing.assert_close(ours, theirs)
    grad = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    ours_factors = [p for proj in layer.projections().values() for p in (proj.lora_A["default"], proj.lora_B["default"])]
    mine = torch.autograd.grad(ours, [x, route, *ours_factors], grad)
    ref = torch.autograd.grad(theirs, [x, route, *[p for a, b, _ in factors.values() for p in (a, b)]], grad)
    for m, r in zip(mine, ref):
        torch.testing.assert_close(m, r)
    r = layer.down_proj.adapters["default"].r
    assert mine[4].view(experts, r, -1)[3].abs().sum() == 0  # the unrouted expert's A gets nothing


# ---- PEFT's parameter-target format ----------------------------------------------------------------

@pytest.mark.parametrize("kind,targets", [("mixtral", None), ("qwen3_moe", ["down_proj"])])
def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path, kind, targets):
    from peft import PeftModel
    from safetensors.torch import load_file

    from qlora_lite.adapter import save_adapter

    model = build(kind).eval()
    base = copy.deepcopy(model)
    inject_lora(model, LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, target_parameters=targets), None)
    _randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    if targets is None:
        assert config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
        # PEFT nests a wrapper per parameter: gate_up_proj (registered first) innermost
        assert keys["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (4 * 4, 64)
        assert keys["base_model.model.model.layers.0.mlp.experts.lora_B.weight"].shape == (64, 4 * 4)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids).logits, peft_model(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), peft_model.disable_adapter():
        assert (peft_model(ids).logits - theirs).abs().max() > 1e-3  # the expert adapters do change the logits


@pytest.mark.parametrize("kind", KINDS)
def test_peft_adapter_loads_in_ours_with_the_same_logits(tmp_path, kind):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    from qlora_lite.adapter import load_adapter, set_adapter

    base = build(kind).eval()
    ours = copy.deepcopy(base)
    peft_model = get_peft_model(base, PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    _randomize_adapters(peft_model, seed=3)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    lora = LoraConfig(r=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    inject_lora(ours, lora, None)
    with pytest.raises(Exception, match="needs target_parameters covering"):  # built without expert adapters
        load_adapter(ours, tmp_path / "peft", name="peft")
    ours = copy.deepcopy(build(kind).eval())
    inject_lora(ours, LoraConfig(r=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                 target_parameters=["gate_up_proj", "down_proj"]), None)
    load_adapter(ours, tmp_path / "peft", name="peft")
    set_adapter(ours, "peft")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, peft_model.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_wrong_expert_count_is_refused(tmp_path):
    from qlora_lite.adapter import load_adapter, save_adapter
    from qlora_lite.errors import CheckpointError

    small = build("mixtral")
    inject_lora(small, LoraConfig(r=4, lora_dropout=0.0), None)
    save_adapter(small, tmp_path / "adapter")
    other = build("mixtral", num_local_experts=8)
    inject_lora(other, LoraConfig(r=4, lora_dropout=0.0), None)
    with pytest.raises(CheckpointError, match="adapted for 4 experts but the model's layer has 8"):
        load_adapter(other, tmp_path / "adapter", name="x")


def test_expert_lora_refuses_dropout_and_dora_in_one_line():
    for lora, words in ((LoraConfig(r=4), "lora_dropout=0.05: LoRA on experts takes no dropout"),
                        (LoraConfig(r=4, lora_dropout=0.0, use_dora=True), "use_dora is not available on experts")):
        with pytest.raises(ConfigError, match=words) as info:
            inject_lora(build("mixtral"), lora, QuantConfig())
        assert len(info.value.problems) == 1
    inject_lora(build("mixtral"), LoraConfig(r=4, target_parameters=[]), QuantConfig())  # experts NF4, unadapted
    with pytest.raises(ConfigError, match="match no expert projection"):
        inject_lora(build("mixtral"), LoraConfig(r=4, lora_dropout=0.0, target_parameters=["w1"]), QuantConfig())


# ---- loading from a checkpoint (per-expert tensors) and merging --------------------------------------

@pytest.fixture(scope="module", params=KINDS)
def moe_dir(request, tmp_path_factory):
    """A tiny MoE model saved by transformers: per-expert tensors (Mixtral's w1/w3/w2, Qwen's gate/up/down_proj)."""
    directory = tmp_path_factory.mktemp(request.param) / "model"
    build(request.param).save_pretrained(str(directory))
    return request.param, directory


def test_load_model_quantizes_each_expert_as_inject_does(moe_dir):
    from qlora_lite.load import load_model

    kind, directory = moe_dir
    lora = LoraConfig(r=4, lora_dropout=0.0)
    loaded, _ = load_model(directory, QuantConfig(), lora, device="cpu", compute_dtype=torch.float32,
                           with_tokenizer=False)
    memory = build(kind)
    inject_lora(memory, lora, QuantConfig())
    for name, weight in memory.named_modules():
        if isinstance(weight, NF4Weight):
            other = loaded.get_submodule(name)
            assert torch.equal(other.packed, weight.packed) and torch.equal(other.absmax, weight.absmax), name
    with torch.no_grad():
        for name, p in loaded.named_parameters():
            if ".lora_" in name:
                p.copy_(memory.get_parameter(name))
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, memory.eval()(ids).logits, rtol=0, atol=0)
    assert count_parameters(loaded).quantized == count_parameters(memory).quantized


def test_merge_writes_dequantized_experts_plus_their_delta(moe_dir, tmp_path):
    from safetensors.torch import load_file

    from qlora_lite.adapter import save_adapter
    from qlora_lite.inject import lora_layers
    from qlora_lite.load import load_model
    from qlora_lite.merge import merge

    kind, directory = moe_dir
    model, _ = load_model(directory, QuantConfig(), LoraConfig(r=4, lora_dropout=0.0), device="cpu",
                          compute_dtype=torch.float32, with_tokenizer=False)
    _randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    report = merge(directory, tmp_path / "adapter", tmp_path / "merged", dtype="float32", verify=True, progress=False)
    assert report.verification["max_abs_logit_diff"] < 1e-4
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    experts = lora_layers(model)["model.layers.1.mlp.experts.gate_up_proj"]
    down = lora_layers(model)["model.layers.1.mlp.experts.down_proj"]
    want_gate_up, want_down = experts.merged_weight()[2], down.merged_weight()[2]  # expert 2: W0 dequantized + s·B·A
    names = (("block_sparse_moe.experts.2.w1", "block_sparse_moe.experts.2.w3", "block_sparse_moe.experts.2.w2")
             if kind == "mixtral" else ("mlp.experts.2.gate_proj", "mlp.experts.2.up_proj", "mlp.experts.2.down_proj"))
    got = [merged[f"model.layers.1.{n}.weight"] for n in names]
    torch.testing.assert_close(torch.cat(got[:2]), want_gate_up, rtol=0, atol=1e-6)
    torch.testing.assert_close(got[2], want_down, rtol=0, atol=1e-6)


def test_merge_onto_the_original_experts_verifies(moe_dir, tmp_path):
    """A 16-bit LoRA run (quant=None) merges onto W0 itself; verify rebuilds W0 + adapter with 16-bit experts."""
    from qlora_lite.adapter import save_adapter
    from qlora_lite.load import load_model
    from qlora_lite.merge import merge

    kind, directory = moe_dir
    model, _ = load_model(directory, None, LoraConfig(r=4, lora_dropout=0.0, target_parameters=["down_proj"]),
                          device="cpu", compute_dtype=torch.float32, with_tokenizer=False)
    _randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    report = merge(directory, tmp_path / "adapter", tmp_path / "merged", dtype="float32", base="original",
                   verify=True, progress=False)
    assert report.verification["max_abs_logit_diff"] < 1e-4


def test_training_a_tiny_moe_lowers_the_loss_and_moves_only_lora(memorize_data, tmp_path):
    """train() end to end on a Qwen3-MoE directory: NF4 experts, LoRA on attention and experts."""
    from conftest import MEMORIZE, write_tiny_tokenizer
    from transformers import AutoTokenizer

    from qlora_lite.adapter import read_adapter
    from qlora_lite.config import TrainConfig
    from qlora_lite.inject import lora_layers
    from qlora_lite.load import load_model
    from qlora_lite.train import train

    directory = tmp_path / "model"
    write_tiny_tokenizer(directory, [m["content"] for r in MEMORIZE for m in r["messages"]])
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = build("qwen3_moe", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(str(directory))
    lora = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0)
    cfg = TrainConfig(model=str(directory), data=str(memorize_data), out_dir=str(tmp_path / "run"), seq_len=64,
                      batch_size=4, max_steps=30, learning_rate=5e-3, warmup_steps=2, eval_fraction=0.1,
                      eval_every=30, save_every=30, progress=False, device="cpu", lora=lora,
                      quant=QuantConfig(backend="torch"))
    torch.manual_seed(cfg.seed)
    loaded = load_model(directory, cfg.quant, lora, device="cpu")
    frozen = {name: {k: v.clone() for k, v in layer.weight.state_dict().items()}
              for name, layer in lora_layers(loaded[0]).items()}
    result = train(cfg, loaded=loaded)
    assert sum(result.losses[-3:]) / 3 < 0.8 * sum(result.losses[:3]) / 3
    adapter = read_adapter(result.adapter_dir)
    layers = lora_layers(loaded[0])
    assert any(n.endswith("experts.down_proj") for n in adapter.modules)
    for name, layer in layers.items():
        assert all(torch.equal(v, layer.weight.state_dict()[k]) for k, v in frozen[name].items()), name
    moved = adapter.lora_B["model.layers.0.mlp.experts.down_proj"].view(64, 4, 8).abs().sum(dim=(0, 1))
    assert (moved > 0).sum() >= 2  # the experts the data routed to trained


def test_memory_command_plans_a_moe_run_without_dropout():
    """`qlora-lite memory` plans dropout 0.05 by default; a MoE run with expert adapters cannot have any."""
    from qlora_lite.memory_fit import memory_report

    text = memory_report("qwen3-30b-a3b", seq_len=2048, gpu="RTX4090")
    assert "dropout 0.0" in text and "fits RTX4090" in text and "largest seq_len at batch_size 1: 3392" in text


def test_offload_base_moves_every_expert_and_gives_the_plain_run():
    """offload_base (issue 18) keeps each layer's NF4 experts in host memory too; the planner counts them."""
    from qlora_lite.offload import install_base_offload
    from qlora_lite.train import enable_checkpointing

    def model_and_step():
        model = build("mixtral")
        inject_lora(model, LoraConfig(r=4, lora_dropout=0.0, init_lora_weights="gaussian"), QuantConfig())
        enable_checkpointing(model)
        model.train()
        return model

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))

    def step(model):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = step(model_and_step())
    model = model_and_step()
    offloader = install_base_offload(model, "cpu")
    layer_nf4 = sum(w.nbytes for layer in model.model.layers for w in layer.modules() if isinstance(w, NF4Weight))
    assert offloader.host_bytes == layer_nf4
    loss, grads = step(model)
    assert loss == plain_loss and all(torch.equal(grads[n], plain_grads[n]) for n in plain_grads)
    est = estimate_memory(model.config, seq_len=16, batch_size=2, lora=LoraConfig(r=4, lora_dropout=0.0),
                          compute_dtype="float32", offload_base=True)
    assert est.pinned_host_bytes == layer_nf4  # every expert of every layer, not only the linears


def test_analyze_counts_every_expert_and_analyses_the_linears(tmp_path):
    from qlora_lite.adapter import save_adapter
    from qlora_lite.analysis import analyze

    model = build("mixtral")
    inject_lora(model, LoraConfig(r=4, lora_dropout=0.0), None)
    _randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    report = analyze(tmp_path / "adapter", out_dir=tmp_path / "analysis", plots=False)
    experts = 2 * 4 * (192 * 64 + 64 * 96)  # 2 layers × 4 experts × (gate_up + down)
    linears = 2 * (64 * 64 * 2 + 32 * 64 * 2)  # q, o, k, v
    assert report.accounting.adapted_base_params == experts + linears
    assert {m.kind for m in report.modules} == {"q_proj", "k_proj", "v_proj", "o_proj"}
