"""Load one GLUE split, from local gzip JSON Lines files or from the HF hub.

Local files (`<data_dir>/<task>/<split>.jsonl.gz`, HF `glue` field names plus `label` and `idx`) are parsed
here rather than by `datasets.load_dataset("json")`, so that every bad row is reported with its file and
line number, and so that SST-2's 67k rows load in well under a second. Parsed files are cached per process.
Both routes return the same columns and features: the task's text fields, `label`, `idx`.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import os
import zlib
from pathlib import Path

import datasets
import pyarrow as pa
from datasets.table import InMemoryTable

from unipelt.data.tasks import TaskSpec, get_task

HUB_DATASET = "nyu-mll/glue"
ENV_DATA_DIR = "UNIPELT_GLUE_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[2]


class DataError(ValueError):
    """Bad task data or data settings; the message says what is wrong and where."""


class MissingDataError(DataError, FileNotFoundError):
    """A data directory or split file does not exist (catchable as DataError or FileNotFoundError)."""


def default_data_dir() -> Path:
    """`$UNIPELT_GLUE_DIR` if set, else the project default `<repo root>/../shared/data/glue`."""
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser()
    return (_REPO_ROOT.parent / "shared" / "data" / "glue").resolve()


def split_path(task: str | TaskSpec, split: str, data_dir: str | Path) -> Path:
    """Path of one local split file: `<data_dir>/<task>/<split>.jsonl.gz`."""
    spec = get_task(task)
    _check_split(spec, split)
    return Path(data_dir).expanduser() / spec.name / f"{split}.jsonl.gz"


def features_for(task: str | TaskSpec) -> datasets.Features:
    """Features of a loaded split: text fields (string), label (int64, or float32 for regression), idx."""
    spec = get_task(task)
    feats = {name: datasets.Value("string") for name in spec.text_fields}
    feats["label"] = datasets.Value("float32" if spec.is_regression else "int64")
    feats["idx"] = datasets.Value("int64")
    return datasets.Features(feats)


def load_split(task: str | TaskSpec, split: str, data_dir: str | Path | None) -> datasets.Dataset:
    """Load one split (`train`, `dev`, or MNLI `dev_matched`/`dev_mismatched`) of a GLUE task.

    `data_dir=None` loads from the HF hub (`nyu-mll/glue`, needs internet or a warm HF cache).
    """
    spec = get_task(task)
    _check_split(spec, split)
    if data_dir is None:
        return _load_hub(spec, split)
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise MissingDataError(
            f"GLUE data directory {str(root)!r} does not exist; set data.dir to the folder that holds "
            f"<task>/<split>.jsonl.gz files (or ${ENV_DATA_DIR}), or use data.dir=null to load "
            f"{HUB_DATASET!r} from the HF hub"
        )
    path = split_path(spec, split, root)
    if not path.is_file():
        raise MissingDataError(
            f"{spec.name} split {split!r} is not available locally: missing file {str(path)!r}. "
            f"The HF hub dataset {HUB_DATASET!r} provides it (use data.dir=null); the local copy lacks "
            f"QQP, MNLI train and dev_mismatched, and QNLI train"
        )
    stat = path.stat()
    table = _read_table(str(path.resolve()), stat.st_mtime_ns, stat.st_size, spec)
    # A fresh Dataset around the cached, immutable Arrow table: in-place calls such as set_format on
    # one caller's dataset cannot leak into another's.
    info = datasets.DatasetInfo(features=features_for(spec))
    return datasets.Dataset(InMemoryTable(table), info=info, split=split)


def clear_cache() -> None:
    """Forget parsed files (for tests, or after files changed in place with the same mtime and size)."""
    _read_table.cache_clear()


def _check_split(spec: TaskSpec, split: str) -> None:
    if split not in spec.hub_splits:
        raise DataError(f"unknown split {split!r} for task {spec.name}; choose one of: {', '.join(spec.hub_splits)}")


def _load_hub(spec: TaskSpec, split: str) -> datasets.Dataset:
    ds = datasets.load_dataset(HUB_DATASET, spec.name, split=spec.hub_splits[split])
    features = features_for(spec)
    missing = [c for c in features if c not in ds.column_names]
    if missing:
        raise DataError(f"{HUB_DATASET} {spec.name}/{split} lacks columns {missing}; it has {ds.column_names}")
    # The hub stores labels as ClassLabel; cast so both routes give identical features.
    return ds.select_columns(list(features)).cast(features)


@functools.lru_cache(maxsize=32)
def _read_table(path: str, _mtime_ns: int, _size: int, spec: TaskSpec) -> pa.Table:
    """Parse and validate one file into an Arrow table (mtime and size are part of the cache key)."""
    columns: dict[str, list] = {name: [] for name in (*spec.text_fields, "label", "idx")}
    seen_idx: dict[int, int] = {}
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                row = _parse_row(line, spec, path, lineno)
                if row["idx"] in seen_idx:
                    raise DataError(
                        f"{path}, line {lineno}: duplicate idx {row['idx']} (first seen on line {seen_idx[row['idx']]})"
                    )
                seen_idx[row["idx"]] = lineno
                for name, values in columns.items():
                    values.append(row[name])
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path} as gzip-compressed UTF-8 JSON Lines: {exc}") from exc
    if not columns["idx"]:
        raise DataError(f"{path} holds no examples")
    return pa.Table.from_pydict(columns, schema=features_for(spec).arrow_schema)


def _parse_row(line: str, spec: TaskSpec, path: str, lineno: int) -> dict:
    where = f"{path}, line {lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg}): {_short(line)}") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {_short(line)}")
    for name in spec.text_fields:
        if name not in row:
            raise DataError(f"{where}: missing text field {name!r} (task {spec.name} needs {list(spec.text_fields)})")
        if not isinstance(row[name], str):
            raise DataError(f"{where}: text field {name!r} must be a string, got {_short(row[name])}")
    if "label" not in row:
        raise DataError(f"{where}: missing field 'label'")
    row["label"] = _check_label(row["label"], spec, where)
    if "idx" not in row:
        raise DataError(f"{where}: missing field 'idx'")
    if not _is_int(row["idx"]) or row["idx"] < 0:
        raise DataError(f"{where}: idx must be a non-negative integer, got {_short(row['idx'])}")
    return row


def _check_label(label: object, spec: TaskSpec, where: str) -> int | float:
    if spec.is_regression:
        if isinstance(label, bool) or not isinstance(label, (int, float)) or not math.isfinite(label):
            raise DataError(f"{where}: label must be a finite number for {spec.name}, got {_short(label)}")
        return float(label)
    if not _is_int(label) or not 0 <= label < spec.num_labels:
        raise DataError(
            f"{where}: label {_short(label)} out of range for {spec.name}; "
            f"expected an integer in 0..{spec.num_labels - 1}"
        )
    return label


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: object, limit: int = 80) -> str:
    text = value.rstrip("\n") if isinstance(value, str) else value
    text = repr(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
