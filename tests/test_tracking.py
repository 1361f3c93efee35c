"""Experiment trackers (train.log_with): TensorBoard curves written and read back with tensorboard's own reader;
an unknown tracker or a missing package is a clear error before any work, with nothing written."""
from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from unipelt.confdir import CONF_DIR
from unipelt.run import execute
from unipelt.training import tracking
from unipelt.training.tracking import RunTracker, TrackerError

pytest.importorskip("tensorboard", reason="tensorboard is not installed (it is in the dev extra)")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TINY = ["model.num_layers=1", "data.k=8", "data.dev_size=16", "data.max_length=32", "train.epochs=3",
        "output.progress=false", "task=rte", "method=lora"]


def config(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_run_tracker_writes_tensorboard_scalars(tmp_path):
    tracker = RunTracker("tensorboard", tmp_path / "run", "my-run", {"train": {"lr": 1e-4, "max_steps": None}})
    rows = [{"train_loss": 0.9, "dev_score": 0.5, "lr": 1e-4, "note": "skipped"},
            {"train_loss": 0.7, "dev_score": 0.625, "lr": 5e-5, "note": "skipped"}]
    for step, row in zip((10, 20), rows):
        tracker.log(row, step=step)
    log_dir = tracker.log_dir
    tracker.close()
    assert log_dir == tmp_path / "run" / "tensorboard" / "my-run"
    scalars = read_scalars(log_dir)
    assert set(scalars) == {"train_loss", "dev_score", "lr"}
    assert [s for s, _ in scalars["train_loss"]] == [10, 20]
    assert [v for _, v in scalars["dev_score"]] == pytest.approx([0.5, 0.625])
    assert [v for _, v in scalars["lr"]] == pytest.approx([1e-4, 5e-5])


def test_no_tracker_writes_nothing(tmp_path):
    tracker = RunTracker(None, tmp_path / "run", "r", {"a": 1})
    tracker.log({"train_loss": 1.0}, step=1)
    tracker.close()
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_training_run_logs_every_epoch_to_tensorboard(tmp_path):
    record = execute(config(*TINY, "train.log_with=tensorboard", f"output.runs_dir={tmp_path}"))
    run_dir = tmp_path / record["run_id"]
    scalars = read_scalars(run_dir / "tensorboard" / record["run_id"])
    history = record["history"]
    assert len(history) == 3
    for key in ("train_loss", "dev_score", "lr"):
        assert [s for s, _ in scalars[key]] == [row["step"] for row in history], key
        assert [v for _, v in scalars[key]] == pytest.approx([row[key] for row in history], rel=1e-6), key
    assert [v for _, v in scalars["epoch"]] == [1, 2, 3]
    assert record["config"]["train"]["log_with"] == "tensorboard"


@pytest.mark.parametrize("value,message", [
    ("tensorbord", "train.log_with='tensorbord' is not a known tracker; allowed: tensorboard, wandb, mlflow or null"),
    ("wandb", "train.log_with=wandb needs the 'wandb' package, which is not installed: pip install 'unipelt[wandb]'"),
    ("mlflow", "train.log_with=mlflow needs the 'mlflow' package"),
])
def test_bad_tracker_is_a_clear_error_before_any_work(tmp_path, monkeypatch, value, message):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "mlflow") else real(name, *a))
    with pytest.raises(ValueError) as err:
        execute(config(*TINY, f"train.log_with={value}", f"output.runs_dir={tmp_path}"))
    assert message in str(err.value)
    assert not any(tmp_path.iterdir()), "a rejected run must not leave files behind"


def test_log_with_does_not_change_a_runs_identity():
    from unipelt.training.record import config_diff

    a = json.loads(json.dumps({"train": {"lr": 1e-4, "log_with": None}}))
    b = {"train": {"lr": 1e-4, "log_with": "tensorboard"}}
    assert config_diff(a, b) == []
