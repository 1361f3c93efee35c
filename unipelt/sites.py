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
        self._deltas: dict[str, list[tuple[Callable, Callable | None]]] = {}  # task -> (delta, its factors or None)
        self._posts: dict[str, list[Callable]] = {}
        self._replace: dict[str, Callable] = {}  # task -> a callable used instead of `base` (grouped dropout)

    def add_delta(self, task: str, fn: Callable, factors: Callable | None = None) -> None:
        """`fn(x)`: what to add to base(x). `factors(x)`, optional, gives (u, B) with fn(x) == u @ B.T (a low-rank
        delta, as LoRA's), so a caller that computes the base matmul itself can fold the delta into it."""
        self._deltas.setdefault(task, []).append((fn, factors))

    def factored(self) -> list[Callable]:
        """The active task's low-rank deltas' factor functions (see add_delta)."""
        return [f for _, f in self._deltas.get(self._state.active, ()) if f is not None]

    def add_post(self, task: str, fn: Callable) -> None:
        self._posts.setdefault(task, []).append(fn)

    def set_replace(self, task: str, fn: Callable) -> None:
        self._replace[task] = fn

    def remove_task(self, task: str) -> None:
        self._deltas.pop(task, None)
        self._posts.pop(task, None)
        self._replace.pop(task, None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        replace = self._replace.get(self._state.active)
        return self.finish(x, self.base(x, *args, **kwargs) if replace is None else replace(x))

    def finish(self, x: torch.Tensor, y: torch.Tensor, factored_done: bool = False) -> torch.Tensor:
        """`y` = base(x), computed here or elsewhere (a fused projection): add the active task's deltas of `x`, then
        apply its posts. `factored_done`: `y` already holds the low-rank deltas (folded into the caller's matmul)."""
        task = self._state.active
        same_dtype = self._state.activations == "bf16"
        for fn, factors in self._deltas.get(task, ()):
            if factored_done and factors is not None:
                continue
            delta = fn(x)
            y = y + (delta.to(y.dtype) if same_dtype and isinstance(delta, torch.Tensor) else delta)
        for fn in self._posts.get(task, ()):
            y = fn(y)
        return y

    def replaces(self) -> bool:
        """Whether the active task computes this module's output by another function (grouped dropout)."""
        return self._state.active in self._replace


def _fusable(modules: list[nn.Module], linears: list[nn.Module]) -> bool:
    """Whether q/k/v can run as one matmul: plain linears of one input size, dtype and device, all with a bias or none,
    and no site that replaces its module's output for the active task."""
    if any(isinstance(m, ModuleSite) and m.replaces() for m in modules):
        return False
    if not all(type(lin) is nn.Linear for lin in linears):
        return False
    first = linears[0].weight
    return (all(lin.in_features == linears[0].in_features and lin.weight.dtype == first.dtype
                and lin.weight.device == first.device for lin in linears)
            and len({lin.bias is None for lin in linears}) == 1)


def _fold_low_rank(x: torch.Tensor, weight: torch.Tensor, bias, modules: list, linears: list):
    """W x + b + u_j B_j^T for every low-rank delta j of the stacked linears, as one matmul with the inner dimension
    widened, [x | u_1 | u_2 ...] @ [W | B]^T, B holding each B_j in its linear's rows (zeros elsewhere). For LoRA on
    query and value this replaces two up-projection matmuls, their adds and their gate products on full-width outputs
    per layer by a copy of x; the backward gets dx and every du from one matmul and only B's weight gradient
    (`_WideFrozenLinear`). Returns the output, or None when no site has a low-rank delta."""
    pairs = [[f(x) for f in m.factored()] if isinstance(m, ModuleSite) else [] for m in modules]
    rank = sum(u.shape[-1] for ps in pairs for u, _ in ps)
    if not rank:
        return None
    rows, done = [], 0
    for lin, ps in zip(linears, pairs):
        d_out = lin.out_features
        blocks = [weight.new_zeros(d_out, done)] if done else []
        for u, b in ps:
            blocks.append(b.to(weight.dtype))
            done += u.shape[-1]
        if done < rank:
            blocks.append(weight.new_zeros(d_out, rank - done))
        rows.append(torch.cat(blocks, 1))
    us = [u for ps in pairs for u, _ in ps]
    return _WideFrozenLinear.apply(x, us[0] if len(us) == 1 else torch.cat(us, -1), weight, torch.cat(rows, 0), bias)


class _WideFrozenLinear(torch.autograd.Function):
    """y = [x | u] @ [W | B]^T + b for a frozen W and b. The backward computes dx (when x needs it) and du from one
    matmul and the weight gradient of B's columns only: autograd on the concatenated weight would also compute the
    frozen W's, a matmul as large as the layer's. Under autocast the matmuls run in the autocast dtype, forward and
    backward alike."""

    @staticmethod
    def forward(ctx, x, u, weight, low_rank, bias):
        ctx.dtypes, ctx.rank = (x.dtype, u.dtype, low_rank.dtype), u.shape[-1]
        dtype = matmul_dtype(x)  # the dtype F.linear would compute in
        wide = torch.cat([x.to(dtype), u.to(dtype)], -1)
        full = torch.cat([weight.to(dtype), low_rank.to(dtype)], 1)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(wide, full, bias)
        ctx.save_for_backward(wide, full)
        return y

    @staticmethod
    def backward(ctx, grad):
        wide, full = ctx.saved_tensors
        x_dtype, u_dtype, b_dtype = ctx.dtypes
        grad, rank = grad.to(full.dtype), ctx.rank
        if ctx.needs_input_grad[0]:  # dx and du from one matmul
            both = grad @ full
            grad_x, grad_u = both[..., :-rank], both[..., -rank:]
        else:  # the first layer's input needs no gradient: du only
            grad_x, grad_u = None, grad @ full[:, -rank:]
        u = wide[..., -rank:]
        grad_b = grad.reshape(-1, grad.shape[-1]).t() @ u.reshape(-1, rank)  # B's columns only
        return (None if grad_x is None else grad_x.to(x_dtype)), grad_u.to(u_dtype), None, grad_b.to(b_dtype), None


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of `x` runs in: autocast's where it is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


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

    def projections(self, hidden_states: torch.Tensor, fused: bool = True):
        """Query, key and value in (B, H, T, D), through the sites on those linears (LoRA, BitFit).

        `fused`: the three frozen projections run as one matmul over their concatenated weights (one GEMM instead of
        three forward, one input-gradient GEMM instead of three backward; the concatenation is a copy per forward, so
        weights that train, as in full fine-tuning, stay correct), then each site adds its task's deltas. Same values
        up to float rounding; where the linears are not plain nn.Linear of one input size, the per-linear path."""
        return tuple(self._heads(y) for y in self._linear_outputs(hidden_states, fused))

    def _linear_outputs(self, hidden_states: torch.Tensor, fused: bool = True) -> tuple[torch.Tensor, ...]:
        """Query, key and value in (B, T, H * D), as the linears (and their sites) give them."""
        modules = [self.base.get_submodule(self._paths[role]) for role in ("query", "key", "value")]
        linears = [m.base if isinstance(m, ModuleSite) else m for m in modules]
        if fused and _fusable(modules, linears):
            weight = torch.cat([lin.weight for lin in linears], 0)
            bias = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears], 0)
            frozen = not (weight.requires_grad or (bias is not None and bias.requires_grad))
            # the sites' low-rank deltas (LoRA) join the matmul, see _fold_low_rank; not where W trains (fine-tuning)
            y = _fold_low_rank(hidden_states, weight, bias, modules, linears) if frozen else None
            fold = y is not None
            if not fold:
                y = F.linear(hidden_states, weight, bias)
            outs = y.split([lin.out_features for lin in linears], dim=-1)
            return tuple(m.finish(hidden_states, y, factored_done=fold) if isinstance(m, ModuleSite) else y
                         for m, y in zip(modules, outs))
        return tuple(m(hidden_states) for m in modules)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def _with_prefix(self, prefix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[prefix; tokens] keys or values as a (B, H, P + T, D) view of a (B, P + T, H, D) tensor.

        The concatenation runs along the sequence in the projection's own layout (rows of H * D contiguous values),
        and so does its backward, which slices the tokens' gradient back out for the q/k/v matmul. Concatenating in
        (B, H, T, D) instead transposes in both directions: on an H100 that backward was the step's largest
        elementwise kernel (0.42 of 9.8 ms, BERT-base, batch 32)."""
        b, t, _ = x.shape
        tokens = x.view(b, t, self.num_heads, self.head_dim)
        return torch.cat([prefix.transpose(1, 2).to(x.dtype), tokens], dim=1).transpose(1, 2)

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
        q, k, v = self._linear_outputs(hidden_states)  # sites (LoRA, BitFit) included
        q, k, v = self._heads(q), self._with_prefix(prefix_k, k), self._with_prefix(prefix_v, v)
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
