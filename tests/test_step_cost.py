"""benchmarks/step_cost.py's counting: what it skips to reach the 7B width on CPU changes no figure."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import conftest
from qlora_lite.config import LoraConfig

pytest.importorskip("bitsandbytes")  # the cost model counts the peer's ops too
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import step_cost  # noqa: E402

MATMUL_OPS = ("mm", "addmm", "addmm_", "bmm", "baddbmm")


def test_counting_with_the_matmuls_as_zeros_gives_every_figure_of_computing_them():
    """Launches, bytes, FLOPs per op kind and region, and the saved activations, are the same whether the
    matmuls and attention run or return zeros of their output's shape (the default at the 7B width)."""
    model = conftest.tiny_lora_llama(conftest.tiny_llama_config(), LoraConfig(r=4, lora_dropout=0.0))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()  # first-call work (the CPU's cached block scales) out of the way
    figures = {}
    for compute in (True, False):
        model.zero_grad(set_to_none=True)
        tallies = step_cost.record_step(model, ids, None, 2e-6, compute_heavy=compute)
        figures[compute] = tallies, step_cost.saved_activation_bytes(model, ids, None, compute_heavy=compute)
    (computed, saved), (shaped, saved_shaped) = figures[True], figures[False]
    assert set(computed) == {0, 1, "outside"}
    layer = computed[0]
    assert layer.by_kind["attention"] > 0 and layer.flops > 0 and saved[0] > 0
    # the LoRA product added in place (addmm_) is a matmul with its FLOPs, not an elementwise op
    assert layer.by_op["addmm_"] > 0
    assert sum(layer.by_op[op] for op in MATMUL_OPS) == layer.by_kind["matmul"]
    assert computed == shaped
    assert saved == saved_shaped
