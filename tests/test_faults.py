"""Hostile inputs and faults: each ends in a clear error and loses nothing (see docs/reliability.md)."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_lite.config import LoraConfig, QuantConfig, TrainConfig
from qlora_lite.errors import CheckpointError, ConfigError, DataError
from qlora_lite.fsutil import DiskFullError, OutputExistsError, atomic_directory
from qlora_lite.nf4 import NF4_CODE, NF4Weight
from qlora_lite.shards import read_header
from conftest import HANG_S, tiny_llama_config

# ---- configuration: every problem at once, before any weight is loaded ------------------------


def test_config_lists_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        TrainConfig(seq_len=0, learning_rate=-1, batch_size=2.5, warmup_steps=500, max_steps=100,
                    lora={"r": 0, "lora_alpha": -2, "lora_dropout": 1.0, "target_modules": []},
                    quant={"blocksize": 48})
    text = str(info.value)
    for fragment in ("seq_len=0", "learning_rate=-1", "batch_size=2.5", "warmup_steps=500", "lora.r=0",
                     "lora.lora_alpha=-2", "lora.lora_dropout=1.0", "lora.target_modules", "quant.blocksize=48"):
        assert fragment in text, fragment
    assert isinstance(info.value, ValueError)


def test_rank_must_be_an_int_and_yaml_typos_are_named(tmp_path):
    with pytest.raises(ConfigError, match="r='8' must be a positive integer"):
        LoraConfig(r="8")
    from qlora_lite.config import load_yaml_config

    run = tmp_path / "run.yaml"
    run.write_text("seq_len: 128\nlearning_rat: 0.001\n")
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        load_yaml_config(run)


# ---- files ------------------------------------------------------------------------------------


def _safetensors_bytes(header: dict, payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + payload


@pytest.mark.parametrize("header, payload, message", [
    (None, b"", "too short"),
    ("{not json", b"", "not JSON"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated"),
    ({"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, "unknown dtype"),
    ({"w": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}, b"\0" * 16, "needs 20"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, b"\0" * 16, "invalid offsets"),
    # safetensors itself refuses these ("invalid offset"); an overlap aliases two tensors' bytes
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24, "'a' and 'b' overlap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "'a' and 'b' overlap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16, "bytes 0..8 of the data belong to no"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "4 bytes after the last tensor"),
])
def test_corrupt_safetensors_headers(tmp_path, header, payload, message):
    file = tmp_path / "model.safetensors"
    if header is None:
        file.write_bytes(b"\x01\x02")
    elif isinstance(header, str):
        file.write_bytes(len(header).to_bytes(8, "little") + header.encode())
    else:
        file.write_bytes(_safetensors_bytes(header, payload))
    with pytest.raises(CheckpointError, match=message) as info:
        read_header(file)
    assert str(file) in str(info.value)


def test_a_tensor_over_2_gib_is_read_in_several_reads(tmp_path, monkeypatch):
    """Linux returns at most 2,147,479,552 bytes per read(); one readinto reported a 2.49 GB embedding as
    truncated. A sparse file holds a U8 tensor just over 2 GiB; the reads are counted, not copied (a fake
    readinto with the kernel's cap), so the test takes no time and no memory."""
    from qlora_lite.shards import ShardReader

    n = 2**31 + 64
    header = json.dumps({"big": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    file = tmp_path / "model.safetensors"
    with open(file, "wb") as handle:
        handle.write(len(header).to_bytes(8, "little") + header)
        handle.truncate(8 + len(header) + n)
    reads = []

    class LinuxCappedFile:
        def __init__(self, real):
            self.real, self.position = real, 0

        def seek(self, position):
            self.position = position

        def readinto(self, view):
            count = min(len(view), 2_147_479_552, 8 + len(header) + n - self.position)
            reads.append(count)
            self.position += count
            return count

        def close(self):
            self.real.close()

    with ShardReader(file) as reader:
        reader._handle = LinuxCappedFile(reader._handle)
        tensor = reader.get("big")
    assert tensor.shape == (n,) and reads == [2_147_479_552, n - 2_147_479_552]


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_header_reader(tmp_path, blob):
    file = tmp_path / "fuzz.safetensors"
    file.write_bytes(blob)
    try:
        read_header(file)
    except CheckpointError:
        pass


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(max_size=80), min_size=1, max_size=5))
def test_random_jsonl_lines_give_records_or_a_data_error(tmp_path, lines):
    from qlora_lite.data import load_records

    file = tmp_path / "fuzz.jsonl"
    file.write_text("\n".join(lines))
    try:
        load_records(file)
    except DataError as exc:
        assert "fuzz.jsonl" in str(exc)


def test_a_jsonl_line_that_is_not_an_object_is_a_data_error_not_a_crash(tmp_path):
    """pyarrow 26's JSON reader segfaults on `null]`-like lines (found by the fuzz test above): such a line
    never reaches it. In a child process, so that a crash fails this test instead of ending the run."""
    files = []
    for i, line in enumerate(["null]", "null\u4e2d]r", "nullx", "1", '"text"']):
        files.append(tmp_path / f"bad{i}.jsonl")
        files[-1].write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    code = ("import sys; from qlora_lite.data import load_records; from qlora_lite.errors import DataError\n"
            "for name in sys.argv[1:]:\n    try:\n        load_records(name)\n"
            "    except DataError as exc:\n        print('DataError:', exc)")
    out = subprocess.run([sys.executable, "-c", code, *map(str, files)], capture_output=True, text=True,
                         timeout=HANG_S)
    assert out.returncode == 0, out.stderr[-2000:]
    errors = [line for line in out.stdout.splitlines() if line.startswith("DataError:")]
    assert len(errors) == len(files) and all(f"bad{i}.jsonl:2" in e for i, e in enumerate(errors)), out.stdout


def test_malformed_jsonl_names_file_and_line(tmp_path):
    from qlora_lite.data import load_records

    file = tmp_path / "data.jsonl"
    file.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(DataError, match="data.jsonl:2"):
        load_records(file)
    file.write_text('{"messages": [{"role": "wizard", "content": "hi"}]}\n')
    with pytest.raises(DataError, match="wizard"):
        load_records(file)
    file.write_text("")
    with pytest.raises(DataError):
        load_records(file)


# ---- NF4 round trips under hostile values ---------------------------------------------------


_finite = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(rows=st.integers(1, 9), cols=st.integers(1, 150), dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
       scale=st.sampled_from([0.0, 1e-40, 1e-8, 1.0, 1e4, 1e30]), data=st.data())
def test_nf4_round_trip_bounds_on_random_shapes_and_values(rows, cols, dtype, scale, data):
    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    w = (torch.randn(rows, cols, generator=g, dtype=torch.float64) * scale)
    w.view(-1)[:: max(1, cols // 3)] = -0.0
    w = w.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    q = NF4Weight.from_tensor(w, double_quant=False, backend="torch")
    deq, ref = q.dequantize(torch.float32), w.float()
    flat = torch.nn.functional.pad(ref.reshape(-1), (0, (-ref.numel()) % 64)).reshape(-1, 64)
    absmax = flat.abs().amax(1, keepdim=True)
    err = torch.nn.functional.pad((deq - ref).abs().reshape(-1), (0, (-ref.numel()) % 64)).reshape(-1, 64)
    half_gap = ((NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2).item()
    # Blocks whose absmax is below 1e-38 (subnormal) round to zero, as in bitsandbytes (it clamps
    # the scale at 1e-38); their error is below 1e-38 in absolute terms.
    assert (err <= half_gap * absmax * (1 + 1e-6) + 1e-38).all()
    assert torch.isfinite(NF4Weight.from_tensor(w, backend="torch").dequantize(torch.float32)).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nf4_rejects_non_finite_values(bad):
    w = torch.ones(4, 64)
    w[2, 5] = bad
    with pytest.raises(ValueError, match="inf or NaN"):
        NF4Weight.from_tensor(w, name="layer.weight")


# ---- atomic outputs: errors, full disks and kills leave the previous state --------------------


def test_atomic_directory_keeps_the_old_output_on_failure(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("new, half written")
            raise RuntimeError("crash")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp litter
    with pytest.raises(OutputExistsError):
        with atomic_directory(target):
            pass


def test_out_of_disk_during_adapter_save_is_clear_and_loses_nothing(tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    import safetensors.torch
    from qlora_lite.adapter import read_adapter, save_adapter
    from qlora_lite.inject import inject_lora

    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1, vocab_size=128, tie_word_embeddings=False))
    inject_lora(model, LoraConfig(r=4), QuantConfig(backend="torch"))
    save_adapter(model, tmp_path / "adapter")
    before = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(DiskFullError, match="no space left.*nothing was changed"):
        save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == before
    read_adapter(tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, tiny_model_dir):
    script = textwrap.dedent(f"""
        import time, torch
        from pathlib import Path
        from qlora_lite.config import QuantConfig, LoraConfig
        from qlora_lite.load import load_model
        import qlora_lite.checkpoint as T
        model, _ = load_model({str(tiny_model_dir)!r}, QuantConfig(backend="torch"), LoraConfig(r=4), device="cpu",
                              with_tokenizer=False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        out = Path({str(tmp_path / "run")!r})
        T.save_checkpoint(out, 1, model, T.gather_training_state(model, opt, False, 1), sched, {{"losses": []}}, keep_last=3)
        real_save = torch.save
        def slow_save(obj, path):
            real_save(obj, path)
            print("WRITING", flush=True)
            time.sleep(120)
        torch.save = slow_save
        T.save_checkpoint(out, 2, model, T.gather_training_state(model, opt, False, 1), sched, {{"losses": []}}, keep_last=3)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "WRITING" in line, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=HANG_S)
    from qlora_lite.adapter import read_adapter
    from qlora_lite.train import latest_checkpoint

    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "step-000001"
    read_adapter(ckpt / "adapter")
    torch.load(ckpt / "training_state.pt", weights_only=False)
    assert not (tmp_path / "run" / "checkpoints" / "step-000002").exists()
