"""The peer's recipe (transformers + bitsandbytes + PEFT) in the planner's terms: what it keeps that we don't.

The peer as design.md measured it (transformers 5.17, bitsandbytes 0.50.2, PEFT 0.21;
`prepare_model_for_kbit_training`, gradient checkpointing, paged AdamW 32-bit, bf16 autocast):

* `prepare_model_for_kbit_training` casts every parameter that is not 4-bit to fp32: embeddings,
  norms and the LM head take 4 bytes per parameter instead of 2;
* PEFT keeps the LoRA factors in fp32 (`autocast_adapter_dtype`), whatever the compute dtype;
* under bf16 autocast the head's matmul casts the fp32 head to a bf16 copy and keeps it for the
  backward (the head is frozen, so autocast does not cache it: the copy lives through the loss);
* the fp32 embeddings make the residual stream fp32: every checkpointed block input takes 4 bytes
  per value (a CPU run of the peer shows the decoder layers' input in fp32; tests/test_memory.py);
* transformers' loss upcasts the full logits (12 bytes per token and vocabulary entry at the
  log-softmax backward, as in our unchunked loss); the bf16 logits are not alive then, as the
  Trainer drops the model output before the backward.

Checked against the six measured rows of design.md (tests/test_memory.py): within ±1 %. At
Llama-3-8B the fp32 residual stream (2 · L · hidden bytes per token) and kept bf16 logits
(2 · vocab) would be the same size, so only the 32k-vocabulary models tell them apart: with kept
logits instead, Llama-2-7B and 13B come out 5-6 % low.

`estimate_memory(..., recipe="peft")` applies these to the same run; the rest of the estimate
(NF4 bytes, checkpointed block inputs, a recomputed block, the optimizer) is shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import LoraConfig
from .memory_arch import ModelShape

__all__ = ["PeerTerms", "peer_terms"]


@dataclass(frozen=True)
class PeerTerms:
    """The peer's differences from our stack, per run."""

    lora_dtype: torch.dtype  # PEFT: fp32 adapters
    weight_bytes: int  # bytes per unquantized parameter after prepare_model_for_kbit_training
    head_copy_bytes: int  # autocast's compute-dtype copy of the fp32 head, alive through the loss
    residual_bytes: int  # bytes per value of the residual stream (the checkpointed block inputs)

    def loss_extra(self, tokens: int) -> int:
        """Bytes the peer's loss phase holds beyond the 12 B/(token·vocab) of an upcast cross-entropy."""
        return self.head_copy_bytes

    def block_extra(self, tokens: int) -> int:
        """Bytes the peer's recomputed block holds beyond ours (none known yet: see docs/memory.md)."""
        return 0


def peer_terms(shape: ModelShape, lora: LoraConfig, compute_dtype: torch.dtype) -> PeerTerms:
    b = compute_dtype.itemsize
    upcast = b < 4  # prepare_model_for_kbit_training upcasts 16-bit weights; autocast casts the head back
    return PeerTerms(lora_dtype=torch.float32, weight_bytes=4,
                     head_copy_bytes=b * shape.head_params if upcast else 0, residual_bytes=4)
