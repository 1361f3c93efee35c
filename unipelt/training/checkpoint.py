"""Resumable training state, crash-safe: tensors in epoch-named safetensors files, then `state.json` last.

`state.json` is replaced atomically and only ever names files that were fully written before it, so a run
killed at any instant resumes from the last completed epoch. Optimizer state is flattened into safetensors
(never pickled).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..io import atomic_write_bytes, atomic_write_json

STATE_FILE = "state.json"


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
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
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


class Checkpointer:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

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
            if not (self.folder / names["best"]).exists():
                save_tensors(self.folder / names["best"], best)
        elif self.exists():
            previous = self.load_state().get("files", {}).get("best")
            if previous:
                names["best"] = previous
        state = {"epoch": epoch, "files": names, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), **progress}
        atomic_write_json(self.folder / STATE_FILE, state)
        keep = set(names.values()) | {STATE_FILE}
        for path in self.folder.iterdir():
            if path.name not in keep and not path.name.startswith("."):
                path.unlink(missing_ok=True)

    def load_state(self) -> dict:
        return json.loads((self.folder / STATE_FILE).read_text())

    def load(self) -> dict:
        """state.json plus the tensors it names: trainable, optimizer (a state_dict), best (or None)."""
        state = self.load_state()
        files = state["files"]
        state["trainable"] = load_file(str(self.folder / files["trainable"]))
        state["optimizer_state"] = unflatten_optimizer(load_file(str(self.folder / files["optimizer"])), state["optimizer"])
        state["best"] = load_file(str(self.folder / files["best"])) if "best" in files else None
        return state

    def clear(self) -> None:
        if self.folder.is_dir():
            for path in self.folder.iterdir():
                path.unlink(missing_ok=True)
            self.folder.rmdir()
