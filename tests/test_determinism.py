"""train.deterministic: torch's deterministic kernels while a run trains, in both trainers, restored afterwards."""
from __future__ import annotations

import os

import pytest
import torch
from test_runner import TINY, config

from unipelt.grouping.trainer import GroupTrainer
from unipelt.run import execute
from unipelt.training.determinism import CUBLAS_WORKSPACE, deterministic_algorithms
from unipelt.training.record import config_diff
from unipelt.training.trainer import Trainer, TrainSettings


def test_the_setting_must_be_a_boolean():
    with pytest.raises(ValueError, match=r"train.deterministic must be true or false, got 'yes'"):
        TrainSettings(deterministic="yes")


def test_the_mode_is_on_inside_the_block_and_restored_after(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(False):
        assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with pytest.raises(KeyError):
        with deterministic_algorithms(True):
            assert torch.are_deterministic_algorithms_enabled()
            assert not torch.is_deterministic_algorithms_warn_only_enabled()  # warn_only keeps flash's atomics
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
            raise KeyError  # a failing training still gives the mode back
    assert not torch.are_deterministic_algorithms_enabled()
    # an outer mode (a user's own) survives a run's block
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with deterministic_algorithms(True):
            pass
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("method,trainer", [("finetune", Trainer), ("lora", GroupTrainer)])
def test_runs_train_in_deterministic_mode_when_asked_and_records_say_so(method, trainer, tmp_path, monkeypatch):
    seen = []
    real = trainer._fit

    def spy(self, *args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(trainer, "_fit", spy)
    common = [*TINY, f"method={method}", "output.save_modules=false"]
    plain = execute(config(*common, f"output.runs_dir={tmp_path / 'a'}"))
    det = execute(config(*common, "train.deterministic=true", f"output.runs_dir={tmp_path / 'b'}"))
    assert seen == [False, True]
    assert not torch.are_deterministic_algorithms_enabled()
    assert plain["config"]["train"]["deterministic"] is False and det["config"]["train"]["deterministic"] is True
    # on CPU the kernels are deterministic anyway: the same run trains the same way in both modes
    assert det["test_score"] == pytest.approx(plain["test_score"], abs=1e-6)
    assert [h["train_loss"] for h in det["history"]] == pytest.approx([h["train_loss"] for h in plain["history"]])


def test_records_from_before_the_setting_count_as_not_deterministic():
    old = {"train": {"lr": 1e-4}}
    assert config_diff(old, {"train": {"lr": 1e-4, "deterministic": False}}) == []
    assert config_diff(old, {"train": {"lr": 1e-4, "deterministic": True}}) == [
        "train.deterministic: (absent, i.e. False) -> True"]
