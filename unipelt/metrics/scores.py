"""GLUE metrics on plain arrays, with scikit-learn and scipy.

Degenerate inputs: when predictions or references are constant, Pearson and Spearman correlation are
undefined (scipy returns nan); we return 0.0, "no linear/rank relation", so that model selection and
averaging over seeds stay well defined. Matthews correlation is 0.0 in that case too (scikit-learn's
convention), and F1 is 0.0 when nothing is predicted positive and no reference is positive.
Empty or mismatched inputs and non-finite regression predictions raise ValueError.
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping, Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from unipelt.data.tasks import TaskSpec, get_task

ArrayLike = Sequence | np.ndarray


def accuracy(predictions: ArrayLike, references: ArrayLike) -> float:
    return float(skm.accuracy_score(references, predictions))


def f1(predictions: ArrayLike, references: ArrayLike) -> float:
    """Binary F1 of the positive class 1 (MRPC "equivalent", QQP "duplicate")."""
    return float(skm.f1_score(references, predictions, pos_label=1, average="binary", zero_division=0.0))


def mcc(predictions: ArrayLike, references: ArrayLike) -> float:
    return float(skm.matthews_corrcoef(references, predictions))


def pearson(predictions: ArrayLike, references: ArrayLike) -> float:
    return _correlation(stats.pearsonr, predictions, references)


def spearman(predictions: ArrayLike, references: ArrayLike) -> float:
    return _correlation(stats.spearmanr, predictions, references)


_METRIC_FNS = {"accuracy": accuracy, "f1": f1, "mcc": mcc, "pearson": pearson, "spearman": spearman}


def compute_metrics(
    task: str | TaskSpec,
    predictions: ArrayLike,
    references: ArrayLike,
    split: str | None = None,
) -> dict[str, float]:
    """All metrics of `task`, as plain floats keyed by the names in `TaskSpec.metrics`.

    Classification predictions are class ids (logits of shape (n, num_labels) are argmax-ed);
    regression predictions are floats (shape (n,) or (n, 1)). For MNLI, split "dev_mismatched" reports
    its accuracy as `accuracy_mm`; every other split reports `accuracy`.
    """
    spec = get_task(task)
    preds, refs = _prepare(spec, predictions, references)
    if spec.name == "mnli":
        key = "accuracy_mm" if split == "dev_mismatched" else "accuracy"
        return {key: accuracy(preds, refs)}
    return {name: _METRIC_FNS[name](preds, refs) for name in spec.metrics}


def main_score(task: str | TaskSpec, metrics: Mapping[str, float]) -> float:
    """The model-selection score: `metrics[task.main_metric]`."""
    spec = get_task(task)
    if spec.main_metric not in metrics:
        raise KeyError(
            f"metrics lack {spec.main_metric!r}, the main metric of {spec.name}; got keys {sorted(metrics)}"
        )
    return float(metrics[spec.main_metric])


def _prepare(spec: TaskSpec, predictions: ArrayLike, references: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    preds = np.asarray(predictions)
    refs = np.asarray(references)
    if spec.is_regression:
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        preds = _one_dim(preds.astype(np.float64), "predictions")
        refs = _one_dim(refs.astype(np.float64), "references")
        bad = int((~np.isfinite(preds)).sum())
        if bad:
            raise ValueError(f"{bad} of {preds.size} {spec.name} predictions are not finite (nan or inf)")
    else:
        if preds.ndim == 2 and preds.shape[1] == spec.num_labels:
            preds = preds.argmax(axis=1)
        preds = _class_ids(_one_dim(preds, "predictions"), spec, "predictions")
        refs = _class_ids(_one_dim(refs, "references"), spec, "references")
    if preds.size != refs.size:
        raise ValueError(f"got {preds.size} predictions but {refs.size} references")
    if preds.size == 0:
        raise ValueError("cannot compute metrics on zero examples")
    return preds, refs


def _one_dim(values: np.ndarray, what: str) -> np.ndarray:
    if values.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {values.shape}")
    return values


def _class_ids(values: np.ndarray, spec: TaskSpec, what: str) -> np.ndarray:
    """Integers in 0..num_labels-1 (integral floats such as 1.0 are accepted)."""
    if values.size and not np.issubdtype(values.dtype, np.integer):
        if not np.issubdtype(values.dtype, np.floating) or not np.all(np.mod(values, 1) == 0):
            raise ValueError(f"{spec.name} {what} must be class ids, got e.g. {values[:3].tolist()}")
    ids = values.astype(np.int64)
    out = (ids < 0) | (ids >= spec.num_labels)
    if out.any():
        raise ValueError(
            f"{spec.name} {what} must lie in 0..{spec.num_labels - 1}, got {ids[out][:3].tolist()}"
        )
    return ids


def _correlation(fn, predictions: ArrayLike, references: ArrayLike) -> float:
    preds = np.asarray(predictions, dtype=np.float64)
    refs = np.asarray(references, dtype=np.float64)
    if preds.size < 2 or np.ptp(preds) == 0 or np.ptp(refs) == 0:
        return 0.0  # undefined correlation: see the module docstring
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(fn(preds, refs)[0])
    return 0.0 if math.isnan(value) else value
