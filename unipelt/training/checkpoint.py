"""Resumable training state, crash-safe: tensors in epoch-named safetensors files, then `state.json` last.

`state.json` is replaced atomically and only ever names files that were fully written (and flushed) before it,
so a run killed at any instant resumes from the last completed epoch. Optimizer state is flattened into
safetensors (never pickled). `state.json` also holds the result-relevant part of the run's config, so a
checkpoint is never resumed under different settings.

No RNG state is stored: the data order and the dropout stream of every epoch are functions of (train seed,
epoch), re-seeded at each epoch start (see trainer.py), so a resumed run continues bit-identically.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..io import atomic_write_bytes, atomic_write_json, own_cpu_copy
from .record import config_diff

STATE_FILE = "state.json"
STATE_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (unreadable, or written under a different config)."""


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    data = {k: own_cpu_copy(v) for k, v in tensors.items()}
    atomic_write_bytes(path, lambda tmp: save_file(data, tmp))


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, slots in sd["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": _floats(sd["param_groups"]), "scalars": scalars}


def _floats(value):
    """JSON-ready copy: 0-d tensors (a capturable optimizer's LR, its scheduler's base LRs) become floats."""
    if torch.is_tensor(value):
        return value.item()
    if isinstance(value, dict):
        return {k: _floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_floats(v) for v in value)
    return value


def load_optimizer_state(optimizer, scheduler, optimizer_state: dict, scheduler_state: dict) -> None:
    """Load both states. The checkpoint holds LRs as floats, and `load_state_dict` would put those floats in place
    of a tensor LR (a capturable optimizer's, which a captured CUDA graph reads): such a group keeps its own
    tensor, filled with the saved value, and the scheduler's LRs become tensors of its kind again (as before the
    checkpoint, so a resumed run computes the same LRs)."""
    tensor_lrs = [g["lr"] if torch.is_tensor(g["lr"]) else None for g in optimizer.param_groups]
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    for i, (group, lr) in enumerate(zip(optimizer.param_groups, tensor_lrs)):
        if lr is None:
            continue
        lr.fill_(float(group["lr"]))
        group["lr"] = lr
        if "initial_lr" in group:
            group["initial_lr"] = torch.full_like(lr, float(group["initial_lr"]))
        scheduler.base_lrs[i] = torch.full_like(lr, float(scheduler.base_lrs[i]))
        scheduler._last_lr[i] = lr.clone()


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


class Checkpointer:
    """`config`: the run's resolved config; saved with each checkpoint and checked (result-relevant keys only,
    see record.result_config) before one is resumed."""

    def __init__(self, folder: Path, config: dict | None = None) -> None:
        self.folder = Path(folder)
        self.config = config

    def exists(self) -> bool:
        return (self.folder / STATE_FILE).is_file()

    def save(self, epoch: int, trainable: dict, best: dict | None, optimizer, scheduler, progress: dict) -> None:
        """Write epoch `epoch`'s files, then point state.json at them, then drop older files."""
        names = {"trainable": f"trainable-e{epoch}.safetensors", "optimizer": f"optimizer-e{epoch}.safetensors"}
        save_tensors(self.folder / names["trainable"], trainable)
        opt_tensors, opt_meta = flatten_optimizer(optimizer)
        save_tensors(self.folder / names["optimizer"], opt_tensors)
        if best is not None:
            names["best"] = f"best-e{progress['best_epoch']}.safetensors"
            save_tensors(self.folder / names["best"], best)
        elif self.exists():
            previous = self.load_state().get("files", {}).get("best")
            if previous:
                names["best"] = previous
        state = {"state_version": STATE_VERSION, "epoch": epoch, "files": names, "optimizer": opt_meta,
                 "scheduler": _floats(scheduler.state_dict()), **progress, "config": self.config}
        atomic_write_json(self.folder / STATE_FILE, state)
        keep = set(names.values()) | {STATE_FILE}
        for path in self.folder.iterdir():
            if path.name not in keep and not path.name.startswith("."):
                path.unlink(missing_ok=True)

    def load_state(self) -> dict:
        path = self.folder / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"checkpoint {str(path)!r} is unreadable ({err}); {self.remedy}") from err
        if not isinstance(state, dict) or not isinstance(state.get("files"), dict) or "epoch" not in state:
            raise CheckpointError(f"checkpoint {str(path)!r} is not a unipelt training state; {self.remedy}")
        return state

    @property
    def remedy(self) -> str:
        return f"delete {str(self.folder)!r} or set output.force=true to start the run over"

    def check_config(self, state: dict | None = None) -> None:
        """Raise CheckpointError when the checkpoint was written under different result-relevant settings."""
        state = self.load_state() if state is None else state
        saved = state.get("config")
        if saved is None or self.config is None:
            return
        diffs = config_diff(saved, self.config)
        if diffs:
            raise CheckpointError(
                f"the checkpoint in {str(self.folder)!r} (epoch {state['epoch']}) was written by a run with different "
                f"settings ({'; '.join(diffs)}); resuming would mix the two. Re-run with the original settings to "
                f"resume, set output.force=true to start over, or output.tag=<name> to keep both runs apart"
            )

    def load(self) -> dict:
        """state.json plus the tensors it names: trainable, optimizer (a state_dict), best (or None)."""
        state = self.load_state()
        self.check_config(state)
        files = state["files"]
        try:
            state["trainable"] = load_file(str(self.folder / files["trainable"]))
            opt = load_file(str(self.folder / files["optimizer"]))
            state["optimizer_state"] = unflatten_optimizer(opt, state["optimizer"])
            state["best"] = load_file(str(self.folder / files["best"])) if "best" in files else None
        except Exception as err:  # missing/truncated files: safetensors raises several error types
            raise CheckpointError(f"checkpoint in {str(self.folder)!r} is damaged ({type(err).__name__}: {err}); "
                                  f"{self.remedy}") from err
        return state

    def clear(self) -> None:
        """Delete the checkpoint: state.json first, so an interrupted clear never leaves a resumable half."""
        if not self.folder.is_dir():
            return
        (self.folder / STATE_FILE).unlink(missing_ok=True)
        for path in self.folder.iterdir():
            path.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except FileNotFoundError:
            pass
