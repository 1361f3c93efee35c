"""Crash safety, numerical faults, reproducibility: a killed sweep resumes and finishes only what is missing, a
resumed run equals an uninterrupted one, NaN losses give failed records, identical runs give identical results."""
from __future__ import annotations

import csv
import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from unipelt.confdir import CONF_DIR
from unipelt.run import JobFailed, run_cli

TINY = ["model.num_layers=1", "data.k=8", "data.dev_size=16", "data.max_length=32", "train.epochs=2",
        "output.progress=false"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
TIMING = ("epoch_s",)  # history fields that measure time (may differ between identical runs)


def config(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "record.json").read_text())


def log_epochs(run_dir: Path) -> list[int]:
    with open(run_dir / "log.csv") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


def cli(args: list[str], runs: Path, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "unipelt.run", *args, f"output.runs_dir={runs}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, **kwargs)


# --- crash safety ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_mid_sweep_then_the_same_command_finishes_only_the_missing_run_by_resuming(tmp_path):
    runs = tmp_path / "runs"
    args = ["-m", "data.seed=111,222", *TINY, "data.k=32", "train.epochs=8", "train.patience=100",
            "runtime.threads=1", "hydra/launcher=basic", "group.enabled=false"]  # one run after another (the
    # grouped twin of this test, a kill in the middle of a group, is in test_grouping.py)
    first_id, second_id = "rte-lora-k32-d111-s42", "rte-lora-k32-d222-s42"
    state = runs / second_id / "checkpoint" / "state.json"
    proc = cli(args, runs)
    try:
        deadline = time.monotonic() + 240
        while not (state.is_file() and json.loads(state.read_text())["epoch"] >= 2):
            assert proc.poll() is None, f"the sweep ended before it could be killed: {proc.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "the second run never reached epoch 2"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    first_record = (runs / first_id / "record.json").read_bytes()
    assert json.loads(first_record)["status"] == "complete"
    assert not (runs / second_id / "record.json").exists(), "a killed run must leave no record"
    assert not list((runs / second_id).glob(".record.json*"))
    killed = json.loads(state.read_text())  # the last checkpoint the killed process finished
    done = killed["epoch"]
    assert done >= 2
    # log.csv is rewritten after each checkpoint: killed in between, it may lag one epoch (resuming repairs it)
    assert log_epochs(runs / second_id) in (list(range(1, done + 1)), list(range(1, done)))

    rerun = cli(args, runs)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    assert f"skip {first_id}: complete record exists" in out
    assert (runs / first_id / "record.json").read_bytes() == first_record
    rec = record(runs / second_id)
    assert rec["status"] == "complete" and rec["failure"] is None
    assert rec["resumed_from_epoch"] == done
    assert [row["epoch"] for row in rec["history"]] == list(range(1, 9)) and rec["epochs_run"] == 8
    # The finished epochs were not redone: their rows (timings included) are the killed process's own.
    assert rec["history"][:done] == killed["history"]
    assert log_epochs(runs / second_id) == list(range(1, 9))
    assert not (runs / second_id / "checkpoint").exists()
    assert not list((runs / second_id).rglob("*.tmp")), "temp files of interrupted writes are cleaned up"
    assert len(list(runs.glob("*/record.json"))) == 2


def run_to_failure(overrides, code=1):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(config(*overrides))
    assert exit_info.value.code == code


def test_resumed_run_equals_an_uninterrupted_one_and_identical_runs_are_bit_identical(tmp_path, monkeypatch, capsys):
    base = [*TINY, "method=unipelt_apl", "data.k=16", "train.batch_size=8", "train.epochs=4", "train.patience=100"]
    rid = "rte-unipelt_apl-k16-d111-s42"
    a, b, c = (tmp_path / name for name in "abc")
    run_cli(config(*base, f"output.runs_dir={a}"))
    run_cli(config(*base, f"output.runs_dir={b}"))

    # Reproducibility: same config and seeds -> identical metrics, saved tensors (bytes), split ids.
    ra, rb = record(a / rid), record(b / rid)
    for key in ("test_score", "dev_score", "metrics", "best_epoch", "epochs_run", "steps", "gates", "split_hash",
                "params", "versions"):
        assert ra[key] == rb[key], key
    assert untimed(ra["history"]) == untimed(rb["history"])
    assert (a / rid / "modules" / "weights.safetensors").read_bytes() == \
        (b / rid / "modules" / "weights.safetensors").read_bytes()
    assert ra["config"] == {**rb["config"], "output": ra["config"]["output"]}
    assert len(ra["split_hash"]) == 64

    # A full disk while checkpointing epoch 3 (after its trainable tensors were written): the run fails with a
    # failed record, state.json still names epoch 2, and the record says what happened.
    import unipelt.training.checkpoint as ckpt

    real_save = ckpt.save_tensors

    def disk_full_at_epoch_3(path, tensors):
        if Path(path).name == "optimizer-e3.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(path, tensors)

    monkeypatch.setattr(ckpt, "save_tensors", disk_full_at_epoch_3)
    run_to_failure([*base, f"output.runs_dir={c}"])
    monkeypatch.undo()
    assert "unipelt: run failed: " + rid + ": OSError: [Errno 28] No space left on device" in capsys.readouterr().err
    failed = record(c / rid)
    assert failed["status"] == "failed" and failed["test_score"] is None
    assert failed["failure"]["type"] == "OSError" and failed["failure"]["epoch"] == 3
    state_file = c / rid / "checkpoint" / "state.json"
    state_bytes = state_file.read_bytes()
    assert json.loads(state_bytes)["epoch"] == 2

    # Resuming under other settings is refused (the checkpoint is kept); under the same settings it resumes.
    run_to_failure([*base, f"output.runs_dir={c}", "train.lr=0.001"], code=2)
    err = capsys.readouterr().err
    assert "(epoch 2) was written by a run with different settings (train.lr: 0.0005 -> 0.001)" in err
    assert state_file.read_bytes() == state_bytes
    run_cli(config(*base, f"output.runs_dir={c}"))
    rc = record(c / rid)
    assert rc["status"] == "complete" and rc["resumed_from_epoch"] == 2 and rc["failure"] is None
    for key in ("test_score", "dev_score", "metrics", "best_epoch", "epochs_run", "steps", "gates", "split_hash"):
        assert rc[key] == ra[key], key
    assert untimed(rc["history"]) == untimed(ra["history"])
    assert log_epochs(c / rid) == [1, 2, 3, 4]
    wa = load_file(str(a / rid / "modules" / "weights.safetensors"))
    wc = load_file(str(c / rid / "modules" / "weights.safetensors"))
    assert wa.keys() == wc.keys() and all(torch.equal(wa[k], wc[k]) for k in wa)
    assert not (c / rid / "checkpoint").exists()


# --- numerical faults -------------------------------------------------------------------------------------------
def test_nan_loss_gives_a_failed_record_exit_1_and_a_retry_then_completes(tmp_path, capsys):
    from unipelt.report.cli import build_report
    from unipelt.report.records import load_records

    runs = tmp_path / "runs"
    rid = "rte-lora-k8-d111-s42"
    run_to_failure([*TINY, f"output.runs_dir={runs}", "train.inject_nan_at_step=2"])
    err = capsys.readouterr().err
    assert f"unipelt: run failed: {rid}: loss is not finite (NaN/inf) at step 2 (epoch 2)" in err
    rec = record(runs / rid)
    assert rec["status"] == "failed" and rec["test_score"] is None and rec["dev_score"] is None
    assert rec["failure"]["step"] == 2 and rec["failure"]["epoch"] == 2 and rec["failure"]["type"] == "TrainingDiverged"
    assert rec["epochs_run"] == 1 and rec["split_hash"] and rec["config"]["train"]["inject_nan_at_step"] == 2
    assert not (runs / rid / "checkpoint").exists(), "a diverged run's checkpoint is discarded"
    assert not (runs / rid / "modules").exists()

    run_cli(config(*TINY, f"output.runs_dir={runs}", "data.seed=222"))  # one complete run for the report
    out = tmp_path / "report"
    build_report(runs, out, plots=False, expected_seeds=1)
    failed_table = (out / "failed_runs.csv").read_text()
    assert rid in failed_table and "not finite" in failed_table
    aggregate = json.loads((out / "aggregate.json").read_text())
    assert [row["n"] for row in aggregate if row["method"] == "lora"] == [1], aggregate

    # A failed record does not count as complete: the same run is retried (and, without the fault, completes).
    stale = runs / rid / ".record.json.x1y2.tmp"  # as left by a process killed while writing its record
    stale.write_text('{"status": "comp')
    run_cli(config(*TINY, f"output.runs_dir={runs}"))
    assert not stale.exists()
    rec = record(runs / rid)
    assert rec["status"] == "complete" and rec["failure"] is None and rec["resumed_from_epoch"] == 0
    assert log_epochs(runs / rid) == [1, 2]
    rs = load_records(runs)
    assert not rs.failed and len(rs.records) == 2


@pytest.mark.slow
def test_a_failed_job_does_not_stop_a_multirun_which_then_exits_1(tmp_path):
    runs = tmp_path / "runs"
    proc = cli(["-m", "data.k=0,8", *(o for o in TINY if not o.startswith("data.k="))], runs)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert "unipelt: error: data.k: k must be a positive integer or 'full', got 0" in err
    assert "Traceback" not in err
    assert record(runs / "rte-lora-k8-d111-s42")["status"] == "complete"


def test_multirun_job_failure_is_a_compact_hydra_error(tmp_path, capsys):
    with pytest.raises(JobFailed, match="k must be a positive integer"):
        run_cli(config(*TINY, "data.k=0", f"output.runs_dir={tmp_path}"), multirun=True)
    assert not any(tmp_path.iterdir())


# --- atomic writes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_a_failed_record_write_leaves_the_old_record_intact_and_no_partial_file(tmp_path, monkeypatch, where):
    import unipelt.io as uio
    from unipelt.training.record import write_record

    path = tmp_path / "run" / "record.json"
    write_record(path, {"status": "complete", "test_score": 0.5})
    old = path.read_bytes()
    new = tmp_path / "new" / "record.json"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "fsync":  # the temp file is fully written, then flushing it to disk fails
        monkeypatch.setattr(uio, "_fsync_path", disk_full)
    else:  # the rename fails
        monkeypatch.setattr(uio.os, "replace", disk_full)
    for target in (path, new):
        with pytest.raises(OSError, match="No space left"):
            write_record(target, {"status": "complete", "test_score": 0.9, "big": "x" * 100_000})
    assert path.read_bytes() == old
    assert not new.exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["record.json"]


def test_checkpoint_state_is_written_last_and_never_names_a_missing_file(tmp_path, monkeypatch):
    """Killed between writing epoch 2's tensors and its state.json, a checkpoint still resumes from epoch 1."""
    from unipelt.training.checkpoint import Checkpointer

    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    param.grad = torch.ones(3)
    optimizer.step()
    progress = {"step": 1, "best_score": 0.5, "best_epoch": 1, "bad_epochs": 0, "history": [], "train_time": 0.0,
                "dev_metrics": {}}
    ckpt = Checkpointer(tmp_path / "checkpoint", {"train": {"lr": 0.1}})
    ckpt.save(1, {"p": param}, {"p": param}, optimizer, scheduler, progress)
    saved = param.detach().clone()

    import unipelt.training.checkpoint as module

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for SIGKILL: nothing after this point runs

    monkeypatch.setattr(module, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(2, {"p": param * 2}, None, optimizer, scheduler, {**progress, "step": 2})
    monkeypatch.undo()
    state = ckpt.load()
    assert state["epoch"] == 1 and torch.equal(state["trainable"]["p"], saved)
    assert torch.equal(state["optimizer_state"]["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


# --- safe loading -----------------------------------------------------------------------------------------------
def test_a_pickle_disguised_as_weights_is_refused_and_never_executed(tmp_path):
    from helpers import model_with

    from unipelt import ModuleLoadError, PeltModel, load_task, save_task, tiny_encoder

    folder = save_task(model_with("lora"), tmp_path / "m")
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / "weights.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModuleLoadError, match="weights.safetensors: not a readable safetensors file"):
        load_task(PeltModel(tiny_encoder(seed=0)), folder)
    (folder / "weights.safetensors").unlink()
    (folder / "state").write_bytes(pickle.dumps(Payload()))  # no suffix at all: recognised by content
    with pytest.raises(ModuleLoadError, match=r"contains pickle file\(s\) \['state'\]"):
        load_task(PeltModel(tiny_encoder(seed=0)), folder)
    assert not marker.exists()


def test_sparse_checkpoints_still_resume_to_the_uninterrupted_result(tmp_path, monkeypatch, capsys):
    """train.checkpoint_every_s > 0 skips checkpoints; a crash then resumes from the last one written, with the
    best state of that moment (a new best found at a skipped epoch must still reach the next checkpoint)."""
    from unipelt.training import trainer as trainer_mod

    base = [*TINY, "method=lora", "data.k=16", "train.batch_size=8", "train.epochs=5", "train.patience=100",
            "group.enabled=false"]  # the per-run trainer's checkpoint interval (grouped: test_grouping.py)
    rid = "rte-lora-k16-d111-s42"
    a, b = tmp_path / "a", tmp_path / "b"
    run_cli(config(*base, f"output.runs_dir={a}"))
    saved_epochs = []
    real_save = trainer_mod.Checkpointer.save

    def counting_save(self, epoch, *args, **kwargs):
        saved_epochs.append(epoch)
        return real_save(self, epoch, *args, **kwargs)

    monkeypatch.setattr(trainer_mod.Checkpointer, "save", counting_save)
    monkeypatch.setattr(trainer_mod.Trainer, "_checkpoint_due", lambda self, epoch, last: epoch in (2, 4))
    real_log = trainer_mod.Trainer._write_log

    def crash_after_epoch_5(self, history):
        if len(history) == 5 and self.state.get("resumed_from_epoch") == 0:
            raise OSError(errno.EIO, "simulated crash")
        real_log(self, history)

    monkeypatch.setattr(trainer_mod.Trainer, "_write_log", crash_after_epoch_5)
    run_to_failure([*base, "train.checkpoint_every_s=30", f"output.runs_dir={b}"])
    assert saved_epochs == [2, 4]
    assert json.loads((b / rid / "checkpoint" / "state.json").read_text())["epoch"] == 4
    run_cli(config(*base, "train.checkpoint_every_s=30", f"output.runs_dir={b}"))
    ra, rb = record(a / rid), record(b / rid)
    assert rb["status"] == "complete" and rb["resumed_from_epoch"] == 4
    for key in ("test_score", "dev_score", "metrics", "best_epoch", "epochs_run", "steps"):
        assert rb[key] == ra[key], key
    assert untimed(rb["history"]) == untimed(ra["history"])
    assert log_epochs(b / rid) == [1, 2, 3, 4, 5]
    wa = load_file(str(a / rid / "modules" / "weights.safetensors"))
    wb = load_file(str(b / rid / "modules" / "weights.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_interval_must_be_a_non_negative_number():
    from unipelt.training.trainer import TrainSettings

    with pytest.raises(ValueError, match=r"train.checkpoint_every_s must be a number of seconds >= 0, got -1"):
        TrainSettings(checkpoint_every_s=-1)
