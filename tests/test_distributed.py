"""Data parallel and FSDP on CPU (gloo, 2 processes via torchrun): the adapter equals a
single-process run with the same global batch, FSDP halves each process's quantized base, resume
is exact, and the launch commands in docs/distributed.md run as written."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_lite.adapter import read_adapter
from conftest import HANG_S

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_yaml(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("ddp")
    # equal-length records: each rank's token-mean loss then averages to the global token mean.
    # 6 of them are held out: 3 per-process batches of 2, so under 2 processes one evaluates 2, the other 1
    records = [{"text": f"The code word number {i % 8} is apple ."} for i in range(32)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "run.yaml").write_text(
        f"model: {tiny_model_dir}\ndata: {root / 'data.jsonl'}\nseq_len: 32\nbatch_size: 2\nmax_steps: 4\n"
        "learning_rate: 0.005\nwarmup_steps: 1\neval_fraction: 0.2\nsave_every: 2\nprogress: false\ndevice: cpu\n"
        "quant:\n  backend: torch\nlora:\n  r: 4\n  lora_dropout: 0.0\n")
    return root


def _cli(args, cwd, nproc=None, launcher=None):
    prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc else [sys.executable]
    prefix = launcher or prefix
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([*prefix, "-m", "qlora_lite.cli", *args], capture_output=True, text=True, timeout=HANG_S,
                         cwd=cwd, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def single(run_yaml):
    """The reference: one process with the global batch (2 per process x 2 processes)."""
    _cli(["train", "--config", str(run_yaml / "run.yaml"), "--out_dir", str(run_yaml / "single"), "--batch_size", "4"],
         run_yaml)
    return run_yaml / "single"


def _metric(run_dir: Path, key: str) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if key in r]


def _losses(run_dir: Path) -> list[float]:
    return _metric(run_dir, "loss")


def _assert_same_adapter(got_dir: Path, want_dir: Path, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    got, want = read_adapter(got_dir / "adapter"), read_adapter(want_dir / "adapter")
    assert got.modules == want.modules and any(b.abs().max() > 1e-3 for b in want.lora_B.values())
    for module in want.modules:
        torch.testing.assert_close(got.lora_A[module], want.lora_A[module], atol=atol, rtol=rtol)
        torch.testing.assert_close(got.lora_B[module], want.lora_B[module], atol=atol, rtol=rtol)


def _documented(marker: str) -> list[str]:
    doc = (ROOT / "docs" / "distributed.md").read_text()
    return shlex.split(re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)```", doc, flags=re.S).group(1).strip())


_LAUNCHERS = {("torchrun",): "torch.distributed.run", ("accelerate", "launch"): "accelerate.commands.launch"}


def _run_documented(argv: list[str], run_yaml: Path, out: Path) -> subprocess.CompletedProcess:
    """Run a documented `torchrun ...` / `accelerate launch ...` command as written (the launcher
    through this interpreter, run.yaml the test's, plus --out_dir)."""
    cli = argv.index("qlora_lite.cli")
    assert argv[cli - 1] == "-m"
    name = next(k for k in _LAUNCHERS if tuple(argv[:len(k)]) == k)
    launcher = [sys.executable, "-m", _LAUNCHERS[name], *argv[len(name):cli - 1], "-m"]
    args = [a.replace("run.yaml", str(run_yaml / "run.yaml")) for a in argv[cli + 1:]]
    return _cli([*args, "--out_dir", str(out)], run_yaml, launcher=launcher)


def test_two_process_ddp_equals_single_process_global_batch(run_yaml, single):
    _cli(["train", "--config", str(run_yaml / "run.yaml"), "--out_dir", str(run_yaml / "ddp")], run_yaml, nproc=2)
    _assert_same_adapter(run_yaml / "ddp", single)
    assert _losses(run_yaml / "ddp") == pytest.approx(_losses(single), rel=1e-4)  # rank 0 logs the global mean
    # the held-out set split over the processes (2 batches and 1) gives the loss of the whole set
    assert len(_metric(single, "eval_loss")) == 2  # before training and after the last step
    assert _metric(run_yaml / "ddp", "eval_loss") == pytest.approx(_metric(single, "eval_loss"), rel=1e-5)


def test_documented_fsdp_command_equals_single_process_and_halves_the_base(run_yaml, single):
    argv = _documented("cpu-launch-fsdp")
    assert "--fsdp" in argv and argv[2] == "2"
    proc = _run_documented(argv, run_yaml, run_yaml / "fsdp")
    assert "rank 0 read and quantized the checkpoint" in proc.stdout + proc.stderr  # once, not once per process
    _assert_same_adapter(run_yaml / "fsdp", single)
    assert _losses(run_yaml / "fsdp") == pytest.approx(_losses(single), rel=1e-4)
    assert _metric(run_yaml / "fsdp", "eval_loss") == pytest.approx(_metric(single, "eval_loss"), rel=1e-5)
    whole = json.loads((single / "memory.json").read_text())["base_bytes_per_process"]
    shards = json.loads((run_yaml / "fsdp" / "memory.json").read_text())["base_bytes_per_process"]
    assert len(whole) == 1 and len(shards) == 2
    # every NF4 tensor is split in two; FSDP pads a shard by < 1 element of each tensor
    padding = 4 * 4 * len(read_adapter(single / "adapter").modules)
    assert whole[0] <= sum(shards) <= whole[0] + padding
    assert all(abs(s - whole[0] / 2) <= padding for s in shards), (shards, whole)


def test_fsdp_resume_continues_exactly(run_yaml):
    """With dropout on, so every process draws from its own random stream: the checkpoint keeps each
    process's stream, and the resumed run is bit-identical to the uninterrupted one."""
    import shutil

    args = ["train", "--config", str(run_yaml / "run.yaml"), "--fsdp", "--lora.lora_dropout", "0.2"]
    done, resumed = run_yaml / "fsdp_dropout", run_yaml / "fsdp_resumed"
    _cli([*args, "--out_dir", str(done)], run_yaml, nproc=2)
    shutil.copytree(done, resumed)
    shutil.rmtree(resumed / "adapter")
    last = sorted((resumed / "checkpoints").glob("step-*"))
    assert [p.name for p in last] == ["step-000002", "step-000004"]
    shutil.rmtree(last[-1])  # as if the run had died after step 2's checkpoint
    _cli([*args, "--out_dir", str(resumed), "--resume"], run_yaml, nproc=2)
    _assert_same_adapter(resumed, done, atol=0.0, rtol=0.0)
    out = subprocess.run([sys.executable, "-m", "qlora_lite.cli", "train", "--config", str(run_yaml / "run.yaml"),
                          "--out_dir", str(resumed), "--resume", "--max_steps", "6"], capture_output=True, text=True,
                         cwd=run_yaml, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=HANG_S)
    assert out.returncode == 2 and "written with fsdp=true and this run has fsdp=false" in out.stderr


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_gradient_accumulation_equals_the_global_batch(run_yaml, single, engine):
    """2 processes x batch 1 x 2 micro-batches, gradients communicated once per step (DDP no_sync /
    FSDP set_requires_gradient_sync) = one process with batch 4."""
    _cli(["train", "--config", str(run_yaml / "run.yaml"), "--out_dir", str(run_yaml / f"{engine}_accum"),
          "--batch_size", "1", "--grad_accum", "2", *(["--fsdp"] if engine == "fsdp" else [])], run_yaml, nproc=2)
    _assert_same_adapter(run_yaml / f"{engine}_accum", single)


def test_fsdp_on_a_4bit_checkpoint_loads_in_turns_and_equals_the_plain_run(run_yaml, single, tiny_model_dir):
    """A checkpoint already in NF4 (`qlora-lite quantize`) has the same bytes the load would make:
    the same adapter, but each process reads it (in turns) instead of receiving it from rank 0."""
    nf4 = run_yaml / "tiny-nf4"
    _cli(["quantize", "--model", str(tiny_model_dir), "--out", str(nf4)], run_yaml)
    proc = _cli(["train", "--config", str(run_yaml / "run.yaml"), "--model", str(nf4), "--out_dir",
                 str(run_yaml / "fsdp_nf4"), "--fsdp"], run_yaml, nproc=2)
    assert "loaded the model in turns" in proc.stdout + proc.stderr
    _assert_same_adapter(run_yaml / "fsdp_nf4", single)


def test_a_checkpoint_error_on_rank_0_stops_every_process_with_the_message(run_yaml, tiny_model_dir):
    """Only rank 0 reads the weights under FSDP; a bad tensor must not leave the others waiting."""
    import shutil

    broken = run_yaml / "tiny-wrong-config"
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] + 8}))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                          "qlora_lite.cli", "train", "--config", str(run_yaml / "run.yaml"), "--model", str(broken),
                          "--out_dir", str(run_yaml / "broken"), "--fsdp"], capture_output=True, text=True,
                         timeout=HANG_S, cwd=run_yaml, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    assert out.stderr.count("the weights do not belong to this config") == 2, out.stderr[-3000:]  # both ranks say it


def test_single_process_fsdp_equals_a_plain_run(run_yaml, single):
    """One process, FSDP on a private process group: the one-GPU smoke-test path."""
    _cli(["train", "--config", str(run_yaml / "run.yaml"), "--out_dir", str(run_yaml / "fsdp1"), "--batch_size", "4",
          "--fsdp"], run_yaml)
    _assert_same_adapter(run_yaml / "fsdp1", single)


def test_resume_with_another_world_size_is_explained(run_yaml, single):
    import shutil

    shutil.copytree(single, run_yaml / "single_resumed_on_2")
    with pytest.raises(AssertionError, match=r"written by a run on 1 process\(es\) but this run has 2"):
        _cli(["train", "--config", str(run_yaml / "run.yaml"), "--out_dir", str(run_yaml / "single_resumed_on_2"),
              "--resume", "true", "--max_steps", "6"], run_yaml, nproc=2)


def test_documented_accelerate_launch_on_cpu_runs_two_processes(run_yaml, single):
    argv = _documented("cpu-launch")
    assert argv[:2] == ["accelerate", "launch"] and "--num_processes" in argv
    _run_documented(argv, run_yaml, run_yaml / "accelerate")
    assert len(json.loads((run_yaml / "accelerate" / "memory.json").read_text())["base_bytes_per_process"]) == 2
    _assert_same_adapter(run_yaml / "accelerate", single)


def test_a_global_batch_that_does_not_divide_is_explained():
    from qlora_lite.config import TrainConfig
    from qlora_lite.errors import ConfigError

    cfg = TrainConfig(global_batch_size=12, grad_accum=2)
    assert cfg.per_process_batch(3) == 2 and cfg.per_process_batch(1) == 6
    with pytest.raises(ConfigError, match=r"does not divide into 4 process\(es\) x grad_accum 2; use a multiple of 8"):
        cfg.per_process_batch(4)


def test_fsdp_keeps_parameter_counts_state_dict_keys_and_outputs(tiny_model_dir):
    """Sharding converts nothing: the NF4 storage is already frozen parameters, so the parameter
    count, the (bitsandbytes) state-dict keys and the logits are those of the unsharded model."""
    import torch.distributed as dist

    from qlora_lite.config import LoraConfig, QuantConfig
    from qlora_lite.fsdp import resident_base_bytes, shard_model
    from qlora_lite.inject import count_parameters
    from qlora_lite.load import load_model

    model, _ = load_model(tiny_model_dir, QuantConfig(backend="torch"), LoraConfig(r=4), device="cpu",
                          compute_dtype=torch.float32, with_tokenizer=False)
    count, keys, base_bytes = count_parameters(model), list(model.state_dict()), resident_base_bytes(model)
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    try:
        shard_model(model, torch.device("cpu"))
        assert count_parameters(model) == count and count.quantized > 0
        assert list(model.state_dict()) == keys and "model.layers.0.self_attn.q_proj.weight.absmax" in keys
        assert resident_base_bytes(model) == base_bytes  # one process keeps every shard
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, want, atol=0, rtol=0)
    finally:
        dist.destroy_process_group()


def test_fsdp_before_torch_2_13_shards_the_integer_storage_through_the_shim(tiny_model_dir, monkeypatch):
    """torch 2.11's FSDP2 calls `nn.Parameter(shard)` (requires_grad=True), which refuses uint8/int32 (the
    GPU check failed so); inside the shim that call gives a frozen integer parameter, and sharding through
    it (forced on here, where torch is 2.13) keeps the model's outputs."""
    import torch.distributed as dist
    from torch.distributed.fsdp._fully_shard import _fsdp_param

    import qlora_lite.fsdp as fsdp_module
    from qlora_lite.config import LoraConfig, QuantConfig
    from qlora_lite.load import load_model

    packed = torch.zeros(4, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="floating point"):
        torch.nn.Parameter(packed)  # the call torch 2.11 makes
    with fsdp_module._integer_parameters_allowed():
        shard = _fsdp_param.nn.Parameter(packed)
        assert not shard.requires_grad and shard.dtype == torch.uint8
        assert _fsdp_param.nn.Parameter(torch.zeros(2)).requires_grad  # floating tensors as before
    assert _fsdp_param.nn is torch.nn

    monkeypatch.setattr(fsdp_module, "_fsdp_refuses_integer_parameters", lambda: True)
    model, _ = load_model(tiny_model_dir, QuantConfig(backend="torch"), LoraConfig(r=4), device="cpu",
                          compute_dtype=torch.float32, with_tokenizer=False)
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    try:
        fsdp_module.shard_model(model, torch.device("cpu"))
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, want, atol=0, rtol=0)
    finally:
        dist.destroy_process_group()


def test_fsdp_uses_torch_adamw_even_where_paged_adamw_would_run():
    from qlora_lite.config import TrainConfig
    from qlora_lite.train import build_optimizer

    notes = []
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = build_optimizer(params, TrainConfig(fsdp=True), torch.device("cuda"), log=notes.append)
    assert type(optimizer) is torch.optim.AdamW and "FSDP" in notes[0]


def test_interrupting_the_launcher_checkpoints_every_process_at_the_same_step(run_yaml):
    """Ctrl-C on torchrun (the launcher forwards SIGTERM to its workers): all processes agree on the
    step, gather the FSDP shards, write one checkpoint, and the run resumes from it."""
    import signal
    import time

    from qlora_lite.train import latest_checkpoint

    out = run_yaml / "interrupted"
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "qlora_lite.cli", "train",
            "--config", str(run_yaml / "run.yaml"), "--out_dir", str(out), "--max_steps", "400", "--save_every",
            "400", "--fsdp"]
    log = run_yaml / "interrupted.log"
    with open(log, "w") as handle:  # a file, not a pipe: a full pipe would block the workers
        proc = subprocess.Popen(argv, cwd=run_yaml, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.DEVNULL, stderr=handle)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + HANG_S
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=HANG_S)
    stderr = log.read_text()
    ckpt = latest_checkpoint(out)
    assert ckpt is not None, stderr[-3000:]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["fsdp"] and 2 <= state["step"] < 400
    assert "checkpoint saved at step" in stderr
    assert read_adapter(ckpt / "adapter").modules  # the gathered adapter is complete and readable
    _cli(["train", "--config", str(run_yaml / "run.yaml"), "--out_dir", str(out), "--max_steps",
          str(state["step"] + 2), "--save_every", "400", "--fsdp", "--resume"], run_yaml, nproc=2)
    assert json.loads(metrics.read_text().splitlines()[-1])["step"] == state["step"] + 2


def test_a_missing_backend_is_a_clear_error(monkeypatch):
    import torch.distributed as dist

    from qlora_lite.errors import TrainingError
    from qlora_lite.fsdp import ensure_process_group

    monkeypatch.setattr(dist, "is_gloo_available", lambda: False)
    with pytest.raises(TrainingError, match="needs the gloo backend, which this PyTorch build lacks"):
        ensure_process_group(torch.device("cpu"))
    monkeypatch.setattr(dist, "is_available", lambda: False)
    with pytest.raises(TrainingError, match="fsdp=true needs torch.distributed"):
        ensure_process_group(torch.device("cuda"))


def test_the_documented_70b_plan_is_what_the_planner_prints(capsys):
    """docs/distributed.md's 70B-on-2x24GB command runs as written (dashes, bare --fsdp) and prints the table's total."""
    from qlora_lite.cli import main

    doc = (ROOT / "docs" / "distributed.md").read_text()
    command = re.search(r"`(qlora-lite memory --model llama-2-70b[^`]*)`", doc).group(1)
    assert main(shlex.split(command)[1:]) == 0
    printed = capsys.readouterr().out
    total = re.search(r"total \(peak per GPU\)\s+([\d.]+)", printed).group(1)
    assert "2 ranks (FSDP)" in printed and "fits RTX5090" in printed
    assert f"| **total** | **{float(total):.2f}** |" in doc


@pytest.mark.gpu
def test_single_gpu_fsdp_smoke(run_yaml):
    """The FSDP path on one GPU (NCCL, quantized on the GPU, bytes staged on the host, shards moved back)."""
    for name, extra in (("gpu_plain", []), ("gpu_fsdp", ["--fsdp"])):
        _cli(["train", "--config", str(run_yaml / "run.yaml"), "--out_dir", str(run_yaml / name), "--device", "cuda",
              "--max_steps", "6", "--quant.backend", "bitsandbytes", *extra], run_yaml)
    plain, fsdp = (json.loads((run_yaml / n / "memory.json").read_text()) for n in ("gpu_plain", "gpu_fsdp"))
    assert plain["base_bytes_per_process"] == fsdp["base_bytes_per_process"]
    losses = _losses(run_yaml / "gpu_fsdp")
    assert losses[-1] < losses[0]
    _assert_same_adapter(run_yaml / "gpu_fsdp", run_yaml / "gpu_plain", atol=5e-3, rtol=5e-2)


def test_accelerates_own_fsdp_or_deepspeed_is_refused_with_the_fix():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from qlora_lite.errors import TrainingError
    from qlora_lite.train import check_launcher

    check_launcher(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(TrainingError, match="launch without it .* and pass --fsdp"):
            check_launcher(SimpleNamespace(distributed_type=kind))
