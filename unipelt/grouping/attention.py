"""The grouped training step's attention with per-run dropout on its probabilities.

A grouped step cannot use a fused attention kernel if each run's dropout mask on the probabilities is to come from
its own stream (noise.py; `group.attention_dropout=fused` gives that up for one, `fused_dropout_attention`), so the
probabilities are explicit: scores, mask, an fp32 softmax, the kept probabilities scaled
by 1/(1-p), the products. These tensors are the largest of the step (rows x heads x length x (prefix + length)), and
autograd on the plain formula writes each of them several times over: the keep mask cast to fp32, two products and a
cast forward, a cast and two products backward. `_DropoutAttention` computes the same numbers with one product each
way (the mask times 1/(1-p) made once, the product rounded straight into the matmul's dtype) and runs every matmul as
autograd would (the same bmm operands and layouts), so forward values and gradients are bit for bit those of the plain
formula (tests/test_grouping_kernels.py). Inductor on the plain formula saved 4% of a graphed group's epoch on an
H200 (experiments/results/bench/group_graphs.md); this saves more and compiles nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sites import matmul_dtype
from .noise import dropout_scale, keep_mask

# group.attention_dropout: where the dropout mask on the attention probabilities comes from
DROPOUT_SOURCES = ("per_run", "fused")


def check_attention_dropout(value) -> str:
    """`value` if it is a valid group.attention_dropout, else ValueError."""
    if value not in DROPOUT_SOURCES:
        raise ValueError(f"group.attention_dropout must be one of {', '.join(DROPOUT_SOURCES)}, got {value!r}")
    return value


def fused_dropout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, p: float,
                            scale: float) -> torch.Tensor:
    """group.attention_dropout=fused: one fused SDPA kernel, whose dropout draws its mask from the process's default
    generator. No probabilities are written to memory (forward or backward), and no per-run noise is drawn for
    them; the price is that a run's attention dropout masks depend on its group (the hidden dropouts stay per run).
    The same distribution of masks, so the same training statistically, not the same run as alone."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scale)


def dropout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      noise_tokens: torch.Tensor, noise_prefix: torch.Tensor | None, p: float,
                      scale: float, compact: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale + mask) with dropout (keep where noise >= p; prefix columns first), times v.
    `mask`: bool (True = attend) or additive, broadcastable to the scores; None: no mask. q, k and v are cast to the
    dtype the matmuls run in (autocast's, as torch.matmul would cast them) before they enter.
    `compact` (group.activations=bf16): the probabilities and their gradient are stored in the scores' dtype (the
    softmax still accumulates in fp32 inside its kernel) instead of fp32: half the bytes of the step's largest
    tensors."""
    dtype = matmul_dtype(q)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    keep = dropout_scale(keep_mask(noise_tokens, noise_prefix, p), p)
    with torch.autocast(q.device.type, enabled=False):
        return _DropoutAttention.apply(q, k, v, mask, keep, scale, compact)


def _bmm4(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.matmul of two 4-D tensors with equal batch dims, as it runs: both reshaped to 3-D (a copy where a view
    cannot do), one bmm. Returns the product (4-D) and the two 3-D operands (what autograd would save)."""
    n = a.shape[0] * a.shape[1]
    a3, b3 = a.reshape(n, a.shape[2], a.shape[3]), b.reshape(n, b.shape[2], b.shape[3])
    return torch.bmm(a3, b3).view(a.shape[0], a.shape[1], a.shape[2], b.shape[3]), a3, b3


class _DropoutAttention(torch.autograd.Function):
    """out = dropout(softmax(fp32(q k^T * scale (+ mask)))) v with the dropout given as `keep` (the keep mask times
    1/(1-p), fp32). q, k, v share one dtype (the matmuls'). `compact`: probabilities in the scores' dtype."""

    @staticmethod
    def forward(ctx, q, k, v, mask, keep, scale, compact):
        scores, q3, kt3 = _bmm4(q, k.transpose(-1, -2))
        scores = scores * scale
        if mask is not None and mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        elif mask is not None:
            scores = scores + mask  # an additive mask may promote the scores (as the plain formula does)
        score_dtype = scores.dtype
        probs = torch.softmax(scores if compact else scores.float(), dim=-1)
        kept = torch.mul(probs, keep, out=torch.empty_like(probs, dtype=v.dtype))  # rounded once, into v's dtype
        out, kept3, v3 = _bmm4(kept, v)
        ctx.save_for_backward(q3, kt3, kept3, v3, probs, keep)
        ctx.meta = (q.shape, k.shape, v.shape, score_dtype, q.dtype)  # shapes and dtypes
        ctx.scale, ctx.compact = scale, compact
        return out

    @staticmethod
    def backward(ctx, grad):
        q3, kt3, kept3, v3, probs, keep = ctx.saved_tensors
        q_shape, k_shape, v_shape, score_dtype, dtype = ctx.meta
        n, t = q3.shape[0], q3.shape[1]
        g3 = grad.reshape(n, t, v3.shape[2])
        d_kept = torch.bmm(g3, v3.transpose(1, 2))  # (n, t, s) in the matmuls' dtype
        dv = torch.bmm(kept3.transpose(1, 2), g3).view(v_shape)
        # the gradient times 1/(1-p) where kept, in the probabilities' dtype (fp32 unless compact)
        d_kept = d_kept.view(probs.shape)
        d_probs = torch.mul(d_kept, keep, out=torch.empty_like(probs)) if ctx.compact else torch.mul(d_kept, keep)
        d_scores = torch._softmax_backward_data(d_probs, probs, -1, probs.dtype)
        d_scores = d_scores.to(score_dtype).to(dtype).mul_(ctx.scale).reshape(n, t, -1)
        dq = torch.bmm(d_scores, kt3.transpose(1, 2)).view(q_shape)
        dk = torch.bmm(q3.transpose(1, 2), d_scores).view(k_shape[0], k_shape[1], k_shape[3], k_shape[2])
        return dq, dk.transpose(-1, -2), dv, None, None, None, None
