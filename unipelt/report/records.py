"""Find, parse and validate run records (docs/run_record.md) under a runs folder.

Reading is deliberately forgiving: one bad file must never sink a report of hundreds of runs, so every file
that cannot be used is returned with the reason instead of raising.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

SUPPORTED_SCHEMA_VERSIONS = (1,)
RECORD_FILENAME = "record.json"
# Keys every record needs; `test_score` is only required of complete runs (a failed run has none).
REQUIRED_KEYS = ("status", "task", "method", "k", "data_seed", "test_score")
STATUSES = ("complete", "failed")
DEFAULT_MODEL = "default"
PATH_KEY = "_path"  # added to each returned record: where it was read from


class Skipped(NamedTuple):
    """A file that was not used, and why (printed by the CLI, written to skipped.csv)."""

    path: Path
    reason: str


@dataclass
class RecordSet:
    """Everything read from a runs folder: usable complete runs, failed runs, and skipped files."""

    records: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    root: Path | None = None


def find_record_files(runs_dir: str | Path) -> list[Path]:
    """All `*.json` files below `runs_dir`, in a stable path order (this order decides which duplicate wins)."""
    root = Path(runs_dir)
    return sorted((p for p in root.rglob("*.json") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def normalize_k(k: Any) -> int | str | None:
    """Return K as a positive int or the string "full"; None when it is neither (numeric strings are accepted)."""
    if isinstance(k, bool):
        return None
    if isinstance(k, int):
        return k if k > 0 else None
    if isinstance(k, float) and k.is_integer() and k > 0:
        return int(k)
    if isinstance(k, str):
        s = k.strip().lower()
        if s == "full":
            return "full"
        if s.isdigit() and int(s) > 0:
            return int(s)
    return None


def _is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_record(obj: Any) -> str | None:
    """Return why `obj` is not a usable record, or None when it is."""
    if not isinstance(obj, dict):
        return f"not a JSON object (got {type(obj).__name__})"
    version = obj.get("schema_version", SUPPORTED_SCHEMA_VERSIONS[0])
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        return f"unsupported schema_version {version!r}"
    status = obj.get("status")
    required = [key for key in REQUIRED_KEYS if not (key == "test_score" and status == "failed")]
    missing = [key for key in required if key not in obj]
    if missing:
        return "missing required key(s): " + ", ".join(missing)
    if status not in STATUSES:
        return f"unknown status {status!r} (expected one of {', '.join(STATUSES)})"
    for key in ("task", "method"):
        if not isinstance(obj[key], str) or not obj[key]:
            return f"{key} must be a non-empty string (got {obj[key]!r})"
    if obj.get("model") is not None and not isinstance(obj["model"], str):
        return f"model must be a string (got {obj['model']!r})"
    for key in ("data_seed", "seed"):
        value = obj.get(key)
        if key in obj and (value is not None or key == "data_seed") and not isinstance(value, (int, str)):
            return f"{key} must be an int or string (got {value!r})"
    if normalize_k(obj["k"]) is None:
        return f"k must be a positive int or 'full' (got {obj['k']!r})"
    if status == "complete" and not _is_finite_number(obj["test_score"]):
        return f"test_score is not a finite number (got {obj['test_score']!r})"
    return None


def record_key(rec: dict[str, Any]) -> tuple:
    """Identity of a run: two records with the same key are duplicates."""
    return (rec["task"], rec["method"], rec.get("model", DEFAULT_MODEL), rec["k"], rec["data_seed"], rec.get("seed"))


def _read(path: Path) -> tuple[Any, str | None]:
    """Parse one file. Returns (object, None), (None, reason) or (None, None) for JSON that is not a record."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"unreadable: {exc}"
    is_record_name = path.name == RECORD_FILENAME
    # Other JSON files (configs, tokenizers, trainer state) are only records when they carry schema_version;
    # the cheap substring test spares parsing multi-MB checkpoint files.
    if not is_record_name and '"schema_version"' not in text:
        return None, None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
    if not is_record_name and not (isinstance(obj, dict) and "schema_version" in obj):
        return None, None
    return obj, None


def load_records(runs_dir: str | Path) -> RecordSet:
    """Read every record below `runs_dir`: `**/record.json` plus any `*.json` object with a schema_version key.

    Duplicates (same task, method, model, k, data_seed, seed) keep the first file in path order. Complete and
    failed runs are deduplicated separately, so a failed attempt never hides a later successful rerun.
    """
    root = Path(runs_dir)
    out = RecordSet(root=root)
    seen: dict[tuple, Path] = {}
    for path in find_record_files(root):
        obj, reason = _read(path)
        if obj is None:
            if reason is not None:
                out.skipped.append(Skipped(path, reason))
            continue
        reason = validate_record(obj)
        if reason is not None:
            out.skipped.append(Skipped(path, reason))
            continue
        rec = dict(obj)
        rec["k"] = normalize_k(rec["k"])
        rec.setdefault("model", DEFAULT_MODEL)
        if rec["model"] is None:
            rec["model"] = DEFAULT_MODEL
        rec[PATH_KEY] = str(path)
        key = (rec["status"],) + record_key(rec)
        if key in seen:
            out.skipped.append(Skipped(path, f"duplicate of {seen[key]} (same task/method/model/k/data_seed/seed)"))
            continue
        seen[key] = path
        (out.failed if rec["status"] == "failed" else out.records).append(rec)
    return out
