"""Causal-LM cross-entropy through the LM head without the full logits.

    hidden (tokens × h) ──► chunks of C tokens:  logits_c = h_c·Wᵀ ─► fp32 ─► loss_c
                                                 grad_h_c = (softmax(logits_c) − onehot)·W / n_valid
    forward keeps grad_h (one hidden state's size) and frees each chunk's logits; backward scales it.

The usual path materialises the logits in the compute dtype, their fp32 copy, and both gradients:
~12 bytes × tokens × vocab, the largest activation of a step for 32k–150k vocabularies (1.5 GiB at
Llama-2-7B, 2048 tokens; 6.1 GiB at Llama-3's 128k vocab). Here the peak is one fp32 chunk,
4 bytes × C × vocab (+ its compute-dtype copy in bf16/fp16), and the hidden state's gradient.
The LM head is frozen in QLoRA, so only the hidden state needs a gradient, and it is computed in
the forward pass (the loss is a scalar at the end of the graph, so nothing is lost by doing it early).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["chunked_cross_entropy", "ChunkedLoss", "install_chunked_loss", "chunked_loss", "supports_chunked_loss"]

IGNORE_INDEX = -100


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens):
        valid_total = (labels != IGNORE_INDEX).sum()
        denom = valid_total.clamp(min=1).float()
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            h, y = hidden[start:start + chunk_tokens], labels[start:start + chunk_tokens]
            logits = torch.nn.functional.linear(h, weight).float()  # as transformers: matmul in compute dtype
            valid = y != IGNORE_INDEX
            target = y.clamp(min=0).unsqueeze(1)
            target_logit = logits.gather(1, target).squeeze(1)
            # log-sum-exp and softmax in place: one (chunk × vocab) fp32 buffer, no temporaries of its size
            row_max = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(row_max).exp_()
            sum_exp = probs.sum(dim=-1, keepdim=True)
            lse = (row_max + sum_exp.log()).squeeze(1)
            loss += ((lse - target_logit) * valid).sum()
            if grad_hidden is not None:
                probs.div_(sum_exp)
                probs.scatter_add_(1, target, -valid.unsqueeze(1).float())  # softmax − onehot
                probs.mul_((valid.float() / denom).unsqueeze(1))
                grad_hidden[start:start + chunk_tokens] = probs.to(weight.dtype) @ weight
            del logits, probs
        ctx.save_for_backward(grad_hidden)
        return loss / denom

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        grad = None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype)
        return grad, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_tokens: int = 1024) -> torch.Tensor:
    """Mean cross-entropy of `hidden·weightᵀ` against `labels` (-100 ignored), `chunk_tokens` rows at a time.

    `hidden` is (tokens, h), `labels` (tokens,); equals `F.cross_entropy(F.linear(hidden, weight).float(),
    labels)` and its gradient with respect to `hidden`. `weight` receives no gradient.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be positive")
    if weight.requires_grad:
        raise ValueError("chunked_cross_entropy computes no gradient for the head weight; freeze it "
                         "(QLoRA does) or use the model's own loss")
    return _ChunkedHeadCrossEntropy.apply(hidden, weight, labels, chunk_tokens)


def supports_chunked_loss(model: nn.Module) -> str | None:
    """None if the model's logits are plain `lm_head(hidden)`, else why not (then its own loss is used)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return "its output layer is not a bias-free nn.Linear"
    if head.weight.requires_grad:
        return "its output layer is trained"
    config = getattr(model, "config", None)
    for attribute in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, attribute, None) not in (None, 1, 1.0):
            return f"its logits are transformed ({attribute})"
    return None


class ChunkedLoss:
    """The chunked loss installed on one model; `remove()` (or leaving a `with` block) restores it.

    The override is on the instance's `forward`, so DDP and FSDP wrappers (which call the module)
    and their hooks see it; whatever `forward` the instance had before is put back on removal.
    """

    def __init__(self, model: nn.Module, chunk_tokens: int):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        self.model = model
        self._previous = vars(model).get("forward")  # an instance-level forward someone else set, if any
        original, decoder, head = model.forward, model.get_decoder(), model.get_output_embeddings()

        def forward(input_ids=None, attention_mask=None, labels=None, **kwargs):
            if labels is None:
                return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
            loss = chunked_cross_entropy(hidden[:, :-1].flatten(0, 1), head.weight,
                                         labels[:, 1:].flatten().to(hidden.device), chunk_tokens)
            return CausalLMOutputWithPast(loss=loss)

        self._forward = forward
        model.forward = forward

    @property
    def installed(self) -> bool:
        return vars(self.model).get("forward") is self._forward

    def remove(self) -> None:
        """Give the model back its own loss (idempotent)."""
        if not self.installed:
            return
        if self._previous is None:
            del self.model.forward
        else:
            self.model.forward = self._previous

    def __enter__(self) -> ChunkedLoss:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def install_chunked_loss(model: nn.Module, chunk_tokens: int = 1024) -> ChunkedLoss | None:
    """Compute the loss of `model(..., labels=...)` chunk by chunk; calls without labels are unchanged.

    Returns the installed `ChunkedLoss` (remove it, or use it as a context manager, to restore the
    model's own loss), or None, changing nothing, where `supports_chunked_loss` says no.
    """
    if supports_chunked_loss(model) is not None:
        return None
    return ChunkedLoss(model, chunk_tokens)


@contextlib.contextmanager
def chunked_loss(model: nn.Module, chunk_tokens: int = 1024) -> Iterator[ChunkedLoss | None]:
    """`install_chunked_loss` for the duration of a `with` block (None inside where it is not supported)."""
    handle = install_chunked_loss(model, chunk_tokens)
    try:
        yield handle
    finally:
        if handle is not None:
            handle.remove()
