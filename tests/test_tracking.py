"""report_to: each installed tracker writes its local files in a tiny training run (offline)."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import sys
import types
import warnings

import pytest

from qlora_lite.config import LoraConfig, QuantConfig, TrainConfig
from qlora_lite.errors import ConfigError
from qlora_lite.tracking import Trackers, check_trackers, flatten_config
from qlora_lite.train import train

INSTALLED = [name for name, module in (("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow"),
                                       ("trackio", "trackio")) if importlib.util.find_spec(module)]


def test_report_to_is_validated_and_the_config_flattened():
    assert check_trackers(["tensorboard", "wandb", "mlflow", "trackio"]) == []
    assert check_trackers(["tensorbord"]) == ["report_to: unknown tracker 'tensorbord'; use any of tensorboard, "
                                              "wandb, mlflow, trackio"]
    with pytest.raises(ConfigError, match="report_to"):
        TrainConfig(report_to="tensorboard")
    flat = flatten_config({"lora": {"r": 8, "target_modules": ["q_proj"]}, "seed": 0, "quant": None})
    assert flat == {"lora.r": 8, "lora.target_modules": "['q_proj']", "seed": 0, "quant": None}
    records = flatten_config({"data": [{"text": "x" * 100}] * 100})["data"]
    assert len(records) == 501 and records.endswith("…")


def test_a_tracker_that_is_not_installed_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match="'mlflow' but the mlflow package is not installed"):
        Trackers(["mlflow"], tmp_path, {})


@pytest.mark.skipif("tensorboard" not in INSTALLED, reason="needs the [trackers] extra (tensorboard)")
def test_each_tracker_writes_its_local_files_in_a_tiny_run(tiny_model_dir, memorize_data, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "TRACKIO_DIR"):  # unset here, and after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    out = tmp_path / "run"
    cfg = TrainConfig(model=str(tiny_model_dir), data=str(memorize_data), out_dir=str(out), seq_len=64, batch_size=4,
                      max_steps=3, warmup_steps=1, eval_every=2, progress=False, device="cpu", packing=True,
                      lora=LoraConfig(r=4, lora_alpha=8), quant=QuantConfig(backend="torch"), report_to=INSTALLED,
                      data_cache_dir=str(tmp_path / "cache"))
    train(cfg)
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    want = [(r["step"], round(r["loss"], 4)) for r in jsonl if "loss" in r]
    assert [step for step, _ in want] == [1, 2, 3]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "tensorboard").iterdir())))
    events.Reload()
    losses = [(e.step, round(e.value, 4)) for e in events.Scalars("loss")]
    assert losses == want
    assert {"lr", "grad_norm", "tokens_per_s", "rss_bytes", "eval_loss",
            "predicted_bytes"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("eval_loss")] == [0, 2, 3]
    if "wandb" in INSTALLED:
        runs = list((out / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    if "mlflow" in INSTALLED:  # read back through MLflow's client from the file store under out_dir
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
        (run,) = client.search_runs([client.get_experiment_by_name("qlora-lite").experiment_id])
        history = sorted((m.step, round(m.value, 4)) for m in client.get_metric_history(run.info.run_id, "loss"))
        assert history == want and run.data.params["lora.r"] == "4" and "predicted_bytes" in run.data.metrics
    if "trackio" in INSTALLED:  # trackio's SQLite database under out_dir, one row per logged step
        with sqlite3.connect(out / "trackio" / "qlora-lite.db") as db:
            rows = db.execute("SELECT step, metrics FROM metrics ORDER BY step").fetchall()
            (config,) = db.execute("SELECT config FROM configs").fetchone()
        assert [(step, round(json.loads(m)["loss"], 4)) for step, m in rows if "loss" in json.loads(m)] == want
        assert json.loads(config)["lora.r"] == 4


def test_trackio_directory_is_fixed_at_import_and_a_second_one_is_named(tmp_path, monkeypatch):
    """trackio reads TRACKIO_DIR once, at import (trackio.utils.TRACKIO_DIR); stood in for here by a module
    object, so that the real trackio is not imported with a directory of this test's choosing."""
    from qlora_lite import tracking

    utils = types.SimpleNamespace(TRACKIO_DIR=tmp_path / "first")
    monkeypatch.setitem(sys.modules, "trackio", types.SimpleNamespace(utils=utils))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracking._import_trackio(tmp_path / "first")
    with pytest.warns(UserWarning, match=f"trackio writes this run to {tmp_path / 'first'}, not {tmp_path / 'second'}"):
        tracking._import_trackio(tmp_path / "second")
