"""LoRA: W x + s * B A x on chosen linear layers, B starting at zero.

Scaling: s = lora_alpha / r. The UniPELT paper's "alpha = 2" is this scaling itself (its code uses
lora_alpha 16 over r 8), so the default here is r=8, lora_alpha=16, s=2. With a gate, the gate value *replaces*
s (as in the UniPELT code); `gate_mode="multiply"` uses g * s instead. With the gate off (fixed at 1) the
update is scaled by s, i.e. exactly plain LoRA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..gates import Gate, scale
from .base import MethodConfig, PeltMethod, register_method

GATE_MODES = ("replace", "multiply")


@dataclass
class LoraConfig(MethodConfig):
    r: int = 8
    lora_alpha: float = 16.0
    targets: list = field(default_factory=lambda: ["query", "value"])
    dropout: float = 0.0
    gate_mode: str = "replace"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if self.gate_mode not in GATE_MODES:
            raise ValueError(f"LoRA gate_mode {self.gate_mode!r} is not one of {GATE_MODES}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target linear layer")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


class LowRank(nn.Module):
    def __init__(self, d_in: int, d_out: int, r: int, dropout: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x) @ self.A.t() @ self.B.t()


@register_method
class LoraMethod(PeltMethod):
    name = "lora"
    config_class = LoraConfig

    def __init__(self, config: LoraConfig, info, gate_pooling: str = "masked") -> None:
        super().__init__(config, info, gate_pooling)
        self.updates = nn.ModuleDict()
        self.gate_modules = nn.ModuleDict()
        for role in config.targets:
            if role not in info.linear_shapes:
                raise ValueError(f"unknown LoRA target {role!r}; allowed: {', '.join(info.linear_shapes)}")
            d_in, d_out = info.linear_shapes[role]
            self.updates[role] = nn.ModuleList(LowRank(d_in, d_out, config.r, config.dropout) for _ in range(info.num_layers))
            if config.gate:
                self.gate_modules[role] = nn.ModuleList(self.new_gate() for _ in range(info.num_layers))

    def attach(self, injector, task: str) -> None:
        for role, updates in self.updates.items():
            for i, update in enumerate(updates):
                gate = injector.layer_gate(i, task, self.gate_modules[role][i]) if role in self.gate_modules else None
                injector.linear_site(i, role).add_delta(task, self._delta(update, gate))

    def _delta(self, update: LowRank, gate):
        cfg = self.config

        def delta(x: torch.Tensor) -> torch.Tensor:
            out = update(x)
            if gate is None:
                return out * cfg.scaling
            g = gate()
            return scale(out, g if cfg.gate_mode == "replace" else g * cfg.scaling)

        return delta

    def gates(self) -> dict[str, list[Gate]]:
        return {f"lora_{role}": list(gs) for role, gs in self.gate_modules.items()}
