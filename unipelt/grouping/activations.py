"""bf16 activations for grouped training (`group.activations=bf16`): the hidden states stay bf16 between layers.

Under bf16 autocast the matmuls run in bf16, but the stream between them does not: autocast runs layer norms in
fp32 and returns fp32, and a per-run fp32 term (a BitFit bias, a LoRA delta) added to a bf16 matmul output
promotes it to fp32. So the residual stream, its dropouts and adds, and every gradient that flows back through them
move 4 bytes per value, and the next matmul casts them again. A grouped step is bound by those bytes, not by its
FLOPs (experiments/group_step_traffic.py counts them).

With this mode the frozen encoder (embeddings and layer norms included) is stored in bf16, layer norms normalise
in fp32 inside the kernel and return bf16, the runs' deltas join each output in its dtype, and the grouped
attention keeps its probabilities and their gradient in bf16 (attention.py, `compact`; the softmax accumulates in
fp32 inside its kernel). The runs' own parameters, their gradients and AdamW stay fp32, as do the dropout scale and
the loss. The numbers differ from the fp32 stream by bf16 rounding, so it is a setting the records state, off by
default.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..model import PeltModel

CHOICES = ("fp32", "bf16")


class StreamLayerNorm(torch.nn.LayerNorm):
    """A frozen LayerNorm that returns its input's dtype: the normalisation is computed in fp32 inside the kernel
    (as torch does for bf16 inputs), outside autocast, which would return fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.to(self.weight.dtype), self.normalized_shape, self.weight, self.bias, self.eps)


def check_activations(value, mixed_precision: str) -> str:
    """`value` if it is a valid group.activations for train.mixed_precision `mixed_precision`, else ValueError."""
    if value not in CHOICES:
        raise ValueError(f"group.activations must be one of {', '.join(CHOICES)}, got {value!r}")
    if value == "bf16" and mixed_precision != "bf16":
        raise ValueError(f"group.activations=bf16 needs train.mixed_precision=bf16 (the matmuls in bf16), got "
                         f"train.mixed_precision={mixed_precision!r}")
    return value


def use_bf16_stream(model: "PeltModel") -> None:
    """Store the frozen encoder in bf16, make its layer norms return bf16 and the sites add deltas in the output's
    dtype. For a model that trains in groups only: the runs' modules keep fp32."""
    for module in model.encoder.modules():
        if isinstance(module, torch.nn.LayerNorm) and not isinstance(module, StreamLayerNorm):
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                raise ValueError("group.activations=bf16 needs a frozen encoder; a layer norm trains")
            module.__class__ = StreamLayerNorm  # same parameters and state dict, another forward
        for param in module.parameters(recurse=False):
            if not param.requires_grad and param.is_floating_point():
                param.data = param.data.to(torch.bfloat16)
    model.state.activations = "bf16"
