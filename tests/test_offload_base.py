"""offload_base on CPU: the NF4 base of every decoder layer lives in a host buffer and is copied in layer by
layer (forward, then again for the backward's recompute); the losses and every LoRA gradient equal the plain
run, only the layer computing points at a copy, and the planner's terms equal the instantiated model's bytes."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from qlora_lite.config import LoraConfig, QuantConfig, TrainConfig
from qlora_lite.errors import ConfigError, TrainingError
from qlora_lite.memory import MemoryBudgetError, estimate_memory, parse_budget
from qlora_lite.memory_fit import fit_to_budget, memory_report
from qlora_lite.nf4 import NF4Weight
from qlora_lite.offload import BaseOffloader, install_base_offload

from conftest import loss_and_grads as _step, tiny_lora_llama, tiny_llama_config

LAYERS = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def _model(lora: LoraConfig, checkpointing: bool = True) -> LlamaForCausalLM:
    return tiny_lora_llama(tiny_llama_config(num_hidden_layers=LAYERS), lora, QuantConfig(backend="torch"),
                           checkpointing)


def _layer_nf4_bytes(model) -> list[int]:
    """Each decoder layer's NF4 bytes, counted from the modules themselves (NF4Weight.nbytes)."""
    return [sum(m.nbytes for m in layer.modules() if isinstance(m, NF4Weight)) for layer in model.model.layers]


def _on_host(offloader: BaseOffloader) -> list[bool]:
    """Per layer: whether every registered NF4 tensor is a view of that layer's host buffer."""
    out = []
    for entry in offloader.layers:
        start, end = entry.host.data_ptr(), entry.host.data_ptr() + entry.host.nbytes
        out.append(all(start <= getattr(m, name).data_ptr() < end for m, name, _ in entry.slots))
    return out


@pytest.mark.parametrize("lora", [LoraConfig(r=4, lora_dropout=0.1, init_lora_weights="gaussian"),
                                  LoraConfig(r=4, use_dora=True, init_lora_weights="gaussian")],
                         ids=["lora-dropout", "dora"])
def test_offloaded_base_gives_the_plain_run_exactly(lora):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    plain = _model(lora)
    plain_steps = [_step(plain, ids) for _ in range(2)]
    model = _model(lora)
    offloader = install_base_offload(model, "cpu")
    per_layer = _layer_nf4_bytes(model)
    assert offloader.host_bytes == sum(per_layer) > 0
    for step, (plain_loss, plain_grads) in enumerate(plain_steps, start=1):
        loss, grads = _step(model, ids)
        assert loss == plain_loss
        assert grads.keys() == plain_grads.keys() and all(torch.equal(grads[n], plain_grads[n]) for n in grads)
        # every layer's base came in twice per step (forward + the backward's recompute), and went again
        assert offloader.fetched_bytes == step * 2 * sum(per_layer)
        assert offloader.resident_bytes == 0 and all(_on_host(offloader))
    assert offloader.peak_resident_bytes == 2 * max(per_layer)


def test_only_the_computing_layer_points_at_a_device_copy(monkeypatch):
    """Forward (layer k's pre-hook) and backward (layer k's recompute): layer k's tensors point at its copy,
    every other layer's at the host; at most k and the one prefetched are copied."""
    model = _model(LoraConfig(r=4))
    offloader = install_base_offload(model, "cpu")
    one_layer = _layer_nf4_bytes(model)[0]
    seen = []

    def record(phase, index):
        seen.append((phase, index, _on_host(offloader), offloader.resident_bytes))

    for index, layer in enumerate(model.model.layers):  # registered after the offloader's: runs after it
        layer.register_forward_pre_hook(lambda _m, _a, _i=index: record("forward", _i))
    real = offloader.before_recompute
    monkeypatch.setattr(offloader, "before_recompute", lambda i: (real(i), record("backward", i)))
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    _step(model, ids)
    assert [(p, i) for p, i, _, _ in seen] == [("forward", 0), ("forward", 1), ("forward", 2),
                                             ("backward", 2), ("backward", 1), ("backward", 0)]
    for phase, index, on_host, resident in seen:
        assert on_host == [j != index for j in range(LAYERS)], (phase, index)
        neighbour = index + 1 if phase == "forward" else index - 1
        assert resident == one_layer * (2 if 0 <= neighbour < LAYERS else 1), (phase, index)
    assert offloader.resident_bytes == 0


def test_install_leaves_only_the_layers_nf4_on_the_host():
    """Everything else (embeddings, norms, head, LoRA, rotary buffers) goes to the compute device ("meta" here:
    any device other than the host shows the placement)."""
    model = _model(LoraConfig(r=4))
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)], list(model.state_dict())
    offloader = install_base_offload(model, "meta")
    assert ([n for n, _ in model.named_parameters(remove_duplicate=False)], list(model.state_dict())) == names
    offloaded = {id(getattr(m, name)) for entry in offloader.layers for m, name, _ in entry.slots}
    tensors = [*model.named_parameters(), *model.named_buffers()]
    assert len(offloaded) == 4 * 7 * LAYERS  # packed, block scales, nested scales, offset of 7 linears a layer
    for name, tensor in tensors:
        assert tensor.device.type == ("cpu" if id(tensor) in offloaded else "meta"), name
    assert any(".lora_A." in n for n, t in tensors if t.device.type == "meta")


def test_evaluation_without_grad_fetches_each_layer_once():
    model = _model(LoraConfig(r=4))
    offloader = install_base_offload(model, "cpu")
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 8, dtype=torch.long))
    assert offloader.fetched_bytes == sum(_layer_nf4_bytes(model)) and offloader.resident_bytes == 0


def test_offload_base_needs_checkpointing_and_an_nf4_base():
    with pytest.raises(TrainingError, match="gradient_checkpointing: true"):
        install_base_offload(_model(LoraConfig(r=4), checkpointing=False), "cpu")
    for bad, words in [(dict(gradient_checkpointing=False), "gradient_checkpointing"), (dict(fsdp=True), "fsdp"),
                       (dict(quant=None), "quant"), (dict(compile=True), "compile"),
                       (dict(offload_base="yes"), "true or false")]:
        with pytest.raises(ConfigError, match=words):
            TrainConfig(offload_base=True, **bad) if "offload_base" not in bad else TrainConfig(**bad)


def test_training_run_with_offload_base_gives_the_plain_losses_and_resumes(tiny_model_dir, memorize_data, tmp_path,
                                                                          monkeypatch):
    """The recipe wires the option (an evaluation included); a run stopped after its checkpoint resumes with
    the base offloaded again and ends where the uninterrupted plain run ends."""
    from qlora_lite.adapter import read_adapter
    from qlora_lite.train import TrainingRun, train

    def cfg(name, **kw):
        return TrainConfig(model=str(tiny_model_dir), data=str(memorize_data), out_dir=str(tmp_path / name),
                           seq_len=64, batch_size=4, max_steps=4, warmup_steps=1, eval_fraction=0.1, eval_every=2,
                           save_every=2, progress=False, device="cpu", lora=LoraConfig(r=4, lora_dropout=0.1),
                           quant=QuantConfig(backend="torch"), **kw)

    plain = train(cfg("plain"), log=lambda m: None)
    offloaders = []
    real_setup, real_save = TrainingRun.setup_optimizer, TrainingRun.save_checkpoint

    def spy(run):
        real_setup(run)
        offloaders.append(run.base_offloader)

    def save_then_crash(run, step):
        real_save(run, step)
        raise KeyboardInterrupt  # the process dies right after the step-2 checkpoint

    from accelerate import Accelerator

    placements, real_prepare = [], Accelerator.prepare
    monkeypatch.setattr(Accelerator, "prepare", lambda self, *objects, device_placement=None: (
        placements.append(device_placement), real_prepare(self, *objects, device_placement=device_placement))[1])
    monkeypatch.setattr(TrainingRun, "setup_optimizer", spy)
    monkeypatch.setattr(TrainingRun, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(cfg("offload", offload_base=True), log=lambda m: None)
    monkeypatch.setattr(TrainingRun, "save_checkpoint", real_save)
    resumed = train(cfg("offload", offload_base=True, resume=True), log=lambda m: None)
    assert resumed.steps == 4 and len(offloaders) == 2
    assert placements == [[False, True]] * 2  # accelerate must not move the host base to the device
    assert all(o.fetched_bytes > 0 and o.resident_bytes == 0 for o in offloaders)
    assert resumed.losses == pytest.approx(plain.losses, rel=1e-5)
    assert [s for s, _ in resumed.eval_losses] == [s for s, _ in plain.eval_losses] == [0, 2, 4]
    assert [v for _, v in resumed.eval_losses] == pytest.approx([v for _, v in plain.eval_losses], rel=1e-5)
    a, b = read_adapter(plain.adapter_dir), read_adapter(resumed.adapter_dir)
    for module in a.modules:
        torch.testing.assert_close(a.lora_A[module], b.lora_A[module], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a.lora_B[module], b.lora_B[module], atol=1e-6, rtol=1e-5)


# ---- the planner ----------------------------------------------------------------------------------------

def test_planner_host_and_gpu_terms_equal_the_instantiated_models_bytes():
    lora = LoraConfig(r=4)
    model = _model(lora)
    offloader = install_base_offload(model, "cpu")
    per_layer = _layer_nf4_bytes(model)
    cfg = tiny_llama_config(num_hidden_layers=LAYERS)
    kwargs = dict(seq_len=32, batch_size=1, lora=lora, compute_dtype="float32", device="cuda", link_gbps=10)
    plain = estimate_memory(cfg, **kwargs)
    est = estimate_memory(cfg, offload_base=True, **kwargs)
    assert est.pinned_host_bytes == offloader.host_bytes == sum(per_layer) == plain.quantized_weights
    assert est.quantized_weights == 2 * max(per_layer)  # the layer computing + the one in flight
    assert est.transfer_bytes == 2 * sum(per_layer) and est.transfer_seconds == pytest.approx(2 * sum(per_layer) / 1e10)
    # everything else on the GPU is as without the option
    for field in ("weights_16bit", "lora_params", "lora_grads", "optimizer_states", "activations", "logits"):
        assert getattr(est, field) == getattr(plain, field), field
    assert est.total_bytes < plain.total_bytes
    one = estimate_memory(tiny_llama_config(num_hidden_layers=1), offload_base=True, **kwargs)
    assert one.quantized_weights == max(per_layer)  # a single layer: nothing to prefetch
    with pytest.raises(ConfigError, match="offload_base"):
        estimate_memory(cfg, offload_base=True, **{**kwargs, "gradient_checkpointing": False})


def test_llama2_70b_on_an_rtx4090_with_the_base_in_host_memory():
    with pytest.raises(MemoryBudgetError, match="offload_base: true"):
        fit_to_budget("llama-2-70b", "RTX4090", seq_len=2048)
    fit = fit_to_budget("llama-2-70b", "RTX4090", seq_len=2048, offload_base=True)
    assert fit.value >= 1 and fit.estimate.required_bytes <= parse_budget("RTX4090")
    est = fit.estimate
    assert 32 * 2**30 < est.pinned_host_bytes < 34 * 2**30  # 80 layers × 7 linears at 4.127 bits
    assert est.quantized_weights == 2 * est.pinned_host_bytes // 80
    report = memory_report("llama-2-70b", seq_len=2048, gpu="RTX4090", offload_base=True)
    assert "fits RTX4090" in report and "GiB of NF4 layers in pinned host memory" in report
    assert "host<->GPU" in report and "at 25 GB/s" in report


@pytest.mark.gpu
def test_on_cuda_the_base_is_pinned_fetched_on_a_side_stream_and_gives_the_plain_run():
    """The CUDA path (page-locked host buffers, copies on the side stream, events): the same loss and LoRA
    gradients as the model held on the GPU, and between steps no layer's base on the GPU."""
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(3)).cuda()
    lora = LoraConfig(r=4, init_lora_weights="gaussian")
    plain_loss, plain_grads = _step(_model(lora).cuda(), ids)
    model = _model(lora)
    offloader = install_base_offload(model, "cuda")
    assert offloader.stream is not None and all(entry.host.is_pinned() for entry in offloader.layers)
    assert all(p.is_cuda for n, p in model.named_parameters() if p.requires_grad)
    loss, grads = _step(model, ids)
    torch.cuda.synchronize()
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], msg=name)
    assert offloader.fetched_bytes == 2 * offloader.host_bytes and offloader.resident_bytes == 0
    assert all(_on_host(offloader))
