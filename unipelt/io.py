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
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz", ".pkl.gz", ".dill")
PICKLE_MAGIC = (b"\x80",)  # protocol 2+ pickles start with PROTO (0x80); torch zip files start with PK
SAFE_SUFFIXES = (".json", ".safetensors", ".md", ".txt", ".csv", ".yaml")  # never sniffed for pickle content
REQUIRED_META = ("format", "task", "pelt", "num_labels", "encoder")


class ModuleLoadError(ValueError):
    pass


def encoder_fingerprint(model: PeltModel) -> dict:
    return config_fingerprint(model.encoder.config, model.info.num_layers)


def config_fingerprint(cfg, num_layers: int | None = None) -> dict:
    """The encoder shape saved modules depend on, from a transformers config (`num_layers` overrides it)."""
    return {
        "model_type": cfg.model_type,
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_hidden_layers if num_layers is None else num_layers,
        "num_heads": cfg.num_attention_heads,
        "intermediate_size": getattr(cfg, "intermediate_size", None),
        "vocab_size": cfg.vocab_size,
    }


def _fsync_path(path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:  # e.g. directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write) -> None:
    """Write via a temp file in the same folder, flush it to disk, then rename: readers (and a run killed at any
    instant, or a full disk) never leave or see half a file; on failure the previous file, if any, is untouched.

    `write(tmp_path)` writes the content. Temp files start with "." and end with ".tmp".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent, directory=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write_bytes(Path(path), write)


def atomic_write_json(path: Path, data: dict) -> None:
    """Serialise first (a value JSON cannot hold fails here, before any file is touched), then write atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def task_state_dict(model: PeltModel, task: str | None = None) -> dict[str, torch.Tensor]:
    task = task or model.active_task
    prefix = f"tasks.{task}."
    state = {}
    for name, p in model.trainable_named_parameters(task).items():
        key = name[len(prefix):] if name.startswith(prefix) else name
        state[key] = own_cpu_copy(p)
    return state


def own_cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy with storage of its own: a grouped run's parameters are views into stacks shared by
    the whole group (grouping/stacks.py), which safetensors refuses to write (and would write whole)."""
    return t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)


def save_task(model: PeltModel, folder: str | Path, task: str | None = None, extra: dict | None = None,
              save_as: str | None = None) -> Path:
    """Write the task's trainable tensors and config to `folder` (created if needed); `save_as` names the task in
    the folder when it differs from its name in this model (e.g. a run of a group)."""
    task = task or model.active_task
    folder = Path(folder)
    modules = model.tasks[task]
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task": save_as or task,
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
    """Check a module folder without loading tensors: no pickle anywhere, both files present, config valid.

    Nothing in the folder is ever unpickled: only `config.json` (JSON) and `weights.safetensors` are read, and a
    folder holding a pickle file (by name, or by content for any extra file) is refused outright.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModuleLoadError(f"module folder {str(folder)!r} does not exist (expected a folder with {CONFIG_FILE} "
                              f"and {WEIGHTS_FILE}, as written by save_task)")
    pickles = sorted(p.name for p in folder.iterdir() if _looks_like_pickle(p))
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
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModuleLoadError(f"{folder / CONFIG_FILE}: not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ModuleLoadError(f"{folder / CONFIG_FILE}: not a unipelt module folder (format={found!r})")
    version = meta.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModuleLoadError(f"{folder / CONFIG_FILE}: format_version {version!r} is newer than this unipelt "
                              f"supports ({FORMAT_VERSION}); upgrade unipelt")
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise ModuleLoadError(f"{folder / CONFIG_FILE}: missing key(s) {missing}")
    if not isinstance(meta["encoder"], dict):
        raise ModuleLoadError(f"{folder / CONFIG_FILE}: 'encoder' must be an object, got {meta['encoder']!r}")
    if not isinstance(meta["num_labels"], int) or isinstance(meta["num_labels"], bool) or meta["num_labels"] < 1:
        raise ModuleLoadError(f"{folder / CONFIG_FILE}: num_labels must be a positive integer, "
                              f"got {meta['num_labels']!r}")
    try:
        PeltConfig.from_dict(meta["pelt"])
    except (ValueError, TypeError, AttributeError) as err:
        raise ModuleLoadError(f"{folder / CONFIG_FILE}: invalid 'pelt' config: {err}") from err
    return meta


def _looks_like_pickle(path: Path) -> bool:
    name = path.name.lower()
    if any(name.endswith(suffix) for suffix in PICKLE_SUFFIXES):
        return True
    if name.endswith(SAFE_SUFFIXES) or not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[:1] in PICKLE_MAGIC and 2 <= head[1] <= 5


def check_encoder_match(meta: dict, expected: dict, folder) -> None:
    """Raise ModuleLoadError naming every encoder property where saved modules and the target encoder differ."""
    mismatched = {k: (v, expected.get(k)) for k, v in meta["encoder"].items() if expected.get(k) != v}
    if mismatched:
        detail = ", ".join(f"{k}: saved {a!r} vs encoder {b!r}" for k, (a, b) in mismatched.items())
        raise ModuleLoadError(f"modules in {str(folder)!r} were trained on a different encoder ({detail})")


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of `weights.safetensors` (safetensors only; a corrupt or non-safetensors file is refused)."""
    path = Path(folder) / WEIGHTS_FILE
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types (SafetensorError, OSError, ...)
        raise ModuleLoadError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from err


def load_task(model: PeltModel, folder: str | Path, name: str | None = None, activate: bool = True) -> str:
    """Attach the saved task in `folder` to `model` (under `name`, default the saved name) and load its tensors."""
    folder = Path(folder)
    meta = read_task_config(folder)
    check_encoder_match(meta, encoder_fingerprint(model), folder)
    name = name or meta["task"]
    tensors = read_weights(folder)
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
