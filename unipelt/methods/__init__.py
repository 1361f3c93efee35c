"""PEFT methods. Importing a method module registers it; list new method modules here (the one place)."""
from __future__ import annotations

import importlib

from .base import METHODS, EncoderInfo, MethodConfig, PeltMethod, method_class, register_method

_METHOD_MODULES = ("adapter", "prefix", "lora", "bitfit", "finetune")


def ensure_loaded() -> None:
    for mod in _METHOD_MODULES:
        importlib.import_module(f"{__name__}.{mod}")


__all__ = ["METHODS", "EncoderInfo", "MethodConfig", "PeltMethod", "method_class", "register_method", "ensure_loaded"]
