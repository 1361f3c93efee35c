"""Injection points in the frozen encoder.

A site wraps one encoder module and adds the *active task's* contributions to it, so several tasks' modules
can live on one encoder and be switched by name. Methods register callables; they never patch HF code.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .state import ForwardState


class ModuleSite(nn.Module):
    """y = base(x) + sum(delta(x)), then each post(y) in order, for the active task only."""

    def __init__(self, base: nn.Module, state: ForwardState) -> None:
        super().__init__()
        self.base = base
        self._state = state
        self._deltas: dict[str, list[Callable]] = {}
        self._posts: dict[str, list[Callable]] = {}
        self._replace: dict[str, Callable] = {}  # task -> a callable used instead of `base` (grouped dropout)

    def add_delta(self, task: str, fn: Callable) -> None:
        self._deltas.setdefault(task, []).append(fn)

    def add_post(self, task: str, fn: Callable) -> None:
        self._posts.setdefault(task, []).append(fn)

    def set_replace(self, task: str, fn: Callable) -> None:
        self._replace[task] = fn

    def remove_task(self, task: str) -> None:
        self._deltas.pop(task, None)
        self._posts.pop(task, None)
        self._replace.pop(task, None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        task = self._state.active
        replace = self._replace.get(task)
        y = self.base(x, *args, **kwargs) if replace is None else replace(x)
        for fn in self._deltas.get(task, ()):
            y = y + fn(x)
        for fn in self._posts.get(task, ()):
            y = fn(y)
        return y


class PrefixAttentionSite(nn.Module):
    """Self-attention that can prepend per-task prefix keys/values.

    With no prefix for the active task it calls the original module unchanged. With one, it recomputes the
    attention with PyTorch SDPA over [prefix; tokens] and builds the key mask from the padding mask
    (prefix positions are always visible).
    """

    def __init__(self, base: nn.Module, state: ForwardState, linears: dict, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.base = base
        self._state = state
        self._paths = linears
        self.num_heads = num_heads
        self.head_dim = head_dim
        self._prefix: dict[str, Callable] = {}
        self._replace: dict[str, Callable] = {}  # task -> the whole attention computed elsewhere (grouped runs)

    def set_prefix(self, task: str, fn: Callable) -> None:
        self._prefix[task] = fn

    def set_replace(self, task: str, fn: Callable) -> None:
        self._replace[task] = fn

    def remove_task(self, task: str) -> None:
        self._prefix.pop(task, None)
        self._replace.pop(task, None)

    def projections(self, hidden_states: torch.Tensor):
        """Query, key and value in (B, H, T, D), through the sites on those linears (LoRA, BitFit)."""
        base = self.base
        q = self._heads(base.get_submodule(self._paths["query"])(hidden_states))
        k = self._heads(base.get_submodule(self._paths["key"])(hidden_states))
        v = self._heads(base.get_submodule(self._paths["value"])(hidden_states))
        return q, k, v

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, *, score_bias=None, **kwargs):
        """`score_bias` (optional, B x H x T x T): added to the token-token attention scores of the recomputed
        attention (e.g. MPNet's relative position bias); prefix columns get no bias. Used only with a prefix."""
        replace = self._replace.get(self._state.active)
        if replace is not None:
            return replace(self, hidden_states, score_bias=score_bias, **kwargs)
        fn = self._prefix.get(self._state.active)
        if fn is None:
            return self.base(hidden_states, attention_mask=attention_mask, **kwargs)
        prefix_k, prefix_v = fn(hidden_states)  # (B, H, P, D) each
        base = self.base
        q, k, v = self.projections(hidden_states)  # sites (LoRA, BitFit) included
        k = torch.cat([prefix_k.to(k.dtype), k], dim=2)
        v = torch.cat([prefix_v.to(v.dtype), v], dim=2)
        mask = self._state.key_mask(prefix_k.shape[2])
        if score_bias is not None:
            mask = self._with_score_bias(mask, score_bias, prefix_k.shape[2], q.dtype)
        dropout = getattr(base, "dropout", None)
        p = dropout.p if (self.training and dropout is not None) else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.head_dim**-0.5)
        b, _, t, _ = out.shape
        return out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim), None

    def _with_score_bias(self, mask, bias: torch.Tensor, prefix_len: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive SDPA mask (B, H, T, P + T): zeros for the prefix columns, `bias` for the token columns, -inf where
        `mask` hides a key. Built once per forward and shared by all layers (one bias per encoder forward)."""
        key = ("score_bias", prefix_len, dtype)
        if key not in self._state.cache:
            full = F.pad(bias.to(dtype), (prefix_len, 0))
            self._state.cache[key] = full if mask is None else full.masked_fill(~mask, float("-inf"))
        return self._state.cache[key]
