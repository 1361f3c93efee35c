"""Per-forward state shared by every injected module of one model.

The top-level forward records the padding mask and the active task here; a pre-hook on each layer records that
layer's input. Gates read from it, so no HF forward signature has to change.
"""
from __future__ import annotations

import torch


class ForwardState:
    def __init__(self) -> None:
        self.active: str | None = None
        self.mask: torch.Tensor | None = None  # (B, T) float, 1 for real tokens
        self.layer_inputs: dict[int, torch.Tensor] = {}
        self.cache: dict = {}
        # "bf16": hidden states stay in the matmuls' dtype, deltas join a module's output in its dtype and attention
        # probabilities are kept in it (grouping/activations.py); "fp32": the usual promotion (an fp32 delta makes
        # the output fp32)
        self.activations = "fp32"

    def begin(self, attention_mask: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.layer_inputs = {}
        self.cache = {}
        self.mask = None if attention_mask is None else attention_mask.to(dtype)

    def key_mask(self, prefix_len: int) -> torch.Tensor | None:
        """Boolean SDPA mask (B, 1, 1, P + T) that lets every query see the prefix and the real tokens.

        Built once per forward and shared by all layers. No host sync to test for padding (it would break
        torch.compile graphs and stall the GPU): callers that know a batch is unpadded pass no mask at all."""
        if self.mask is None:
            return None
        key = ("key_mask", prefix_len)
        if key not in self.cache:
            keep = self.mask > 0
            prefix = keep.new_ones(keep.shape[0], prefix_len)
            self.cache[key] = torch.cat([prefix, keep], dim=1)[:, None, None, :]
        return self.cache[key]
