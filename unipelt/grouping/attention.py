"""The grouped training step's attention with per-run dropout on its probabilities.

A grouped step cannot use a fused attention kernel: each run's dropout mask on the probabilities comes from its own
stream (noise.py), so the probabilities are explicit: scores, mask, an fp32 softmax, the keep mask read from the
run's noise, the products, a cast back. One pure function of tensors, so that it can be timed, compiled or replaced
on its own (inductor on it saved 4% of a graphed group's epoch on an H200, too little to keep:
experiments/results/bench/group_graphs.md).
"""
from __future__ import annotations

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
