"""Prefix-tuning: trainable keys and values prepended to every layer's self-attention.

While training, the prefix is produced by an MLP over a small embedding (Li & Liang's reparameterisation):
Embedding(P, h) -> Linear(h, 512) -> Tanh -> Linear(512, layers * 2 * h). `fold()` runs the MLP once and keeps
only its output as plain tensors: same outputs, far fewer parameters to store. With a gate (one per layer,
reading the layer input), both prefix keys and prefix values are scaled by it, as in the UniPELT code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..gates import Gate, scale
from .base import MethodConfig, PeltMethod, not_groupable, register_method


@dataclass
class PrefixConfig(MethodConfig):
    length: int = 10
    mlp_hidden: int = 512
    dropout: float = 0.0
    folded: bool = False  # True when the saved prefix is the folded tensors (no MLP)

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"prefix length must be >= 1, got {self.length}")


@register_method
class PrefixMethod(PeltMethod):
    name = "prefix"
    config_class = PrefixConfig

    def __init__(self, config: PrefixConfig, info, gate_pooling: str = "masked") -> None:
        super().__init__(config, info, gate_pooling)
        h, n = info.hidden_size, info.num_layers
        self.dropout = nn.Dropout(config.dropout)
        if config.folded:
            self.kv = nn.Parameter(torch.zeros(n, 2, config.length, h))
        else:
            self.embedding = nn.Embedding(config.length, h)
            self.mlp = nn.Sequential(nn.Linear(h, config.mlp_hidden), nn.Tanh(), nn.Linear(config.mlp_hidden, n * 2 * h))
        self.gate_modules = nn.ModuleList(self.new_gate() for _ in range(n)) if config.gate else None

    @property
    def folded(self) -> bool:
        return self.config.folded

    def prefix_states(self) -> torch.Tensor:
        """(layers, 2, P, hidden): the prefix keys and values of every layer."""
        if self.folded:
            return self.kv
        cfg, info = self.config, self.info
        index = torch.arange(cfg.length, device=self.embedding.weight.device)
        out = self.mlp(self.embedding(index))  # (P, layers * 2 * h)
        return out.view(cfg.length, info.num_layers, 2, info.hidden_size).permute(1, 2, 0, 3)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP by its output. Refused while training: the MLP is what gets trained."""
        if self.training:
            raise RuntimeError("cannot fold the prefix while training: call model.eval() first (folding freezes the MLP)")
        if self.folded:
            return
        states = self.prefix_states().detach().clone()
        del self.embedding, self.mlp
        self.kv = nn.Parameter(states)
        self.config.folded = True

    def attach(self, injector, task: str) -> None:
        for i in range(self.info.num_layers):
            gate = injector.layer_gate(i, task, self.gate_modules[i]) if self.gate_modules is not None else None
            injector.attention_site(i).set_prefix(task, self._provider(injector, i, gate))

    def _provider(self, injector, index: int, gate):
        info = self.info

        def provide(hidden: torch.Tensor):
            key = ("prefix", id(self))
            if key not in injector.state.cache:  # computed once per forward, shared by all layers
                injector.state.cache[key] = self.dropout(self.prefix_states())
            kv = injector.state.cache[key][index]  # (2, P, h)
            b = hidden.shape[0]
            p = kv.shape[1]
            kv = kv.view(2, p, info.num_heads, info.head_dim).permute(0, 2, 1, 3)  # (2, H, P, D)
            k, v = kv[0].expand(b, -1, -1, -1), kv[1].expand(b, -1, -1, -1)
            if gate is not None:
                g = gate()
                k, v = scale(k, g), scale(v, g)
            return k, v

        return provide

    def gates(self) -> dict[str, list[Gate]]:
        return {"prefix": list(self.gate_modules)} if self.gate_modules is not None else {}

    # --- grouped training -------------------------------------------------------------------------------------
    groupable = True

    @classmethod
    def group_key(cls, config: PrefixConfig) -> tuple:
        if config.dropout:
            raise not_groupable(f"prefix dropout {config.dropout} is not grouped")
        return (config.length,)

    @classmethod
    def attach_group(cls, engine) -> None:
        members = engine.member_methods(cls.name)
        length = members[0].config.length
        info = engine.info
        for i in range(info.num_layers):
            engine.layer_gate(i, "prefix", cls.name,
                              lambda m, i=i: m.gate_modules[i] if m.gate_modules is not None else None)

        def provide(layer: int):
            R, B = engine.R, engine.B
            methods = engine.methods(cls.name)
            if all(m is None for m in methods):
                return None
            # every run's prefix states, (R, num_layers, 2, length, hidden), split per layer once per forward
            states = engine.cached(("prefix_layers",), lambda: _group_states(engine, cls.name, info, length).unbind(1),
                                   stable=True)
            kv = states[layer].view(R, 2, length, info.num_heads, info.head_dim).permute(1, 0, 3, 2, 4)
            shape = (R * B, info.num_heads, length, info.head_dim)
            values, gated = engine.gate(layer, "prefix")
            if values is not None:  # the gate's product makes each row's copy: no expanded copy first
                g = torch.where(engine.rows(gated), values, 1.0).view(R, B, 1, 1, 1).to(kv.dtype)
                k, v = (kv[0].unsqueeze(1) * g).reshape(shape), (kv[1].unsqueeze(1) * g).reshape(shape)
            else:
                k = kv[0].unsqueeze(1).expand(R, B, -1, -1, -1).reshape(shape)
                v = kv[1].unsqueeze(1).expand(R, B, -1, -1, -1).reshape(shape)
            has = engine.per_run("has_prefix", [m is not None for m in methods]).bool()
            return k, v, has

        engine.set_prefix_provider(length, provide)

    def size_report(self) -> dict[str, int]:
        cfg, info = self.config, self.info
        folded = info.num_layers * 2 * cfg.length * info.hidden_size
        h = info.hidden_size
        training = cfg.length * h + h * cfg.mlp_hidden + cfg.mlp_hidden + cfg.mlp_hidden * info.num_layers * 2 * h + info.num_layers * 2 * h
        return {"prefix_training_params": training, "prefix_folded_params": folded}


def _group_states(engine, name: str, info, length: int) -> torch.Tensor:
    """(R, layers, 2, P, h) prefix states of the live runs (zeros for runs without a prefix). The MLPs of all runs
    run as one batched MLP over their stacked weights (the group's stacks, grouping/stacks.py), the same arithmetic
    as each run's `prefix_states()`; folded prefixes (no MLP) are stacked as they are."""
    R = engine.R
    shape = (info.num_layers, 2, length, info.hidden_size)
    if any(m is not None and m.folded for m in engine.member_methods(name)):
        return engine.stack("prefix_states", name, lambda m: [m.prefix_states()], shape, parameters=False)[:, 0]
    (emb, w1, b1, w2, b2), positions = engine.owned_stacks("prefix_mlp", name, lambda methods: [
        [m.embedding.weight for m in methods], [m.mlp[0].weight for m in methods], [m.mlp[0].bias for m in methods],
        [m.mlp[2].weight for m in methods], [m.mlp[2].bias for m in methods]])
    dtype = engine.compute_dtype(emb)
    hidden = torch.tanh(torch.baddbmm(b1.to(dtype).unsqueeze(1), emb.to(dtype), w1.to(dtype).transpose(1, 2)))
    out = torch.baddbmm(b2.to(dtype).unsqueeze(1), hidden, w2.to(dtype).transpose(1, 2))  # (R', P, layers*2*h)
    states = out.view(-1, length, *shape[:2], info.hidden_size).permute(0, 2, 3, 1, 4)
    if positions is None:
        return states
    return states.new_zeros(R, *shape).index_copy(0, positions, states)
