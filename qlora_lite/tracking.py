"""Training metrics in the dashboards users already watch, through accelerate's tracker classes.

``report_to: [tensorboard, wandb, mlflow, trackio]`` (any subset; default none). Every tracker writes
locally under out_dir, offline:

    tensorboard  out_dir/tensorboard/<run>/events.out.tfevents.*   (accelerate's TensorBoardTracker)
    wandb        out_dir/wandb/offline-run-*/   (mode=offline unless WANDB_MODE says otherwise; `wandb sync`
                 uploads it later)
    mlflow       out_dir/mlruns/   (a file store, unless MLFLOW_TRACKING_URI names another; MLflow 3 wants
                 MLFLOW_ALLOW_FILE_STORE=true for it, set unless already set)
    trackio      out_dir/trackio/  (unless TRACKIO_DIR names another; `trackio show` opens it). trackio reads
                 its directory once per process: a later run in the same process warns where it writes

The run's config is stored once (flattened: ``lora.r``); each logged step sends the same numbers as
metrics.jsonl (loss, eval loss, learning rate, grad norm, tokens/s, memory measured) plus the
planner's predicted memory. The tracker libraries are an optional extra (``pip install
qlora-lite[trackers]``); metrics.jsonl and the PNG need none of them.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["TRACKERS", "Trackers", "check_trackers", "flatten_config"]

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
MAX_VALUE_CHARS = 500  # a config value longer than this (a list of records as `data`) is cut for the dashboards
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def check_trackers(report_to: Any) -> list[str]:
    """Problems with a `report_to` value (for the config's aggregated error)."""
    if not isinstance(report_to, (list, tuple)) or not all(isinstance(name, str) for name in report_to):
        return [f"report_to={report_to!r} must be a list of tracker names ({', '.join(TRACKERS)})"]
    return [f"report_to: unknown tracker {name!r}; use any of {', '.join(TRACKERS)}"
            for name in report_to if name not in TRACKERS]


def flatten_config(values: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str | None]:
    """Nested config → one level of scalars (``lora.r``), what every tracker's hyperparameter view takes."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:  # lists (target_modules, report_to, data mixtures), paths; records passed in Python are cut short
            text = str(value)
            flat[name] = text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "…"
    return flat


def _tracker(name: str, project: str, run_name: str, out_dir: Path):
    """accelerate's tracker for `name`, set up to write under out_dir without a network."""
    import importlib.util

    from accelerate import tracking

    if importlib.util.find_spec(_MODULES[name]) is None:
        from .errors import ConfigError

        raise ConfigError(f"report_to includes {name!r} but the {name} package is not installed; "
                          f"pip install 'qlora-lite[trackers]' (or {name}) or remove it", "report_to")
    if name == "tensorboard":
        return tracking.TensorBoardTracker(run_name, out_dir / "tensorboard")
    if name == "wandb":
        return tracking.WandBTracker(project, name=run_name, dir=str(out_dir),
                                     mode=os.environ.get("WANDB_MODE", "offline"))
    if name == "mlflow":
        import mlflow

        if "MLFLOW_TRACKING_URI" not in os.environ:
            mlflow.set_tracking_uri((out_dir / "mlruns").resolve().as_uri())
            # MLflow 3 refuses its file store unless opted in; the alternative (sqlite) needs SQLAlchemy
            # and Alembic, which mlflow-skinny leaves out. (Full mlflow's `mlflow ui --backend-store-uri` reads it.)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return tracking.MLflowTracker(experiment_name=project, logging_dir=str(out_dir / "mlruns"),
                                      run_name=run_name)
    _import_trackio(Path(os.environ.get("TRACKIO_DIR") or out_dir / "trackio"))
    return tracking.TrackioTracker(project, name=run_name)


def _import_trackio(directory: Path) -> None:
    """Import trackio so that it writes to `directory`: it reads TRACKIO_DIR once, when first imported."""
    if "trackio" not in sys.modules:
        previous = os.environ.get("TRACKIO_DIR")
        os.environ["TRACKIO_DIR"] = str(directory)
        try:
            import trackio  # noqa: F401
        finally:
            if previous is None:
                del os.environ["TRACKIO_DIR"]
            else:
                os.environ["TRACKIO_DIR"] = previous
    from trackio import utils

    if Path(utils.TRACKIO_DIR).resolve() != directory.resolve():  # a second run in this process
        warnings.warn(f"trackio writes this run to {utils.TRACKIO_DIR}, not {directory}: trackio fixes its "
                      "directory when first imported in a process; set TRACKIO_DIR before starting", stacklevel=3)


class Trackers:
    """The run's trackers: started with the config, then `log` per step and `finish` at the end.

    Make it on the main process only (elsewhere pass ``report_to=[]``): every process would otherwise
    write its own copy of the run.
    """

    def __init__(self, report_to: list[str], out_dir: str | Path, config: Mapping[str, Any], *,
                 project: str = "qlora-lite", constants: Mapping[str, float] | None = None):
        out_dir = Path(out_dir)
        self.constants = dict(constants or {})
        self.trackers = []
        for name in dict.fromkeys(report_to):  # once each, in the order given
            tracker = _tracker(name, project, out_dir.resolve().name, out_dir)
            tracker.start()
            tracker.store_init_configuration(flatten_config(config))
            self.trackers.append(tracker)

    def log(self, record: Mapping[str, Any], step: int) -> None:
        """Send the numbers of one metrics.jsonl record (not `step` itself; non-finite values are left out)."""
        if not self.trackers:
            return
        values = {k: v for k, v in {**record, **self.constants}.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
