"""The method plug-in interface and the one registry.

A method is one file: a config dataclass and a `PeltMethod` subclass decorated with `@register_method`.
It owns its parameters for one task (across all layers) and installs callables at encoder sites in `attach`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..gates import Gate

METHODS: dict[str, type["PeltMethod"]] = {}


def register_method(cls: type["PeltMethod"]) -> type["PeltMethod"]:
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type["PeltMethod"]:
    from . import ensure_loaded

    ensure_loaded()
    if name not in METHODS:
        raise ValueError(f"unknown PEFT method {name!r}; choose from: {', '.join(sorted(METHODS))}")
    return METHODS[name]


@dataclass
class MethodConfig:
    """Fields every method shares. `gate`: learn a UniPELT gate; False means the gate is fixed at 1."""

    gate: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "MethodConfig":
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for {cls.__name__}; allowed: {sorted(known)}")
        return cls(**data)


@dataclass
class EncoderInfo:
    """What a method needs to know about the encoder it attaches to."""

    num_layers: int
    hidden_size: int
    num_heads: int
    head_dim: int
    linear_shapes: dict  # role -> (in_features, out_features) of that linear in a layer
    layer_norms: tuple = ()  # paths of the LayerNorms inside a layer


class PeltMethod(nn.Module):
    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    trains_encoder: ClassVar[bool] = False
    groupable: ClassVar[bool] = False  # True when the class implements attach_group (grouped training)

    def __init__(self, config: MethodConfig, info: EncoderInfo, gate_pooling: str = "masked") -> None:
        super().__init__()
        self.config = config
        self.info = info
        self.gate_pooling = gate_pooling

    def new_gate(self) -> Gate | None:
        return Gate(self.info.hidden_size, self.gate_pooling) if self.config.gate else None

    def attach(self, injector: "Injector", task: str) -> None:  # noqa: F821 - see model.Injector
        """Register this method's callables at the encoder sites for `task`."""

    @classmethod
    def attach_group(cls, engine: "GroupEngine") -> None:  # noqa: F821 - see grouping.engine
        """Register, once per group, callables that apply every member run's instance of this method to that run's
        rows of a grouped batch (batched over runs; see unipelt/grouping/engine.py)."""
        raise NotImplementedError(f"method {cls.name!r} cannot train in a group")

    @classmethod
    def group_key(cls, config: "MethodConfig") -> tuple:
        """Settings that must be equal for runs of this method to share a group (shapes of stacked tensors); raise
        `not_groupable(reason)` for settings the grouped implementation does not cover."""
        return ()


    def gates(self) -> dict[str, list[Gate]]:
        """Gate modules by submodule name, one per layer (empty for ungated methods)."""
        return {}

    def gate_values(self) -> dict[str, list[torch.Tensor | None]]:
        return {name: [g.last if g is not None else None for g in gs] for name, gs in self.gates().items()}

    def size_report(self) -> dict[str, int]:
        """Extra parameter counts worth reporting (e.g. prefix-tuning's folded size)."""
        return {}


def not_groupable(reason: str) -> Exception:
    """The error a method's `group_key` raises for settings that train alone (see grouping.engine.NotGroupable)."""
    from ..grouping.engine import NotGroupable

    return NotGroupable(f"{reason}; such runs train alone")
