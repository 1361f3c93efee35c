"""UniPELT gates: g = mean over tokens of sigmoid(W_g h + b_g), one value per example.

The original UniPELT code averages over all positions, padding included; the default here averages over real
tokens only (`pooling="masked"`), so a gate does not depend on how much a batch is padded. `pooling="all"`
restores the original behaviour.
"""
from __future__ import annotations

import torch
from torch import nn

GATE_POOLINGS = ("masked", "all")


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

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        per_token = torch.sigmoid(self.proj(hidden)).squeeze(-1)  # (B, T)
        if self.pooling == "masked" and mask is not None:
            value = (per_token * mask).sum(1) / mask.sum(1).clamp_min(1)
        else:
            value = per_token.mean(1)
        self.last = value.detach()
        return value


def scale(x: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """Multiply a (B, ...) tensor by a per-example gate (B,); no gate means a gate fixed at 1."""
    if g is None:
        return x
    return x * g.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
