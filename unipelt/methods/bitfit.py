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
from .base import MethodConfig, PeltMethod, register_method


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
