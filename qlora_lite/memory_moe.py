"""The planner's mixture-of-experts terms: what one routed MLP saves per token (experts.py's forward).

Per token, for a block of E experts, top-k routing, expert intermediate size i, hidden h,
compute dtype b bytes, LoRA rank r (tests/test_memory.py checks the sum against autograd):

    router           measured: the router module run once on the CPU under autograd's saved-tensor
                     hooks (fp32 softmax output 4·E, top-k indices 8·k, Mixtral's renormalisation
                     4 + 4·k); transformers' routers differ per model, so the planner runs the real one
    per routed slot  (k of them)
      expert MLP     3·b·i              gate_up output (the SiLU input and `up`), SiLU output
      combine        b·h + w + 16       the expert output and its routing weight (w: 4 bytes for
                                        Mixtral's fp32 weights, b for Qwen3-MoE's), two int64 indices
                                        (the gather by expert and the return to token order)
      LoRA           gate_up: b·h + b·r  the gathered input and x·Aᵀ
                     down:    b·i + b·r  SiLU(gate)·up and x·Aᵀ (no dropout on experts, as PEFT)
"""

from __future__ import annotations

import copy
import functools

import torch

from .memory_arch import ModelShape

__all__ = ["router_bytes", "moe_mlp_bytes_per_token"]


@functools.lru_cache(maxsize=32)
def _router_bytes(shape: ModelShape, block_name: str, dtype: torch.dtype) -> tuple[int, int]:
    gate = copy.deepcopy(shape.model.get_submodule(block_name).gate).to_empty(device="cpu").to(dtype)
    for p in gate.parameters():  # frozen, as in training (a trainable router would also save its input)
        torch.nn.init.normal_(p.data)
        p.requires_grad_(False)
    own = {t.untyped_storage().data_ptr() for t in gate.parameters()}
    tokens = 8
    x = torch.randn(tokens, shape.hidden, dtype=dtype, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own | {x.untyped_storage().data_ptr()}:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, weights, _ = gate(x)
    return sum(saved.values()) // tokens, weights.element_size()


def router_bytes(shape: ModelShape, layer: int, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes the router of `layer` saves per token, bytes of one routing weight) in compute dtype `dtype`."""
    name = next(n for n in shape.experts if f".{layer}." in f".{n}").rpartition(".")[0].rpartition(".")[0]
    return _router_bytes(shape, name, dtype)


def moe_mlp_bytes_per_token(shape: ModelShape, layer: int, adapted: list[str], *, dtype: torch.dtype,
                            r: int) -> int:
    """Bytes autograd saves per token in `layer`'s routed MLP; `adapted`: its adapted projections."""
    b, h, k = dtype.itemsize, shape.hidden, shape.top_k
    inter = next(s for n, s in shape.experts.items() if f".{layer}." in f".{n}" and n.endswith(".down_proj"))[2]
    router, weight = router_bytes(shape, layer, dtype)
    slot = 3 * b * inter + b * h + weight + 16
    if "gate_up_proj" in adapted:
        slot += b * h + b * r
    if "down_proj" in adapted:
        slot += b * inter + b * r
    return router + k * slot
