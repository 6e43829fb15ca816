"""What fits a budget (memory_fit): the largest batch or sequence, the advice when nothing fits, the
`qlora-lite memory` report and its refusals, and the run's preflight check and monitor."""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import pytest
import torch

from qlora_lite.config import LoraConfig
from qlora_lite.errors import ConfigError
from qlora_lite.memory import (GPU_MEMORY, GiB, MemoryBudgetError, MemoryEstimate, builtin_configs, estimate_memory,
                               load_model_config, parse_budget)
from qlora_lite.memory_fit import fit_to_budget, memory_report
from qlora_lite.monitor import MemoryMonitor, compare, preflight
from conftest import tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**overrides):
    return tiny_llama_config(**({"tie_word_embeddings": False} | overrides))


def test_fit_to_budget_returns_the_largest_fitting_step():
    budget = parse_budget("RTX4090")
    by_batch = fit_to_budget("llama-2-7b", budget, seq_len=2048)
    assert by_batch.varied == "batch_size" and by_batch.value >= 2
    assert by_batch.estimate.required_bytes <= budget < by_batch.next_estimate.required_bytes
    assert by_batch.next_estimate.batch_size == by_batch.value + 1
    by_seq = fit_to_budget("llama-2-7b", "24GiB", batch_size=1)
    assert by_seq.value % 64 == 0 and by_seq.value > 2048
    assert by_seq.estimate.required_bytes <= budget < by_seq.next_estimate.required_bytes
    assert by_seq.next_estimate.seq_len == by_seq.value + 64
    with pytest.raises(ConfigError):
        fit_to_budget("llama-2-7b", budget)


def test_impossible_budget_and_unknown_gpu_are_clear_errors():
    with pytest.raises(MemoryBudgetError) as info:
        fit_to_budget("llama-2-13b", "8GiB", seq_len=2048)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "over the 8.00 GiB budget" in message
    assert "FSDP over" in message, message
    with pytest.raises(MemoryBudgetError, match="NF4 weights alone are 6.10 GiB"):
        fit_to_budget("llama-2-13b", "1GB", batch_size=1)
    with pytest.raises(ConfigError) as info:
        parse_budget("RTX9090")
    assert "RTX4090" in str(info.value) and isinstance(info.value, ValueError)
    with pytest.raises(ConfigError, match="unit"):
        parse_budget("24")
    assert parse_budget("24GB") == 24 * 10**9 and parse_budget("24GiB") == 24 * GiB
    assert parse_budget("a100-80gb") == GPU_MEMORY["A100-80GB"] == 80 * GiB


def test_builtin_configs_and_the_worked_llama2_7b_example():
    names = builtin_configs()
    for name in ("llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "mistral-7b",
                 "qwen2.5-7b", "qwen2.5-32b", "llama-33b", "llama-65b"):
        assert name in names
        cfg, _ = load_model_config(name)
        assert cfg.hidden_size > 0 and cfg.num_hidden_layers > 0
    assert load_model_config("llama-33b")[0].hidden_size == 6656
    assert load_model_config(str(ROOT / "qlora_lite/configs/llama-65b.json"))[0].intermediate_size == 22016
    est = estimate_memory("llama-2-7b", seq_len=2048, batch_size=1)
    assert est.params_quantized == pytest.approx(6.476e9, rel=0.01)
    assert est.quantized_weights == pytest.approx(3.34e9, rel=0.01)
    assert est.params_16bit - 2 * 32 * 4096 - 4096 == pytest.approx(2 * 131e6, rel=0.01)  # minus the norms
    assert est.weights_16bit == pytest.approx(0.52e9, rel=0.02)
    assert est.params_trainable == pytest.approx(40.0e6, rel=0.01)
    with pytest.raises(ConfigError, match="llama-2-7b"):
        load_model_config("llama-9b")


def test_report_json_table_and_plot(tmp_path):
    png = tmp_path / "memory.png"
    text = memory_report("llama-2-7b", seq_len=2048, gpu="RTX4090", plot=str(png))
    assert "fits RTX4090" in text and "largest batch_size" in text and "largest seq_len" in text
    assert png.is_file() and png.stat().st_size > 5000
    data = json.loads(memory_report("llama-2-7b", gpu="T4", json_output=True))
    assert data["fits"] is True and data["max_batch_size"] >= 1
    est = MemoryEstimate(**{k: v for k, v in data["estimate"].items()
                            if k not in ("total_bytes", "allocated_bytes", "reserved_bytes", "peak_breakdown")})
    assert est.total_bytes == data["estimate"]["total_bytes"] == sum(est.peak_breakdown().values())
    assert data["estimate"]["allocated_bytes"] == est.allocated_bytes
    assert "total (peak per GPU)" in est.to_table()


def test_monitor_and_compare():
    monitor = MemoryMonitor("cpu")
    before = monitor.current()["rss_bytes"]
    # 256 MiB touched, then unmapped: only the kernel's peak still shows it. An anonymous mapping of our own,
    # not a tensor: the allocator may keep a freed tensor's pages (a full-suite run once kept 268 MB resident).
    size = 256 * 2**20
    spike = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        spike[offset] = 1
    spike.close()
    record = monitor.mark("start")
    assert record["peak_rss_bytes"] >= before + 200 * 2**20 > record["rss_bytes"] + 100 * 2**20
    after = monitor.mark("after")  # the peak was reset by the previous mark
    assert after["peak_rss_bytes"] < record["peak_rss_bytes"] - 100 * 2**20
    assert list(monitor.summary()) == ["start", "after"]
    est = estimate_memory(tiny_config(), seq_len=64, batch_size=1, device="cpu", compute_dtype="float32")
    text = compare(est, {"rss_growth_bytes": est.transient_bytes * 2, "cuda_peak_allocated_bytes": est.allocated_bytes})
    assert "2.00" in text and "1.00" in text


def test_preflight_warns_with_what_fits_when_the_machine_is_too_small(monkeypatch):
    import psutil

    cfg, kw = tiny_config(), dict(seq_len=64, lora=LoraConfig(r=4), compute_dtype="float32")
    one, two = (estimate_memory(cfg, batch_size=b, device="cpu", **kw).required_bytes for b in (1, 2))
    estimate, warnings = preflight(cfg, "cpu", batch_size=8, **kw)
    assert warnings == [] and estimate.batch_size == 8 and estimate.device == "cpu"

    class Small:
        available = (one + two) // 2  # batch 1 fits, batch 2 does not

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Small)
    _, warnings = preflight(cfg, "cpu", batch_size=8, **kw)
    assert len(warnings) == 1 and "batch_size 1 fits at seq_len 64" in warnings[0]
    Small.available = one // 2  # nothing fits: the planner's own error says by how much
    _, warnings = preflight(cfg, "cpu", batch_size=8, **kw)
    assert len(warnings) == 1 and "What would fit" in warnings[0]
    Small.available = one + one // 2
    _, warnings = preflight(cfg, "cpu", batch_size=1, world_size=2, **kw)  # two processes on this host
    assert len(warnings) == 1 and "`qlora-lite memory --model <model> --gpu" in warnings[0]


@pytest.mark.gpu
def test_preflight_on_a_gpu_names_it_and_what_fits():
    _, warnings = preflight("llama-2-70b", "cuda", seq_len=4096, batch_size=64)  # far beyond any one GPU
    assert any(torch.cuda.get_device_name(0) in w and ("fits at seq_len 4096" in w or "What would fit" in w)
               for w in warnings), warnings
    _, warnings = preflight("llama-2-7b", "cuda", seq_len=512, batch_size=1)  # 6 GiB: fits any datacenter GPU
    assert not any("GPU" in w or torch.cuda.get_device_name(0) in w for w in warnings), warnings


def test_every_no_says_why_and_what_would_fit():
    with pytest.raises(MemoryBudgetError) as info:
        fit_to_budget("llama-2-70b", "RTX4090", seq_len=512)
    message = str(info.value)
    assert "the NF4 weights alone are 32.89 GiB + 0.98 GiB embeddings/head/norms on that budget" in message
    assert "FSDP over 4 GPUs" in message and "LoRA rank" not in message  # a smaller adapter cannot help
    with pytest.raises(MemoryBudgetError) as info:  # already sharded: FSDP is not suggested again
        fit_to_budget("llama-2-70b", "8GiB", seq_len=512, world_size=8, fsdp=True)
    assert "FSDP over" not in str(info.value) and "(per rank)" in str(info.value)


@pytest.mark.parametrize("config,words", [
    ({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
      "num_attention_heads": 0, "vocab_size": 100}, "num_attention_heads=0 must be a positive integer"),
    ({"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100}, "no attention heads"),
    ({"model_type": "bert", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
      "num_attention_heads": 4, "vocab_size": 100}, "not a decoder-only causal LM"),
    ({"model_type": "qwen2_moe", "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
      "shared_expert_intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2, "vocab_size": 100},
     "shared experts"),  # Mixtral and Qwen3-MoE are planned: tests/test_moe.py
])
def test_hostile_model_configs_are_refused_in_one_line(tmp_path, config, words):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=words):
        estimate_memory(path, seq_len=64, batch_size=1)
    from qlora_lite.cli import main

    assert main(["memory", "--model", str(path)]) == 2


def test_hostile_cli_arguments(capsys):
    from qlora_lite.cli import main

    cases = [(["--rank", "-4"], "rank=-4 must be a positive integer"),
             (["--fsdp", "--world-size", "1"], "give --world_size 2 or more"),
             (["--optimizer", "paged_adam_8bit"], "did you mean paged_adamw_8bit?")]
    for args, words in cases:
        assert main(["memory", "--model", "llama-2-7b", *args]) == 2
        err = capsys.readouterr().err
        assert words in err and "lora_alpha" not in err, err
    assert main(["memory", "--model", "llama-2-7"]) == 2
    assert "did you mean llama-2-7b" in capsys.readouterr().err
    table = memory_report("llama-2-7b", seq_len=10**8, batch_size=1000).splitlines()
    rows = table[1:table.index(next(r for r in table if r.startswith("total")))+1]
    widths = {len(r) for r in rows if not r.startswith("-")}
    assert len(widths) == 1, rows  # columns stay aligned with very large numbers


def test_recipe_peft_prints_the_peer_beside_ours():
    text = memory_report("llama-3-8b", seq_len=8192, recipe="peft", gpu="A100-80GB")
    assert "[peer: transformers + bitsandbytes + PEFT]" in text and "qlora-lite for the same run" in text
    peer = estimate_memory("llama-3-8b", seq_len=8192, batch_size=1, recipe="peft")
    ours = estimate_memory("llama-3-8b", seq_len=8192, batch_size=1)
    assert peer.lora_dtype == "float32" and peer.weights_16bit == 2 * ours.weights_16bit
    assert ours.total_bytes < 0.6 * peer.total_bytes


def test_longest_llama3_8b_sequence_on_an_rtx4090_with_offload_and_tiling():
    plain = fit_to_budget("llama-3-8b", "RTX4090", batch_size=1)
    tiled = fit_to_budget("llama-3-8b", "RTX4090", batch_size=1, mlp_chunk_tokens=4096)
    both = fit_to_budget("llama-3-8b", "RTX4090", batch_size=1, mlp_chunk_tokens=4096, offload_activations=True)
    assert plain.value < tiled.value < both.value and both.value >= 2 * plain.value
    assert both.estimate.required_bytes <= parse_budget("RTX4090") < both.next_estimate.required_bytes
    # the host holds every block input: 32 layers × seq × 4096 × bf16
    assert both.estimate.pinned_host_bytes == 32 * both.value * 4096 * 2
    report = memory_report("llama-3-8b", seq_len=65536, gpu="RTX4090", offload_activations=True,
                           mlp_chunk_tokens=4096, link_gbps=12.5)
    assert "GiB of block inputs in pinned host memory" in report and "at 12.5 GB/s" in report
    assert f"largest seq_len at batch_size 1: {both.value} " in report and "pinned host memory at that length" in report
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        estimate_memory("llama-3-8b", seq_len=1024, batch_size=1, offload_activations=True, gradient_checkpointing=False)
    with pytest.raises(ConfigError, match="link_gbps"):
        estimate_memory("llama-3-8b", seq_len=1024, batch_size=1, link_gbps=0)


def test_budgets_and_shard_sizes_read_units_alike():
    from qlora_lite.shards import parse_size

    for text in ["24GB", "24GiB", "1500MiB", ".5GB", "2 tb", "100KB"]:
        assert parse_budget(text) == parse_size(text), text
    assert parse_size("500") == 500 and parse_size(500) == 500  # a bare byte count is a shard size, not a budget
    with pytest.raises(ConfigError, match="with a unit"):
        parse_budget("500")
