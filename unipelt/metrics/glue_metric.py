"""GLUE metric as a local `evaluate` script, usable offline.

    evaluate.load(unipelt.metrics.GLUE_METRIC_PATH, "rte").compute(predictions=..., references=...)

evaluate's hub `glue` metric needs the network; this script does not. It delegates to
`unipelt.metrics.scores`, so both routes give the same numbers. The config name is the task name; pass
`split="dev_mismatched"` to `compute` for MNLI's `accuracy_mm`. evaluate copies this file into its module
cache and imports it there, so `unipelt` must be importable (installed, or on sys.path).
"""

import datasets
import evaluate

from unipelt.data.tasks import TASKS, get_task
from unipelt.metrics.scores import compute_metrics

_DESCRIPTION = "GLUE metrics (accuracy, binary F1, Matthews corr, Pearson/Spearman) computed locally."
_KWARGS_DESCRIPTION = """
Args:
    predictions: class ids, or floats for stsb.
    references: gold labels.
    split: optional GLUE split name; "dev_mismatched" makes MNLI report `accuracy_mm`.
Returns:
    dict of plain floats keyed by the task's metric names (cola: mcc; mrpc/qqp: f1, accuracy;
    stsb: pearson, spearman; mnli: accuracy or accuracy_mm; others: accuracy).
"""


class GlueMetric(evaluate.Metric):
    """One GLUE task's metrics; the evaluate config name selects the task."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in TASKS:
            raise KeyError(
                f"unknown GLUE config {self.config_name!r}; pass the task name as the config, one of: "
                f"{', '.join(sorted(TASKS))}"
            )
        value = "float64" if get_task(self.config_name).is_regression else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value(value), "references": datasets.Value(value)}
            ),
        )

    def _compute(self, predictions, references, split=None) -> dict:
        return compute_metrics(self.config_name, predictions, references, split=split)
