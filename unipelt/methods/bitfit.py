"""BitFit: train only the encoder's bias terms (optionally LayerNorm weights too).

Biases are trained as *deltas* added to the frozen originals (b + delta, delta starting at 0). That keeps the
encoder bit-identical, lets several tasks' BitFit terms share one encoder, and makes BitFit gateable like the
other submodules (one gate per layer reading the layer input scales all of that layer's deltas).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..gates import Gate, scale
from .base import MethodConfig, PeltMethod, not_groupable, register_method


@dataclass
class BitFitConfig(MethodConfig):
    include_layernorm: bool = False  # also train LayerNorm weights (their biases are always included)


def _key(path: str) -> str:
    return path.replace(".", "__")


@register_method
class BitFitMethod(PeltMethod):
    name = "bitfit"
    config_class = BitFitConfig

    def __init__(self, config: BitFitConfig, info, gate_pooling: str = "masked") -> None:
        super().__init__(config, info, gate_pooling)
        self.layer_terms = nn.ModuleList()
        for _ in range(info.num_layers):
            terms = nn.ParameterDict()
            for role, (_, d_out) in info.linear_shapes.items():
                terms[_key(role)] = nn.Parameter(torch.zeros(d_out))
            for path in info.layer_norms:
                terms[_key(path) + "__bias"] = nn.Parameter(torch.zeros(info.hidden_size))
                if config.include_layernorm:
                    terms[_key(path) + "__weight"] = nn.Parameter(torch.zeros(info.hidden_size))
            self.layer_terms.append(terms)
        self.gate_modules = nn.ModuleList(self.new_gate() for _ in range(info.num_layers)) if config.gate else None

    def attach(self, injector, task: str) -> None:
        for i, terms in enumerate(self.layer_terms):
            gate = injector.layer_gate(i, task, self.gate_modules[i]) if self.gate_modules is not None else (lambda: None)
            for role in injector.backbone.linears:
                injector.linear_site(i, role).add_delta(task, _bias_delta(terms[_key(role)], gate))
            for path in injector.backbone.layer_norms:
                norm = injector.base_module(i, path)
                weight = terms[_key(path) + "__weight"] if self.config.include_layernorm else None
                injector.site(i, path).add_delta(task, _norm_delta(terms[_key(path) + "__bias"], weight, norm, gate))

    def gates(self) -> dict[str, list[Gate]]:
        return {"bitfit": list(self.gate_modules)} if self.gate_modules is not None else {}

    # --- grouped training -------------------------------------------------------------------------------------
    groupable = True

    @classmethod
    def group_key(cls, config: BitFitConfig) -> tuple:
        if config.include_layernorm:
            raise not_groupable("BitFit with include_layernorm=True is not grouped")
        return ()

    @classmethod
    def attach_group(cls, engine) -> None:
        from ..grouping.engine import GROUP

        bb = engine.injector.backbone
        for i in range(engine.info.num_layers):
            engine.layer_gate(i, "bitfit", cls.name,
                              lambda m, i=i: m.gate_modules[i] if m.gate_modules is not None else None)
            for role, (_, d_out) in engine.info.linear_shapes.items():
                engine.injector.linear_site(i, role).add_delta(GROUP, _group_bias(engine, _key(role), d_out, i))
            for path in bb.layer_norms:
                engine.injector.site(i, path).add_delta(
                    GROUP, _group_bias(engine, _key(path) + "__bias", engine.info.hidden_size, i))


def _group_bias(engine, key: str, width: int, layer: int):
    """Each run's bias delta (times its gate) on its own rows; zeros for runs without BitFit."""

    def delta(x: torch.Tensor) -> torch.Tensor:
        R, B = engine.R, engine.B
        if all(m is None for m in engine.methods("bitfit")):
            return 0.0
        deltas = engine.stack_layers(("bitfit", key), "bitfit", lambda m: [t[key] for t in m.layer_terms], (width,))
        d = deltas[layer].unsqueeze(1)  # (R, 1, width)
        values, gated = engine.gate(layer, "bitfit")
        if values is not None:
            mult = torch.where(engine.rows(gated), values, 1.0).view(R, B, 1)
            d = d * mult.to(d.dtype)
        else:
            d = d.expand(R, B, width)
        return d.reshape(R * B, *([1] * (x.dim() - 2)), width)

    return delta


def _bias_delta(delta: nn.Parameter, gate):
    def fn(x: torch.Tensor) -> torch.Tensor:
        g = gate()
        return delta if g is None else scale(delta.expand(x.shape[0], 1, -1), g)

    return fn


def _norm_delta(bias: nn.Parameter, weight: nn.Parameter | None, norm: nn.LayerNorm, gate):
    def fn(x: torch.Tensor) -> torch.Tensor:
        out = bias
        if weight is not None:
            out = out + F.layer_norm(x, norm.normalized_shape, None, None, norm.eps) * weight
        g = gate()
        if g is None:
            return out
        return scale(out if out.dim() > 1 else out.expand(x.shape[0], 1, -1), g)

    return fn
