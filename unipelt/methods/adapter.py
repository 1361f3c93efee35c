"""Bottleneck adapters: x + up(act(down(x))), placed before the residual add & LayerNorm.

`houlsby` puts one after the attention output projection and one after the feed-forward block; `pfeiffer`
only after the feed-forward block. The up projection starts at zero, so a fresh adapter is the identity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..gates import Gate, scale
from ..projections import stacked_linear
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
        if self.gate is None:
            return x + self.up(self.act(self.down(x)))
        # the gate reads the adapter's own input: its projection and the down-projection are one matmul
        hidden, logits = stacked_linear(x, [(self.down.weight, self.down.bias),
                                            (self.gate.proj.weight, self.gate.proj.bias)])
        return x + scale(self.up(self.act(hidden)), self.gate.pooled(logits, mask, cache))


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

    # --- grouped training -------------------------------------------------------------------------------------
    groupable = True

    @classmethod
    def group_key(cls, config: AdapterConfig) -> tuple:
        return (config.bottleneck_dim, config.reduction_factor, config.activation)

    @classmethod
    def attach_group(cls, engine) -> None:
        from ..grouping.engine import GROUP

        bb = engine.injector.backbone
        paths = {"attn": bb.attn_output_site, "ffn": bb.ffn_output_site}
        placements = sorted({where for m in engine.member_methods(cls.name) for where in m.blocks})
        for where in placements:
            for i in range(engine.info.num_layers):
                engine.injector.site(i, paths[where]).add_post(GROUP, _group_post(engine, where, i))


def _group_post(engine, where: str, layer: int):
    """y + g_r * up_r(act(down_r(y))) for each run r's rows, as batched matmuls (zeros for runs without it)."""

    def post(y: torch.Tensor) -> torch.Tensor:
        R = engine.R
        methods = engine.methods("adapter")
        if not any(m is not None and where in m.blocks for m in methods):
            return y
        first = next(m for m in methods if m is not None)
        h, d = engine.info.hidden_size, first.bottleneck_dim

        def blocks(m):
            return m.blocks[where] if where in m.blocks else None

        dtype = engine.compute_dtype(y)

        def params(attr, shape):
            return engine.stack_layers(("adapter", where, attr), "adapter",
                                       lambda m: [_attr(b, attr) for b in blocks(m)] if blocks(m) is not None else None,
                                       shape, dtype=dtype)[layer]

        down_w, down_b = params("down.weight", (d, h)), params("down.bias", (d,))
        up_w, up_b = params("up.weight", (h, d)), params("up.bias", (h,))
        y3 = y.reshape(R, -1, h).to(dtype)
        z = first.blocks[next(iter(first.blocks))][0].act(
            torch.baddbmm(down_b.unsqueeze(1), y3, down_w.transpose(1, 2)))
        update = torch.baddbmm(up_b.to(z.dtype).unsqueeze(1), z, up_w.to(z.dtype).transpose(1, 2)).view(y.shape)
        def layer_gates(m):
            return [b.gate for b in blocks(m)] if blocks(m) is not None else None

        values, gated = engine.input_gate(y, "adapter", layer_gates, f"adapter_{where}", layer)
        if values is not None:
            mult = torch.where(engine.rows(gated), values, 1.0)
            update = update * mult.to(update.dtype).view(-1, *([1] * (update.dim() - 1)))
        return y + update

    return post


def _attr(module: nn.Module, dotted: str) -> torch.Tensor:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _bind(block: Bottleneck, injector):
    return lambda y: block.apply(y, injector.mask, injector.state.cache)
