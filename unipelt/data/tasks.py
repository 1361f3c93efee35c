"""GLUE task specifications: the single source of truth for fields, labels, splits and metrics.

Everything else (loading, k-shot splitting, metrics, model heads) reads these specs instead of
hard-coding per-task facts, so a task is described in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_HUB_SPLITS = {"train": "train", "dev": "validation"}
_MNLI_HUB_SPLITS = {
    "train": "train",
    "dev_matched": "validation_matched",
    "dev_mismatched": "validation_mismatched",
}


@dataclass(frozen=True)
class TaskSpec:
    """Static facts about one GLUE task.

    `metrics` are the keys `compute_metrics` can return for the task; `main_metric` is the one used for
    model selection (F1 where the task has it, else Matthews correlation, else Spearman, else accuracy).
    `test_splits` are the GLUE dev splits, which serve as the test sets of the low-resource protocol.
    `hub_splits` maps our split names to the split names of the HF `nyu-mll/glue` dataset.
    """

    name: str
    text_fields: tuple[str, ...]
    num_labels: int
    is_regression: bool
    metrics: tuple[str, ...]
    main_metric: str
    train_split: str = "train"
    test_splits: tuple[str, ...] = ("dev",)
    # hash=False keeps the spec hashable (a dict is not); compare=True still compares it.
    hub_splits: dict[str, str] = field(default_factory=lambda: dict(_HUB_SPLITS), hash=False)

    def __post_init__(self) -> None:
        if not 1 <= len(self.text_fields) <= 2:
            raise ValueError(f"task {self.name!r}: text_fields must hold 1 or 2 names, got {self.text_fields}")
        if self.main_metric not in self.metrics:
            raise ValueError(f"task {self.name!r}: main_metric {self.main_metric!r} not in {self.metrics}")
        if self.is_regression != (self.num_labels == 1):
            raise ValueError(f"task {self.name!r}: regression tasks have num_labels=1 and only they do")
        missing = [s for s in (self.train_split, *self.test_splits) if s not in self.hub_splits]
        if missing:
            raise ValueError(f"task {self.name!r}: splits {missing} have no hub_splits entry")
        # Own copy, so that specs never share (and accidentally co-mutate) one mapping.
        object.__setattr__(self, "hub_splits", dict(self.hub_splits))


def _spec(name: str, text_fields: tuple[str, ...], metrics: tuple[str, ...], main: str, **kw) -> TaskSpec:
    num_labels = kw.pop("num_labels", 2)
    return TaskSpec(
        name=name,
        text_fields=text_fields,
        num_labels=num_labels,
        is_regression=num_labels == 1,
        metrics=metrics,
        main_metric=main,
        **kw,
    )


TASKS: dict[str, TaskSpec] = {
    "cola": _spec("cola", ("sentence",), ("mcc",), "mcc"),
    "sst2": _spec("sst2", ("sentence",), ("accuracy",), "accuracy"),
    "mrpc": _spec("mrpc", ("sentence1", "sentence2"), ("f1", "accuracy"), "f1"),
    "stsb": _spec("stsb", ("sentence1", "sentence2"), ("pearson", "spearman"), "spearman", num_labels=1),
    "qqp": _spec("qqp", ("question1", "question2"), ("f1", "accuracy"), "f1"),
    "mnli": _spec(
        "mnli",
        ("premise", "hypothesis"),
        ("accuracy", "accuracy_mm"),
        "accuracy",
        num_labels=3,
        test_splits=("dev_matched", "dev_mismatched"),
        hub_splits=dict(_MNLI_HUB_SPLITS),
    ),
    "qnli": _spec("qnli", ("question", "sentence"), ("accuracy",), "accuracy"),
    "rte": _spec("rte", ("sentence1", "sentence2"), ("accuracy",), "accuracy"),
}


def get_task(name: str | TaskSpec) -> TaskSpec:
    """Look up a task by name (case-insensitive); a TaskSpec is passed through unchanged."""
    if isinstance(name, TaskSpec):
        return name
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(sorted(TASKS))}")
    return TASKS[key]
