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
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("unipelt", "transformers", "accelerate", "datasets", "hydra-core", "safetensors"):
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
