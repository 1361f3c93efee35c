"""Save and load the trainable part of a task: `config.json` + `weights.safetensors`, never pickle.

A saved folder records the encoder's shape; loading checks it, checks that every tensor is present with the
right shape, and refuses folders that contain pickle files rather than ever unpickling them.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import PeltConfig
from .model import PeltModel

FORMAT = "unipelt-modules"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class ModuleLoadError(ValueError):
    pass


def encoder_fingerprint(model: PeltModel) -> dict:
    cfg = model.encoder.config
    return {
        "model_type": cfg.model_type,
        "hidden_size": cfg.hidden_size,
        "num_layers": model.info.num_layers,
        "num_heads": cfg.num_attention_heads,
        "intermediate_size": getattr(cfg, "intermediate_size", None),
        "vocab_size": cfg.vocab_size,
    }


def atomic_write_bytes(path: Path, write) -> None:
    """Write via a temp file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_json(path: Path, data: dict) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.flush()
            os.fsync(f.fileno())

    atomic_write_bytes(Path(path), write)


def task_state_dict(model: PeltModel, task: str | None = None) -> dict[str, torch.Tensor]:
    task = task or model.active_task
    prefix = f"tasks.{task}."
    state = {}
    for name, p in model.trainable_named_parameters(task).items():
        key = name[len(prefix):] if name.startswith(prefix) else name
        state[key] = p.detach().contiguous().cpu()
    return state


def save_task(model: PeltModel, folder: str | Path, task: str | None = None, extra: dict | None = None) -> Path:
    """Write the task's trainable tensors and config to `folder` (created if needed)."""
    task = task or model.active_task
    folder = Path(folder)
    modules = model.tasks[task]
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task": task,
        "pelt": modules.config.to_dict(),
        "num_labels": modules.head.num_labels,
        "encoder": encoder_fingerprint(model),
        "extra": extra or {},
    }
    state = task_state_dict(model, task)
    atomic_write_bytes(folder / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"format": FORMAT}))
    atomic_write_json(folder / CONFIG_FILE, meta)
    return folder


def read_task_config(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise ModuleLoadError(f"module folder {str(folder)!r} does not exist")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModuleLoadError(
            f"refusing to load {str(folder)!r}: it contains pickle file(s) {pickles}; unipelt only loads "
            f"{CONFIG_FILE} + {WEIGHTS_FILE} (safetensors) and never unpickles"
        )
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise ModuleLoadError(f"module folder {str(folder)!r} has no {name}")
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ModuleLoadError(f"{folder / CONFIG_FILE}: not valid JSON ({err})") from err
    if meta.get("format") != FORMAT:
        raise ModuleLoadError(f"{folder / CONFIG_FILE}: not a unipelt module folder (format={meta.get('format')!r})")
    return meta


def load_task(model: PeltModel, folder: str | Path, name: str | None = None, activate: bool = True) -> str:
    """Attach the saved task in `folder` to `model` (under `name`, default the saved name) and load its tensors."""
    folder = Path(folder)
    meta = read_task_config(folder)
    expected = encoder_fingerprint(model)
    mismatched = {k: (v, expected.get(k)) for k, v in meta["encoder"].items() if expected.get(k) != v}
    if mismatched:
        detail = ", ".join(f"{k}: saved {a!r} vs encoder {b!r}" for k, (a, b) in mismatched.items())
        raise ModuleLoadError(f"modules in {str(folder)!r} were trained on a different encoder ({detail})")
    name = name or meta["task"]
    tensors = load_file(str(folder / WEIGHTS_FILE))
    model.add_task(name, PeltConfig.from_dict(meta["pelt"]), meta["num_labels"], activate=False)
    try:
        _load_tensors(model, name, tensors, folder)
    except ModuleLoadError:
        model.remove_task(name)
        raise
    if activate:
        model.set_active_task(name)
    return name


def _load_tensors(model: PeltModel, task: str, tensors: dict, folder: Path) -> None:
    targets = {}
    prefix = f"tasks.{task}."
    for full, p in model.trainable_named_parameters(task).items():
        targets[full[len(prefix):] if full.startswith(prefix) else full] = p
    missing = sorted(set(targets) - set(tensors))
    unexpected = sorted(set(tensors) - set(targets))
    if missing or unexpected:
        raise ModuleLoadError(
            f"{folder / WEIGHTS_FILE} does not match its config: missing tensors {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, p in targets.items():
        if tensors[key].shape != p.shape:
            raise ModuleLoadError(f"tensor {key!r} in {folder}: saved shape {tuple(tensors[key].shape)}, expected {tuple(p.shape)}")
    with torch.no_grad():
        for key, p in targets.items():
            p.copy_(tensors[key].to(p.dtype))
