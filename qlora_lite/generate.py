"""Greedy or sampled answers from a (quantized) model, rendered with the training chat format."""

from __future__ import annotations

import math

import torch

from .data import render_chat
from .errors import ConfigError

__all__ = ["answer", "answers", "check_temperature"]


def check_temperature(temperature: float) -> None:
    """0 is greedy, > 0 samples; anything else (a negative value silently meant greedy) is refused."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ConfigError(f"temperature={temperature!r} must be 0 (greedy) or a positive number (sampling)",
                          "generate options")


def answer(model, tokenizer, question: str, max_new_tokens: int = 48, temperature: float = 0.0,
           seed: int = 0) -> str:
    """One assistant turn for `question`; temperature 0 is greedy (reproducible). See `answers`."""
    return answers(model, tokenizer, [question], max_new_tokens, temperature, seed)[0]


@torch.no_grad()
def answers(model, tokenizer, questions: list[str] | tuple[str, ...], max_new_tokens: int = 48,
            temperature: float = 0.0, seed: int = 0) -> list[str]:
    """One assistant turn for each of `questions`, generated together as one left-padded batch (one decode
    step per new token for all of them); temperature 0 is greedy.

    Sampling draws from a stream seeded with `seed` inside `torch.random.fork_rng`, so the caller's
    global random state is the same afterwards (transformers' sampler draws from the global generator
    and takes no torch.Generator of its own).
    """
    check_temperature(temperature)
    prompts = [render_chat(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True)
               for q in questions]
    device = next(model.parameters()).device
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # new tokens follow every prompt
    try:
        inputs = tokenizer(prompts, return_tensors="pt", add_special_tokens=False, padding=True).to(device)
    finally:
        tokenizer.padding_side = padding_side
    was_training = model.training
    model.eval()
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                use_cache=True, **sampling)
    model.train(was_training)
    new = output[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
