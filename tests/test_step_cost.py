"""benchmarks/step_cost.py's counting: what it skips to reach the 7B width on CPU changes no figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import conftest
from qlora_lite.config import LoraConfig

pytest.importorskip("bitsandbytes")  # the cost model counts the peer's ops too
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
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


def test_the_benchmark_counts_both_sides_as_on_cuda(tmp_path):
    """The command end to end at a small shape, in its own process (it sets ours up as CUDA runs it, process-wide):
    one launch per dequantize (the triton backend's kernel; not CPU's reused buffer or cached scales), and
    the issue's launch target."""
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_cost.py"), "--width", "tiny", "--layers", "1",
                           "--seq", "64", "--threads", "1", "--json", "--cache", str(tmp_path / "checkpoint")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    ours = summary["ours"]["per_layer"]["launches_by_kind"]
    assert ours["dequantize"] == 7 * 3  # seven linears: forward, recompute, backward
    assert "cast" not in ours  # bf16 adapters, lean ops: nothing cast per layer
    assert summary["ratios"]["launches"] <= 0.4
