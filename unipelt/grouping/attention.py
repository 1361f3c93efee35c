"""The grouped training step's attention with per-run dropout on its probabilities, plain or compiled.

A grouped step cannot use a fused attention kernel: each run's dropout mask on the probabilities comes from its own
stream (noise.py), so the probabilities are explicit. Plain, that is about ten passes over (rows, heads, T, T)
tensors per layer (scores, mask, an fp32 softmax, the keep mask, its cast, two products, a cast back), the
largest share of a graphed step's GPU time (experiments/results/bench/group_graphs.md). `group.compile=true`
runs the same function through inductor (`compiled_dropout_attention`), which fuses the elementwise work into a few
kernels that read the noise where it lies. Same arithmetic up to float rounding (a fused softmax sums in another
order), so it is a result-relevant setting.
"""
from __future__ import annotations

import functools

import torch

from .noise import apply_dropout, keep_mask


def dropout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      noise_tokens: torch.Tensor, noise_prefix: torch.Tensor | None, p: float,
                      scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) with dropout (keep where noise >= p; prefix columns first), times v.
    `mask`: bool (True = attend) or additive, broadcastable to the scores; None: no mask."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores.float(), dim=-1)
    probs = apply_dropout(probs, keep_mask(noise_tokens, noise_prefix, p), p)
    return torch.matmul(probs.to(v.dtype), v)


@functools.cache
def compiled_dropout_attention():
    """`dropout_attention` compiled once per process (dynamic shapes: every bucket width and group size shares the
    kernels). Its first call compiles (seconds); a graphed step makes that call in its eager warm-up, never inside a
    capture."""
    return torch.compile(dropout_attention, dynamic=True, fullgraph=True)
