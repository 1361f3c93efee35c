"""Bottleneck adapters: x + up(act(down(x))), placed before the residual add & LayerNorm.

`houlsby` puts one after the attention output projection and one after the feed-forward block; `pfeiffer`
only after the feed-forward block. The up projection starts at zero, so a fresh adapter is the identity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..gates import Gate, scale
from .base import MethodConfig, PeltMethod, register_method

PLACEMENTS = {"houlsby": ("attn", "ffn"), "pfeiffer": ("ffn",)}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


@dataclass
class AdapterConfig(MethodConfig):
    placement: str = "pfeiffer"
    reduction_factor: int = 16
    bottleneck_dim: int | None = None  # overrides reduction_factor when set
    activation: str = "relu"

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"adapter placement {self.placement!r} is not one of {sorted(PLACEMENTS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"adapter activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if self.bottleneck_dim is None and self.reduction_factor < 1:
            raise ValueError(f"adapter reduction_factor must be >= 1, got {self.reduction_factor}")


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, dim: int, activation: str, gate: Gate | None) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(dim, hidden)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.gate = gate

    def apply(self, x: torch.Tensor, mask: torch.Tensor | None, cache: dict | None = None) -> torch.Tensor:  # type: ignore[override]
        update = self.up(self.act(self.down(x)))
        if self.gate is not None:
            update = scale(update, self.gate(x, mask, cache))  # the gate reads the adapter's own input
        return x + update


@register_method
class AdapterMethod(PeltMethod):
    name = "adapter"
    config_class = AdapterConfig

    def __init__(self, config: AdapterConfig, info, gate_pooling: str = "masked") -> None:
        super().__init__(config, info, gate_pooling)
        dim = config.bottleneck_dim or max(1, info.hidden_size // config.reduction_factor)
        self.bottleneck_dim = dim
        self.blocks = nn.ModuleDict(
            {
                where: nn.ModuleList(
                    Bottleneck(info.hidden_size, dim, config.activation, self.new_gate()) for _ in range(info.num_layers)
                )
                for where in PLACEMENTS[config.placement]
            }
        )

    def attach(self, injector, task: str) -> None:
        paths = {"attn": injector.backbone.attn_output_site, "ffn": injector.backbone.ffn_output_site}
        for where, blocks in self.blocks.items():
            for i, block in enumerate(blocks):
                injector.site(i, paths[where]).add_post(task, _bind(block, injector))

    def gates(self) -> dict[str, list[Gate]]:
        if not self.config.gate:
            return {}
        return {f"adapter_{where}": [b.gate for b in blocks] for where, blocks in self.blocks.items()}


def _bind(block: Bottleneck, injector):
    return lambda y: block.apply(y, injector.mask, injector.state.cache)
