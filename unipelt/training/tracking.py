"""Experiment trackers (`train.log_with`): TensorBoard, Weights & Biases or MLflow, through accelerate's tracker
classes. One small class for any training loop:

    tracker = RunTracker(settings.log_with, run_dir, run_name, config)   # log_with None: does nothing
    tracker.log({"train_loss": 0.3, "dev_score": 0.8, "lr": 1e-4}, step=120)
    tracker.close()

Where the curves go: TensorBoard event files under `<run_dir>/tensorboard/<run_name>/` (`tensorboard --logdir
runs/` shows every run by name); W&B project `$WANDB_PROJECT` (default "unipelt"), run named after the run id,
files under the run folder; MLflow experiment `$MLFLOW_EXPERIMENT_NAME` (default "unipelt") at the usual
`$MLFLOW_TRACKING_URI`, run named after the run id. The packages are optional extras:
`pip install "unipelt[tensorboard]"` (or `[wandb]`, `[mlflow]`).
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # name -> package it needs


class TrackerError(ValueError):
    """An unknown tracker, or a tracker whose package is not installed."""


def check_log_with(log_with, need_package: bool = True) -> str | None:
    """The tracker name (or None); a clear error for an unknown one or (if `need_package`) a missing package."""
    if log_with is None:
        return None
    if not isinstance(log_with, str) or log_with not in TRACKERS:
        raise TrackerError(f"train.log_with={log_with!r} is not a known tracker; allowed: "
                           f"{', '.join(TRACKERS)} or null (no tracker; log.csv is always written)")
    package = TRACKERS[log_with]
    if need_package and importlib.util.find_spec(package) is None:
        raise TrackerError(f"train.log_with={log_with} needs the {package!r} package, which is not installed: "
                           f"pip install 'unipelt[{log_with}]' (or pip install {package})")
    return log_with


def _flat_hparams(config: dict | None, prefix: str = "") -> dict:
    """A nested config as flat `a.b.c` keys with str/int/float/bool values (what every tracker accepts)."""
    out = {}
    for key, value in (config or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_hparams(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:  # None, lists
            out[name] = json.dumps(value, default=str)
    return out


class RunTracker:
    """Per-epoch metrics of one run sent to an experiment tracker (or nowhere, when `log_with` is None)."""

    def __init__(self, log_with: str | None, run_dir: str | Path, run_name: str, config: dict | None = None) -> None:
        self.name = check_log_with(log_with)
        self.run_dir = Path(run_dir)
        self.tracker = None
        if self.name is None:
            return
        from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

        if self.name == "tensorboard":
            tracker = TensorBoardTracker(run_name, self.run_dir / "tensorboard")
        elif self.name == "wandb":
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tracker = WandBTracker(os.environ.get("WANDB_PROJECT", "unipelt"), name=run_name, dir=str(self.run_dir))
        else:
            tracker = MLflowTracker(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "unipelt"),
                                    run_name=run_name)
        tracker.start()
        self.tracker = tracker
        if config:
            tracker.store_init_configuration(_flat_hparams(config))

    @property
    def log_dir(self) -> Path | None:
        """TensorBoard's event-file folder (None for other trackers)."""
        return Path(self.tracker.logging_dir) if self.name == "tensorboard" else None

    def log(self, row: dict, step: int) -> None:
        """Log the numeric values of `row` at `step` (non-numbers are skipped)."""
        if self.tracker is None:
            return
        values = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.tracker.log(values, step=step)
        if self.name == "tensorboard":
            self.tracker.writer.flush()  # on disk after every epoch: a killed run keeps its curves

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None
