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
from .base import MethodConfig, PeltMethod, not_groupable, register_method

GATE_MODES = ("replace", "multiply")
SAME_INPUT = ("query", "key", "value")  # targets that read one tensor, the layer's hidden states: one shared A x


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
                injector.linear_site(i, role).add_delta(task, *self._delta(role, i, gate, injector, task))

    def _delta(self, role: str, layer: int, gate, injector, task: str):
        cfg = self.config
        update = self.updates[role][layer]
        down = self._shared_down(role, layer, injector, task)

        def multiplier(out: torch.Tensor) -> torch.Tensor:
            if gate is None:
                return out * cfg.scaling
            g = gate()
            return scale(out, g if cfg.gate_mode == "replace" else g * cfg.scaling)

        def delta(x: torch.Tensor) -> torch.Tensor:
            return multiplier(update(x) if down is None else down(x) @ update.B.t())

        def factors(x: torch.Tensor):  # delta(x) == u @ B^T, with the scaling (or gate) applied to u
            return multiplier(update.dropout(x) @ update.A.t() if down is None else down(x)), update.B

        return delta, factors

    def _shared_down(self, role: str, layer: int, injector, task: str):
        """A x for `role`, computed for all of the layer's targets that read the same input (query, key and value read
        the layer's hidden states) as one part of the layer input's projection bank: one matmul over their stacked A
        and the layer's gates (projections.py); each target takes its slice. None (each its own matmul) with LoRA
        dropout, whose masks are drawn per target, or when the targets' input sizes differ."""
        roles = [ro for ro in self.updates if ro in SAME_INPUT]
        sizes = {self.updates[ro][layer].A.shape[1] for ro in roles}
        if self.config.dropout or role not in roles or len(sizes) != 1:
            return None
        r, index = self.config.r, roles.index(role)
        columns = injector.layer_projections(layer).add(  # one part for all targets: the first registers it
            task, lambda: (torch.cat([self.updates[ro][layer].A for ro in roles], 0), None), name=("lora_down", id(self)))
        return lambda x: columns(x)[..., index * r:(index + 1) * r]

    def gates(self) -> dict[str, list[Gate]]:
        return {f"lora_{role}": list(gs) for role, gs in self.gate_modules.items()}

    # --- grouped training -------------------------------------------------------------------------------------
    groupable = True

    @classmethod
    def group_key(cls, config: LoraConfig) -> tuple:
        if config.dropout:
            raise not_groupable(f"LoRA dropout {config.dropout} is not grouped (per-run dropout on LoRA inputs)")
        return (config.r,)

    @classmethod
    def attach_group(cls, engine) -> None:
        from ..grouping.engine import GROUP

        roles = sorted({role for m in engine.member_methods(cls.name) for role in m.updates})
        for role in roles:
            for i in range(engine.info.num_layers):
                engine.layer_gate(i, f"lora_{role}", cls.name,
                                  lambda m, role=role, i=i: m.gate_modules[role][i] if role in m.gate_modules else None)
                engine.injector.linear_site(i, role).add_delta(GROUP, _group_delta(engine, role, i))


def _group_delta(engine, role: str, layer: int):
    """s_r * B_r A_r x for each run r's rows (zeros for runs without LoRA on `role`), as two batched matmuls."""

    def delta(x: torch.Tensor) -> torch.Tensor:
        R = engine.R
        d_in, d_out = engine.info.linear_shapes[role]
        methods = engine.methods("lora")
        if not any(m is not None and role in m.updates for m in methods):
            return 0.0
        r = next(m.config.r for m in methods if m is not None)

        def updates(m):
            return None if role not in m.updates else m.updates[role]

        dtype = engine.compute_dtype(x)
        A = engine.stack_layers(("lora_A", role), "lora", lambda m: [u.A for u in updates(m)] if updates(m) else None,
                                (r, d_in), dtype=dtype)[layer]
        B = engine.stack_layers(("lora_B", role), "lora", lambda m: [u.B for u in updates(m)] if updates(m) else None,
                                (d_out, r), dtype=dtype)[layer]
        x3 = x.reshape(R, -1, d_in).to(dtype)
        out = torch.bmm(torch.bmm(x3, A.transpose(1, 2)), B.transpose(1, 2))
        out = out.view(x.shape[0], *x.shape[1:-1], d_out)
        # Per-run multiplier: the gate (replace), gate * s (multiply) or s (no gate); 0 for runs without LoRA here.
        scaling = engine.per_run(("lora_s", role), [m.config.scaling if m is not None and role in m.updates else 0.0
                                                    for m in methods])
        values, gated = engine.gate(layer, f"lora_{role}")
        if values is None:
            mult = engine.rows(scaling)
        else:
            def gate_scale():  # per row: s where the gate multiplies it (gate_mode="multiply"), else 1
                multiply = engine.per_run("lora_multiply", [m is not None and m.config.gate_mode == "multiply"
                                                            for m in methods]).bool()
                return engine.rows(torch.where(multiply, scaling, 1.0))

            mult = torch.where(engine.rows(gated), values * engine.cached(("lora_gate_scale", role), gate_scale),
                               engine.rows(scaling))
        return out * mult.to(out.dtype).view(-1, *([1] * (out.dim() - 1)))

    return delta

