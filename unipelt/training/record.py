"""Run records: one JSON per run (see docs/run_record.md), written atomically; complete ones are never redone."""
from __future__ import annotations

import json
import platform
import resource
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from ..io import atomic_write_json

SCHEMA_VERSION = 1
RECORD_FILE = "record.json"
DEFAULT_MODEL = "minilm"


def run_id(task: str, method: str, k, data_seed: int, seed: int, model: str, tag: str | None = None) -> str:
    parts = [task, method, f"k{k}", f"d{data_seed}", f"s{seed}"]
    if model != DEFAULT_MODEL:
        parts.append(model.replace("/", "_"))
    if tag:
        parts.append(str(tag))
    return "-".join(parts)


# Config keys that never change a run's result: where things are written or read from, speed knobs, fault
# injection. Everything else in the resolved config must match for a run to be resumed or skipped.
NON_RESULT_KEYS = ("output", "runtime", "hydra", "data.dir", "model.path", "group.max_runs", "group.eval_rows", "train.check_every",
                   "train.inject_nan_at_step", "train.eval_batch_size", "train.checkpoint_every_s",
                   "train.log_with")


def _flatten(data, prefix: str = "") -> dict:
    out = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        if not data and prefix:
            out[prefix[:-1]] = {}
    else:
        out[prefix[:-1]] = data
    return out


def result_config(config: dict) -> dict:
    """The flattened (dotted keys) part of a resolved config that determines a run's result."""
    flat = _flatten(config or {})
    return {k: v for k, v in flat.items()
            if not any(k == skip or k.startswith(skip + ".") for skip in NON_RESULT_KEYS)}


# Result-relevant keys added after records existed, with the value that describes how those older records were
# made: a config without `group.enabled` was trained by the per-run trainer, i.e. group.enabled=false; one without
# `train.compile` / `train.cuda_graph` (`group.cuda_graph`) was trained uncompiled and ungraphed, one without
# `train.deterministic` without torch's deterministic mode, one without `group.activations` with an fp32 stream, one
# without `group.attention_dropout` with each run's own attention dropout masks.
LEGACY_VALUES = {"group.enabled": False, "train.compile": False, "train.cuda_graph": False,
                 "train.deterministic": False, "group.cuda_graph": False, "group.activations": "fp32",
                 "group.attention_dropout": "per_run"}


def config_diff(old: dict, new: dict, limit: int = 6) -> list[str]:
    """`key: old -> new` for every result-relevant setting that differs between two resolved configs (a key
    missing on one side counts as equal when the other side is null, so added options with null defaults do
    not invalidate older runs; keys of LEGACY_VALUES count as their legacy value when missing)."""
    a, b = result_config(old), result_config(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, LEGACY_VALUES.get(key)), b.get(key, LEGACY_VALUES.get(key))
        if va != vb:
            old_value = repr(va) if key in a else "(absent)" if key not in LEGACY_VALUES else f"(absent, i.e. {va!r})"
            new_value = repr(vb) if key in b else "(absent)" if key not in LEGACY_VALUES else f"(absent, i.e. {vb!r})"
            diffs.append(f"{key}: {old_value} -> {new_value}")
    return diffs[:limit] + ([f"... {len(diffs) - limit} more"] if len(diffs) > limit else [])


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_complete(path: Path) -> bool:
    record = read_record(path)
    return record is not None and record.get("status") == "complete" and record.get("schema_version") == SCHEMA_VERSION


def write_record(path: Path, record: dict) -> None:
    atomic_write_json(path, record)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    for pkg in ("unipelt", "transformers", "accelerate", "datasets", "hydra-core", "safetensors", "numpy", "scipy",
                "scikit-learn", "tokenizers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def peak_memory(device: torch.device) -> dict:
    """Peak GPU memory allocated by torch on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return {"peak_bytes": int(torch.cuda.max_memory_allocated(device)), "device": torch.cuda.get_device_name(device),
                "kind": "cuda_max_allocated"}
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024
    return {"peak_bytes": int(rss_kb * scale), "device": "cpu", "kind": "process_max_rss"}


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def base_record(rid: str, task: str, method: str, model: str, k, data_seed: int, seed: int, main_metric: str,
                config: dict, split_hash: str | None, device: str) -> dict:
    return {
        "schema_version": SCHEMA_VERSION, "status": "running", "run_id": rid, "task": task, "method": method,
        "model": model, "k": k, "data_seed": data_seed, "seed": seed, "main_metric": main_metric,
        "config": config, "versions": versions(), "split_hash": split_hash, "device": device, "created": now(),
        "failure": None,
    }
