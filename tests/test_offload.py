"""Long context on CPU: offloaded block inputs and the tiled MLP give the plain run's losses and gradients,
the offloader holds exactly the checkpointed inputs, and the training recipe wires both options."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlora_lite.config import LoraConfig, QuantConfig, TrainConfig
from qlora_lite.errors import ConfigError, TrainingError
from qlora_lite.offload import ActivationOffloader, install_activation_offload, install_tiled_mlp

from conftest import TINY, loss_and_grads as _step, tiny_lora_llama


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def _model(dropout: float = 0.0, layers: int = 3, checkpointing: bool = True) -> LlamaForCausalLM:
    return tiny_lora_llama(LlamaConfig(**{**TINY, "num_hidden_layers": layers, "vocab_size": 128}),
                           LoraConfig(r=4, lora_dropout=dropout, init_lora_weights="gaussian"), checkpointing=checkpointing)


def test_offloaded_block_inputs_give_the_plain_run_exactly():
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1))
    plain_loss, plain_grads = _step(_model(dropout=0.1), ids)
    model = _model(dropout=0.1)
    offloader = install_activation_offload(model, "cpu")
    packed = []
    original_pack = offloader.pack
    offloader.pack = lambda t: packed.append(t) or original_pack(t)
    loss, grads = _step(model, ids)
    assert loss == plain_loss
    assert grads.keys() == plain_grads.keys() and all(torch.equal(grads[n], plain_grads[n]) for n in grads)
    # what moved: each of the 3 blocks' input (batch × seq × hidden fp32), nothing from inside a block
    assert [tuple(t.shape) for t in packed] == [(2, 48, 64)] * 3
    assert offloader.peak_host_bytes == 3 * 2 * 48 * 64 * 4
    assert offloader.host_bytes == 0  # the graph freed, the host copies went with it
    assert offloader.offloaded_bytes == offloader.fetched_bytes == 0  # on CPU nothing is transferred


def test_offload_unpacks_the_host_copy():
    """The unpacked tensor is the host copy, not the original: a wrong copy would change the gradients."""
    ids = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(2))
    plain_loss, plain_grads = _step(_model(), ids)
    model = _model()
    offloader = install_activation_offload(model, "cpu")
    offloader.unpack = lambda saved: saved.host.mul(0.5) if hasattr(saved, "host") else saved  # corrupt it
    loss, grads = _step(model, ids)
    assert loss == plain_loss  # forward unchanged
    assert not all(torch.equal(grads[n], plain_grads[n]) for n in grads)


def test_offload_needs_checkpointed_blocks():
    with pytest.raises(TrainingError, match="gradient_checkpointing: true"):
        install_activation_offload(_model(checkpointing=False), "cpu")
    with pytest.raises(ConfigError, match="offload_activations"):
        TrainConfig(offload_activations=True, gradient_checkpointing=False)
    with pytest.raises(ConfigError, match="mlp_chunk_tokens"):
        TrainConfig(mlp_chunk_tokens=-1)


@pytest.mark.parametrize("checkpointing,batch", [(True, 1), (False, 2)])
def test_tiled_mlp_equals_the_untiled_forward_and_every_gradient(checkpointing, batch):
    ids = torch.randint(0, 128, (batch, 40), generator=torch.Generator().manual_seed(3))
    plain_loss, plain_grads = _step(_model(checkpointing=checkpointing), ids)
    model = _model(checkpointing=checkpointing)
    assert install_tiled_mlp(model, 16) == 3  # 40 tokens: chunks of 16, 16, 8
    calls = []
    model.model.layers[0].mlp.gate_proj.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[-2]))
    loss, grads = _step(model, ids)
    assert 16 in calls and 8 in calls and 40 not in calls  # it did run in chunks
    assert loss == pytest.approx(plain_loss, rel=1e-6, abs=0)
    assert grads.keys() == plain_grads.keys()
    for name in grads:  # fp32; the chunked sums over tokens round differently, at the last bits only
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(".mlp." in n for n in grads)


def test_tiled_mlp_with_offload_equals_the_plain_run():
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    plain_loss, plain_grads = _step(_model(), ids)
    model = _model()
    install_tiled_mlp(model, 16)
    install_activation_offload(model, "cpu")
    loss, grads = _step(model, ids)
    assert loss == pytest.approx(plain_loss, rel=1e-6, abs=0)
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_tiled_mlp_keeps_names_and_refuses_nonsense():
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    install_tiled_mlp(model, 8)
    assert [n for n, _ in model.named_parameters()] == names
    with pytest.raises(TrainingError, match="positive integer"):
        install_tiled_mlp(model, 0)
    with pytest.raises(TrainingError, match="no decoder blocks"):
        install_tiled_mlp(torch.nn.Sequential(torch.nn.Linear(2, 2)), 8)


def test_offloader_leaves_other_devices_alone():
    offloader = ActivationOffloader("cpu")
    meta = torch.empty(3, device="meta")
    assert offloader.pack(meta) is meta and offloader.unpack(meta) is meta


def test_training_run_with_offload_gives_the_plain_losses(tiny_model_dir, memorize_data, tmp_path):
    """The options reach the recipe: offload alone gives the same losses bit for bit; with the tiled MLP
    too, the same to rounding (no dropout: a tiled MLP draws its masks per chunk)."""
    from qlora_lite.train import TrainingRun, train

    def run(name, **kw):
        cfg = TrainConfig(model=str(tiny_model_dir), data=str(memorize_data), out_dir=str(tmp_path / name), seq_len=64,
                          batch_size=4, max_steps=3, warmup_steps=1, eval_fraction=0.0, save_every=3, progress=False,
                          device="cpu", lora=LoraConfig(r=4, lora_dropout=0.0), quant=QuantConfig(backend="torch"), **kw)
        return train(cfg, log=lambda m: None).losses

    installed = []
    real = TrainingRun.setup_optimizer

    def spy(self):
        real(self)
        installed.append(getattr(self, "offloader", None))

    plain = run("plain")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TrainingRun, "setup_optimizer", spy)
        offloaded = run("offload", offload_activations=True)
        both = run("both", offload_activations=True, mlp_chunk_tokens=16)
    assert offloaded == plain
    assert both == pytest.approx(plain, rel=1e-5)
    assert all(isinstance(o, ActivationOffloader) and o.peak_host_bytes > 0 for o in installed)
