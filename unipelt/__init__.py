"""unipelt: parameter-efficient fine-tuning with UniPELT gates on one frozen encoder.

    from unipelt import PeltModel, preset, load_encoder
    model = PeltModel(load_encoder("minilm"))
    model.add_task("rte", preset("unipelt_apl"), num_labels=2)

Names load lazily, so `unipelt-report` and other torch-free parts start fast and run without torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "PeltConfig": "config", "preset": "config",
    "load_encoder": "encoders", "load_tokenizer": "encoders", "tiny_encoder": "encoders",
    "ModuleLoadError": "io", "load_task": "io", "save_task": "io",
    "METHODS": "methods", "MethodConfig": "methods", "PeltMethod": "methods", "register_method": "methods",
    "PeltModel": "model", "PeltOutput": "model",
    "predict": "inference",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'unipelt' has no attribute {name!r}")


def add_pelt(encoder, config, num_labels: int, task: str = "default"):
    """Wrap `encoder` (frozen) and attach one task's modules (a PeltConfig or a preset name)."""
    from .config import preset
    from .model import PeltModel

    model = PeltModel(encoder)
    model.add_task(task, preset(config) if isinstance(config, str) else config, num_labels)
    return model


__all__ = [*_EXPORTS, "add_pelt"]
