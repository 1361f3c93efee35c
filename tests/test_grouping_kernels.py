"""The grouped step's lean dropout kernels (grouping/attention.py, noise.py) give bit for bit the numbers of the plain
formulas they replace, values and gradients, so grouped records do not move; and they write the largest tensors
fewer times."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from unipelt.grouping.attention import dropout_attention
from unipelt.grouping.noise import apply_dropout, keep_mask


def plain_attention(q, k, v, mask, tokens, cols, p, scale):
    """The formula the grouped step used before (autograd through every op)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores.float(), dim=-1)
    probs = probs * keep_mask(tokens, cols, p).to(probs.dtype) * (1.0 / (1.0 - p))
    return torch.matmul(probs.to(v.dtype), v)


def plain_dropout(x, keep, p):
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


def attention_inputs(dtype, prefix: int, additive: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, H, T, D = 6, 3, 9, 8
    S = prefix + T
    # q in the projection's (n, T, H, D) layout seen as (n, H, T, D): a non-contiguous view, as the engine passes it
    q = torch.randn(n, T, H, D, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(n, H, S, D, generator=g).to(dtype)
    v = torch.randn(n, H, S, D, generator=g).to(dtype)
    lengths = torch.tensor([9, 7, 5, 9, 3, 8])
    keep = torch.arange(T)[None] < lengths[:, None]
    keep = torch.cat([torch.tensor([True, False] * 3)[:, None].expand(-1, prefix), keep], 1)[:, None, None, :]
    mask = keep
    if additive:  # a score bias (MPNet) on top: an fp32 additive mask that promotes bf16 scores
        mask = torch.randn(n, H, T, S, generator=g).masked_fill(~keep, float("-inf"))
    tokens = torch.rand(n, H, T, T, generator=g).half().float()
    cols = torch.rand(n, H, T, prefix, generator=g) if prefix else None
    return [t.requires_grad_() for t in (q, k, v)], mask, tokens, cols


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
@pytest.mark.parametrize("prefix,additive", [(0, False), (4, False), (4, True)])
def test_dropout_attention_gives_the_plain_formulas_values_and_gradients_bit_for_bit(dtype, autocast, prefix, additive):
    outs = []
    for fn in (plain_attention, dropout_attention):
        (q, k, v), mask, tokens, cols = attention_inputs(dtype, prefix, additive)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(q, k, v, mask, tokens, cols, 0.1, 8 ** -0.5)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        out.backward(grad)
        outs.append([out.detach(), q.grad, k.grad, v.grad])
    for name, a, b in zip(["out", "dq", "dk", "dv"], *outs):
        assert bitwise(a, b), (name, (a.float() - b.float()).abs().max().item())
    assert outs[0][0].abs().sum() > 0 and outs[0][1].abs().sum() > 0  # not vacuous


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_dropout_with_a_float_rate_gives_the_plain_formulas_numbers_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 5, 16, generator=g).to(dtype)
    keep = torch.rand(4, 5, 16, generator=g) >= 0.1
    upstream = torch.randn(4, 5, 16, generator=g).to(dtype)
    results = []
    for fn in (plain_dropout, apply_dropout):
        x = base.clone().requires_grad_()
        y = fn(x, keep, 0.1)
        y.backward(upstream)
        results.append((y.detach(), x.grad))
    assert bitwise(results[0][0], results[1][0]) and bitwise(results[0][1], results[1][1])
    assert (results[1][0][~keep] == 0).all() and (results[1][0][keep] != 0).any()
    # a per-run rate (a tensor) still takes the plain formula
    rates = torch.tensor([0.1, 0.2, 0.0, 0.5]).view(4, 1, 1)
    assert bitwise(apply_dropout(base, keep, rates), plain_dropout(base, keep, rates))


class _BigWrites(TorchDispatchMode):
    """Counts ops whose output has `numel` elements or more (the attention probabilities' size)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.numel() >= self.numel and out._base is None \
                and func.overloadpacket.__name__ not in ("view", "_unsafe_view", "transpose", "expand", "detach"):
            self.count += 1
        return out


def test_dropout_attention_writes_the_probability_sized_tensors_fewer_times():
    counts = []
    for fn in (plain_attention, dropout_attention):
        (q, k, v), mask, tokens, cols = attention_inputs(torch.float32, 4, False)
        mode = _BigWrites(6 * 3 * 9 * 13)
        with mode, torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(q, k, v, mask, tokens, cols, 0.1, 8 ** -0.5)
            out.sum().backward()
        counts.append(mode.count)
    plain, lean = counts
    assert lean <= plain - 4, counts  # the fp32 keep mask, a product and a cast forward; a cast and a product back
