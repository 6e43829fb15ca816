"""Chunked cross-entropy through the LM head equals transformers' loss and its gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from qlora_lite.config import LoraConfig, QuantConfig
from qlora_lite.inject import inject_lora, lora_layers
from qlora_lite.loss import chunked_cross_entropy, chunked_loss, install_chunked_loss, supports_chunked_loss
from conftest import tiny_llama_config


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_loss_and_hidden_gradient_equal_the_full_logits(dtype, tol, chunk):
    torch.manual_seed(0)
    hidden = torch.randn(50, 32, dtype=dtype, requires_grad=True)
    weight = torch.randn(300, 32, dtype=dtype) / 4
    labels = torch.randint(0, 300, (50,))
    labels[::5] = -100
    want = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight).float(), labels)
    (want_grad,) = torch.autograd.grad(want, hidden)
    got = chunked_cross_entropy(hidden, weight, labels, chunk)
    (got_grad,) = torch.autograd.grad(got * 3.0, hidden)  # the incoming gradient scales it
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad, 3.0 * want_grad, atol=tol * want_grad.abs().max().item(), rtol=tol)


def test_bad_use_is_refused():
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        chunked_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([1, 2]), 0)
    with pytest.raises(ValueError, match="freeze it"):
        chunked_cross_entropy(torch.randn(2, 4), torch.randn(5, 4, requires_grad=True), torch.tensor([1, 2]))


def _tiny_qlora(**overrides):
    torch.manual_seed(0)
    cfg = tiny_llama_config(**({"intermediate_size": 96, "vocab_size": 500, "tie_word_embeddings": False} | overrides))
    model = LlamaForCausalLM(cfg)
    inject_lora(model, LoraConfig(r=4, lora_dropout=0.0), QuantConfig(backend="torch"))
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B["default"], std=0.02)
    return model


def test_installed_loss_equals_the_model_loss_and_lora_gradients():
    model = _tiny_qlora()
    ids = torch.randint(0, 500, (3, 40))
    labels = ids.clone()
    labels[:, :10] = -100  # a masked prompt
    want = model(input_ids=ids, labels=labels).loss
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    assert supports_chunked_loss(model) is None and install_chunked_loss(model, chunk_tokens=16)
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    torch.testing.assert_close(out.loss, want, atol=1e-6, rtol=1e-6)
    for name, grad in want_grads.items():
        got = dict(model.named_parameters())[name].grad
        torch.testing.assert_close(got, grad, atol=1e-6 * max(1.0, grad.abs().max().item()), rtol=1e-4)
    logits = model(input_ids=ids).logits  # without labels: the model's own forward, logits as before
    assert logits.shape == (3, 40, 500)


def test_models_with_transformed_logits_keep_their_own_loss():
    model = _tiny_qlora()
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in supports_chunked_loss(model)
    assert not install_chunked_loss(model)
    assert "forward" not in vars(model)


def test_the_chunked_loss_ends_with_its_scope():
    """Installed for a block (as training does), the model's own loss and logits come back after it."""
    model = _tiny_qlora()
    ids = torch.randint(0, 500, (2, 24))
    with torch.no_grad():
        want = model(input_ids=ids, labels=ids)
        with chunked_loss(model, chunk_tokens=16) as handle:
            assert handle is not None and model(input_ids=ids, labels=ids).logits is None
        got = model(input_ids=ids, labels=ids)
    assert "forward" not in vars(model)
    torch.testing.assert_close(got.logits, want.logits, atol=0, rtol=0)
    handle = install_chunked_loss(model, chunk_tokens=16)
    handle.remove()
    handle.remove()  # a second removal changes nothing
    assert "forward" not in vars(model)


@pytest.mark.gpu
def test_cuda_bf16_chunked_loss_matches_the_model_loss():
    model = _tiny_qlora().cuda().to(torch.bfloat16)
    ids = torch.randint(0, 500, (2, 64), device="cuda")
    want = model(input_ids=ids, labels=ids).loss
    want.backward()
    want_grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    assert install_chunked_loss(model, chunk_tokens=32)
    got = model(input_ids=ids, labels=ids).loss
    got.backward()
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    for name, grad in want_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad.float(), grad,
                                   atol=5e-2 * grad.abs().max().item(), rtol=5e-2)


@pytest.mark.parametrize("chunked", [False, True])
def test_evaluate_is_the_token_mean_over_the_whole_set(chunked):
    """evaluate() sums token losses over batches of unequal, padded, prompt-masked examples, through the
    model's own loss call (the chunked one where installed): equal to one cross-entropy over all tokens."""
    from qlora_lite.train import evaluate

    model = _tiny_qlora()
    generator = torch.Generator().manual_seed(1)
    examples = []
    for n, prompt in [(12, 4), (30, 10), (7, 7), (21, 0), (16, 15)]:  # one example is all prompt
        ids = torch.randint(1, 500, (n,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    with torch.no_grad():
        total = count = 0.0
        for ex in examples:
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(ex["labels"][1:])
            total += torch.nn.functional.cross_entropy(logits, labels, reduction="sum", ignore_index=-100).item()
            count += int((labels != -100).sum())
    if chunked:
        assert install_chunked_loss(model, chunk_tokens=8)
    got = evaluate(model, examples, batch_size=2, pad_token_id=0, device="cpu")
    assert got == pytest.approx(total / count, rel=1e-6)
