"""UniPELT gates: g = mean over tokens of sigmoid(W_g h + b_g), one value per example.

The original UniPELT code averages over all positions, padding included; the default here averages over real
tokens only (`pooling="masked"`), so a gate does not depend on how much a batch is padded. `pooling="all"`
restores the original behaviour.

Speed: the token weights of the average are computed once per forward (`pool_weights`), and all gates that
read the same tensor (e.g. the prefix and LoRA gates of one layer, which read the layer input) are evaluated
together by a `GateBank`: one sigmoid and one weighted sum for all of them instead of ~8 small kernels each, their
projections taken in the layer's one `ProjectionBank` matmul (with LoRA's down-projections).
"""
from __future__ import annotations

import torch
from torch import nn

from .projections import ProjectionBank

GATE_POOLINGS = ("masked", "all")


def pool_weights(mask: torch.Tensor | None, length: int, pooling: str, like: torch.Tensor,
                 cache: dict | None = None) -> torch.Tensor:
    """(B, 1, T) weights that average over real tokens ("masked") or over all positions ("all"); computed once
    per forward when a cache (the forward state's) is given."""
    key = ("pool_weights", pooling, length, like.dtype)
    if cache is not None and key in cache:
        return cache[key]
    if pooling == "masked" and mask is not None:
        weights = (mask / mask.sum(1, keepdim=True).clamp_min(1)).to(like.dtype).unsqueeze(1)
    else:
        weights = like.new_full((like.shape[0], 1, length), 1.0 / length)
    if cache is not None:
        cache[key] = weights
    return weights


class Gate(nn.Module):
    def __init__(self, hidden_size: int, pooling: str = "masked") -> None:
        super().__init__()
        if pooling not in GATE_POOLINGS:
            raise ValueError(f"gate pooling {pooling!r} is not one of {GATE_POOLINGS}")
        self.pooling = pooling
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)
        self.last: torch.Tensor | None = None  # gate values of the last forward, (B,), detached

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, cache: dict | None = None) -> torch.Tensor:
        return self.pooled(self.proj(hidden), mask, cache)

    def pooled(self, logits: torch.Tensor, mask: torch.Tensor | None, cache: dict | None = None) -> torch.Tensor:
        """The gate's (B,) value from its per-token logits `proj(hidden)` (B, T, 1), computed here or elsewhere (one
        matmul with other maps of the same tensor, see projections.py)."""
        value = pooled_sigmoid(logits, mask, self.pooling, cache).view(-1)
        self.last = value.detach()
        return value


def pooled_sigmoid(logits: torch.Tensor, mask: torch.Tensor | None, pooling: str, cache: dict | None) -> torch.Tensor:
    """(B, n): the average over tokens of sigmoid(`logits`) (B, T, n), as `pooling` says."""
    per_token = torch.sigmoid(logits)
    weights = pool_weights(mask, logits.shape[1], pooling, per_token, cache)
    return torch.bmm(weights, per_token).squeeze(1)


class GateBank:
    """Evaluates several gates that read the same hidden states in one pass; results cached per forward.

    The gates' projections are one part of `projections`, the bank of linear maps of that tensor (one matmul with,
    e.g., LoRA's down-projections of the same layer input)."""

    def __init__(self, state, key, projections: ProjectionBank) -> None:
        self.state = state
        self.key = key
        self.projections = projections
        self.gates: dict[str, list[Gate]] = {}  # task -> gates in registration order
        self._logits: dict[str, object] = {}  # task -> its gates' columns of the projection bank

    def add(self, task: str, gate: Gate, source) -> "callable":
        """Register `gate` (reading `source()`), returning a function that yields its (B,) value."""
        gates = self.gates.setdefault(task, [])
        index = len(gates)
        gates.append(gate)
        if task not in self._logits:  # one part for all of the task's gates, stacked when read
            self._logits[task] = self.projections.add(task, lambda: (
                torch.cat([g.proj.weight for g in self.gates[task]], 0),
                torch.cat([g.proj.bias for g in self.gates[task]], 0)))

        def value() -> torch.Tensor:
            return self._values(task, source)[:, index]

        return value

    def _values(self, task: str, source) -> torch.Tensor:
        cache_key = ("gate_bank", self.key, task)
        cache = self.state.cache
        if cache_key not in cache:
            gates = self.gates[task]
            values = pooled_sigmoid(self._logits[task](source()), self.state.mask, gates[0].pooling, cache)  # (B, n)
            detached = values.detach()
            for i, gate in enumerate(gates):
                gate.last = detached[:, i]
            cache[cache_key] = values
        return cache[cache_key]

    def remove_task(self, task: str) -> None:
        self.gates.pop(task, None)
        self._logits.pop(task, None)


def scale(x: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """Multiply a (B, ...) tensor by a per-example gate (B,); no gate means a gate fixed at 1."""
    if g is None:
        return x
    return x * g.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
