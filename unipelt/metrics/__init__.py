"""GLUE metrics: plain functions, plus a local `evaluate` script (GLUE_METRIC_PATH) that works offline."""

from pathlib import Path

from unipelt.metrics.scores import accuracy, compute_metrics, f1, main_score, mcc, pearson, spearman

GLUE_METRIC_PATH: str = str(Path(__file__).resolve().with_name("glue_metric.py"))

__all__ = ["GLUE_METRIC_PATH", "accuracy", "compute_metrics", "f1", "main_score", "mcc", "pearson", "spearman"]
