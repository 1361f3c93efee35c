"""GLUE metrics against hand-computed values, and the offline `evaluate.load(<local script>)` route."""

from __future__ import annotations

import math
from pathlib import Path

import evaluate
import numpy as np
import pytest

from unipelt.data.tasks import TASKS
from unipelt.metrics import GLUE_METRIC_PATH, compute_metrics, main_score

# preds [1,0,1,1] vs refs [1,1,0,1]: tp=2 fp=1 fn=1 tn=0 -> accuracy 2/4, precision = recall = 2/3 -> F1 2/3.
BIN_P, BIN_R = [1, 0, 1, 1], [1, 1, 0, 1]
# preds [1,1,0,0,1] vs refs [1,0,0,0,1]: tp=2 tn=2 fp=1 fn=0 -> MCC = (2*2 - 1*0) / sqrt(3*2*2*3) = 4/6.
MCC_P, MCC_R = [1, 1, 0, 0, 1], [1, 0, 0, 0, 1]
# x=[1,2,3], y=[1,2,4]: sum dx*dy = 3, sum dx^2 = 2, sum dy^2 = 14/3 -> r = 3 / sqrt(28/3); ranks agree -> rho 1.
REG_P, REG_R = [1.0, 2.0, 3.0], [1.0, 2.0, 4.0]
PEARSON = 3 / math.sqrt(28 / 3)
# ranks [1,2,3,4] vs [1,3,2,4]: sum d^2 = 2 -> rho = 1 - 6*2 / (4*15) = 0.8.
RANK_P, RANK_R = [0.1, 0.2, 0.3, 0.4], [1.0, 3.0, 2.0, 4.0]


def plain_floats(metrics):
    return all(type(v) is float for v in metrics.values())


def test_accuracy_tasks():
    for task in ("sst2", "qnli", "rte"):
        out = compute_metrics(task, BIN_P, BIN_R)
        assert out == {"accuracy": 0.5} and plain_floats(out)


def test_f1_tasks():
    for task in ("mrpc", "qqp"):
        out = compute_metrics(task, BIN_P, BIN_R)
        assert out == pytest.approx({"f1": 2 / 3, "accuracy": 0.5}) and plain_floats(out)
    # F1 is of class 1: swapping the classes changes it (tp=0 -> 0.0).
    assert compute_metrics("mrpc", [0, 1, 0, 0], [0, 0, 1, 0])["f1"] == 0.0


def test_mcc():
    out = compute_metrics("cola", MCC_P, MCC_R)
    assert out == pytest.approx({"mcc": 4 / 6}) and plain_floats(out)
    assert compute_metrics("cola", [0, 1, 0, 1], [1, 0, 1, 0])["mcc"] == pytest.approx(-1.0)


def test_stsb_pearson_spearman():
    out = compute_metrics("stsb", REG_P, REG_R)
    assert out == pytest.approx({"pearson": PEARSON, "spearman": 1.0}) and plain_floats(out)
    assert compute_metrics("stsb", RANK_P, RANK_R)["spearman"] == pytest.approx(0.8)


def test_mnli_matched_and_mismatched_keys():
    preds, refs = [0, 1, 2, 2], [0, 1, 1, 2]
    assert compute_metrics("mnli", preds, refs) == {"accuracy": 0.75}
    assert compute_metrics("mnli", preds, refs, split="dev_matched") == {"accuracy": 0.75}
    assert compute_metrics("mnli", preds, refs, split="dev_mismatched") == {"accuracy_mm": 0.75}


def test_keys_match_task_specs():
    for name, spec in TASKS.items():
        if name == "mnli":
            continue
        preds = [0.5, 1.5, 2.5] if spec.is_regression else [0, 1, 1]
        assert tuple(compute_metrics(name, preds, [0.0, 1.0, 2.0] if spec.is_regression else [0, 1, 0])) == spec.metrics


def test_logits_and_column_predictions():
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 3.0], [0.3, 0.2]])  # argmax -> [1, 0, 1, 0]
    assert compute_metrics("rte", logits, [1, 0, 0, 0]) == {"accuracy": 0.75}
    assert compute_metrics("stsb", np.array(REG_P)[:, None], REG_R)["pearson"] == pytest.approx(PEARSON)
    assert compute_metrics("rte", np.array([1.0, 0.0]), [1, 0]) == {"accuracy": 1.0}


def test_degenerate_inputs_give_zero_not_nan():
    assert compute_metrics("stsb", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == {"pearson": 0.0, "spearman": 0.0}
    assert compute_metrics("stsb", [1.0, 2.0, 3.0], [4.0, 4.0, 4.0]) == {"pearson": 0.0, "spearman": 0.0}
    assert compute_metrics("stsb", [1.0], [2.0]) == {"pearson": 0.0, "spearman": 0.0}
    assert compute_metrics("cola", [1, 1, 1], [0, 1, 1]) == {"mcc": 0.0}
    assert compute_metrics("mrpc", [0, 0, 0], [0, 0, 0]) == {"f1": 0.0, "accuracy": 1.0}


@pytest.mark.parametrize(
    "task,preds,refs,match",
    [
        ("rte", [1, 0], [1], "2 predictions but 1 references"),
        ("rte", [], [], "zero examples"),
        ("rte", [0, 2], [0, 1], r"rte predictions must lie in 0\.\.1, got \[2\]"),
        ("mnli", [0, 1], [0, -1], r"references must lie in 0\.\.2, got \[-1\]"),
        ("rte", [0.5, 1.0], [0, 1], "must be class ids"),
        ("stsb", [1.0, float("nan")], [1.0, 2.0], "1 of 2 stsb predictions are not finite"),
        ("rte", [[[1]]], [1], "one-dimensional"),
    ],
)
def test_bad_inputs_raise(task, preds, refs, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(task, preds, refs)


def test_main_score():
    assert main_score("mrpc", {"f1": 0.8, "accuracy": 0.7}) == 0.8
    assert main_score("cola", {"mcc": 0.3}) == 0.3
    assert main_score("stsb", {"pearson": 0.9, "spearman": 0.85}) == 0.85
    assert main_score(TASKS["mnli"], {"accuracy": 0.6, "accuracy_mm": 0.5}) == 0.6
    with pytest.raises(KeyError, match="main metric of mnli"):
        main_score("mnli", {"accuracy_mm": 0.5})


# --- evaluate.load(<local script>) --------------------------------------------------------------------


CASES = [
    ("rte", BIN_P, BIN_R, {}),
    ("mrpc", BIN_P, BIN_R, {}),
    ("cola", MCC_P, MCC_R, {}),
    ("stsb", REG_P, REG_R, {}),
    ("mnli", [0, 1, 2, 2], [0, 1, 1, 2], {"split": "dev_mismatched"}),
]


@pytest.mark.parametrize("task,preds,refs,kwargs", CASES)
def test_evaluate_local_script_matches(monkeypatch, task, preds, refs, kwargs):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    metric = evaluate.load(GLUE_METRIC_PATH, task)
    out = metric.compute(predictions=preds, references=refs, **kwargs)
    assert out == compute_metrics(task, preds, refs, **kwargs)


def test_evaluate_script_rejects_missing_config():
    with pytest.raises(KeyError, match="pass the task name as the config"):
        evaluate.load(GLUE_METRIC_PATH)


def test_evaluate_local_script_offline_with_fresh_cache_dir(monkeypatch, tmp_path):
    """The hub is switched off (tests/conftest.py sets these before evaluate is imported); loading still works."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert Path(GLUE_METRIC_PATH).is_file() and GLUE_METRIC_PATH.endswith("glue_metric.py")
    metric = evaluate.load(GLUE_METRIC_PATH, "qqp", cache_dir=str(tmp_path))
    assert metric.compute(predictions=BIN_P, references=BIN_R) == pytest.approx({"f1": 2 / 3, "accuracy": 0.5})
