"""Finds and wraps the encoder's injection sites, once per site, for every method and task."""
from __future__ import annotations

import torch
from torch import nn

from .backbones import BackboneMap
from .gates import Gate, GateBank
from .projections import ProjectionBank
from .sites import ModuleSite, PrefixAttentionSite
from .state import ForwardState


WRAPPERS = (ModuleSite, PrefixAttentionSite)


def _child(module: nn.Module, name: str) -> nn.Module:
    """Attribute `name` of `module`, looking through site wrappers (a wrapped module keeps its children)."""
    while isinstance(module, WRAPPERS) and name not in module._modules:
        module = module.base
    return getattr(module, name)


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    parent = root
    for atom in parent_path.split(".") if parent_path else ():
        parent = _child(parent, atom)
    while isinstance(parent, WRAPPERS) and name not in parent._modules:
        parent = parent.base
    return parent, name


def resolve(root: nn.Module, path: str) -> nn.Module:
    parent, name = _parent(root, path)
    return getattr(parent, name)


def replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, name = _parent(root, path)
    setattr(parent, name, module)


class Injector:
    def __init__(self, encoder: nn.Module, backbone: BackboneMap, state: ForwardState) -> None:
        self.encoder = encoder
        self.backbone = backbone
        self.state = state
        self.layers: nn.ModuleList = encoder.get_submodule(backbone.layers)
        self.num_layers = len(self.layers)
        self._sites: dict[tuple[int, str], nn.Module] = {}
        self._banks: dict[int, GateBank] = {}
        self._projections: dict[int, ProjectionBank] = {}
        for i, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(self._record_input(i), with_kwargs=True)

    def _record_input(self, index: int):
        def hook(module, args, kwargs):
            self.state.layer_inputs[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    # --- what methods read at forward time -------------------------------------------------------------
    def layer_input(self, index: int) -> torch.Tensor:
        return self.state.layer_inputs[index]

    @property
    def mask(self) -> torch.Tensor | None:
        return self.state.mask

    def layer_gate(self, index: int, task: str, gate: Gate):
        """Register a gate that reads layer `index`'s input; returns a function giving its (B,) value.

        All such gates of a layer are computed together (see GateBank)."""
        if index not in self._banks:
            self._banks[index] = GateBank(self.state, ("layer", index), self.layer_projections(index))
        return self._banks[index].add(task, gate, lambda: self.layer_input(index))

    def layer_projections(self, index: int) -> ProjectionBank:
        """The bank of linear maps of layer `index`'s input (its gates, LoRA's down-projections): one matmul."""
        if index not in self._projections:
            self._projections[index] = ProjectionBank(self.state, ("layer", index))
        return self._projections[index]

    # --- sites ------------------------------------------------------------------------------------------
    def site(self, index: int, path: str) -> ModuleSite:
        """The ModuleSite wrapping `path` inside layer `index` (created on first use)."""
        key = (index, path)
        if key not in self._sites:
            layer = self.layers[index]
            wrapped = ModuleSite(resolve(layer, path), self.state)
            wrapped.train(wrapped.base.training)  # follow the encoder's mode, not nn.Module's default
            replace(layer, path, wrapped)
            self._sites[key] = wrapped
        return self._sites[key]

    def root_site(self, path: str) -> ModuleSite:
        """The ModuleSite wrapping `path` relative to the encoder root (e.g. the embeddings' dropout)."""
        key = (-1, path)
        if key not in self._sites:
            wrapped = ModuleSite(resolve(self.encoder, path), self.state)
            wrapped.train(wrapped.base.training)
            replace(self.encoder, path, wrapped)
            self._sites[key] = wrapped
        return self._sites[key]

    def linear_site(self, index: int, role: str) -> ModuleSite:
        if role not in self.backbone.linears:
            raise ValueError(f"unknown linear {role!r}; this backbone has: {', '.join(self.backbone.linears)}")
        return self.site(index, self.backbone.linears[role])

    def attention_site(self, index: int) -> PrefixAttentionSite:
        key = (index, "<attention>")
        if key not in self._sites:
            layer = self.layers[index]
            path = self.backbone.self_attention
            inner = {
                role: self.backbone.linears[role][len(path) + 1 :] for role in ("query", "key", "value")
            }
            cfg = self.encoder.config
            heads = cfg.num_attention_heads
            site_class = self.backbone.attention_site or PrefixAttentionSite
            wrapped = site_class(resolve(layer, path), self.state, inner, heads, cfg.hidden_size // heads)
            wrapped.train(wrapped.base.training)
            replace(layer, path, wrapped)
            self._sites[key] = wrapped
        return self._sites[key]

    def base_module(self, index: int, path: str) -> nn.Module:
        """The original module at `path`, looking through a site wrapper if there is one."""
        module = resolve(self.layers[index], path)
        return module.base if isinstance(module, ModuleSite) else module

    def remove_task(self, task: str) -> None:
        for site in self._sites.values():
            site.remove_task(task)
        for bank in [*self._banks.values(), *self._projections.values()]:
            bank.remove_task(task)
