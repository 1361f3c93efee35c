"""Fast prediction: batches sorted by length and padded to a few bucket widths, each width one CUDA graph on a GPU
(`GraphedForward`), and for deployment the prefix MLP folded into plain keys/values.

Why: an evaluation or inference forward of a frozen encoder with PEFT modules is launch-bound at real lengths (tens
of small kernels per layer); replaying a captured graph removes the launches, and bucket widths keep the number of
graphs small while padding each batch by at most `bucket - 1` tokens. Padding is masked, so predictions match the
eager path up to float rounding.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .training.batching import Encoded, eval_batches
from .training.cuda_graph import DEFAULT_GRAPH_BUCKET, GraphedForward


def logits_in_order(forward: Callable[[dict], torch.Tensor], data: Encoded, batch_size: int, pad_id: int, device,
                    pad_multiple: int | None = None) -> torch.Tensor:
    """(N, C) float logits of `forward(batch)` over `data`, in the data's order. Batches go by length (padded to the
    next multiple of `pad_multiple` when given); outputs stay on the device until one copy to the host at the end.
    `forward` may return a static buffer (GraphedForward): each output is copied before the next call."""
    pieces, indices = [], []
    for batch in eval_batches(data, batch_size, pad_id, pad_multiple):
        indices.append(batch.pop("index"))
        batch.pop("labels")
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        pieces.append(forward(batch).to(torch.float32, copy=True))
    if not pieces:
        return torch.empty(0, 0)
    host = torch.cat(pieces).cpu()
    out = torch.empty_like(host)
    out[torch.cat(indices)] = host
    return out


def graph_shapes(data: Encoded, pad_multiple: int) -> int:
    """How many batch shapes bucketed evaluation of `data` can produce: one per bucket width + a short last batch."""
    longest = max((len(ids) for ids in data.input_ids), default=1)
    return -(-longest // pad_multiple) + 1


def fold_for_inference(model) -> None:
    """Replace the active task's prefix MLP by its output, if it has one not yet folded (permanent: the model is
    done training; it then saves as the smaller folded module)."""
    methods = model.active.methods
    if "prefix" in methods and not methods["prefix"].folded:
        model.fold_prefix()


def graphed_logits(model, data: Encoded, device, dtype: torch.dtype | None, bucket: int) -> GraphedForward:
    """`model(**batch).logits` with one graph per batch shape that bucketed evaluation of `data` can produce."""
    return GraphedForward(lambda b: model(**b).logits, device, dtype, max_shapes=graph_shapes(data, bucket))


def predict(model, data: Encoded, pad_id: int, batch_size: int = 64, device=None, mixed_precision: str = "no",
            bucket: int = DEFAULT_GRAPH_BUCKET, cuda_graph: bool | None = None, fold: bool = True,
            compile: bool = False) -> torch.Tensor:
    """Logits (N, C) of the model's active task on `data`, in the data's order: the deployment path.

    `fold`: a prefix's MLP is replaced by its output first (`PeltModel.fold_prefix`; the model is done training:
    folding is permanent and saves as the smaller folded module). `cuda_graph`: replay one captured graph per bucket
    width (default: on a GPU). `mixed_precision`: "no" or "bf16" (autocast). `compile`: torch.compile (inductor) with
    the weights frozen into the compiled code (`freezing`: their casts to bf16 and other weight-only work done once,
    not per call); the compiled forward is built for this call only, so a model trained further afterwards is never
    predicted with stale weights. It pays off for large data: compiling takes tens of seconds per bucket width;
    measured 1.2-1.3x faster per batch on an H100 (experiments/results/bench/frozen_inference_h100.md)."""
    if mixed_precision not in ("no", "bf16"):
        raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {mixed_precision!r}")
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be true or false, got {compile!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    if fold:
        fold_for_inference(model)
    dtype = torch.bfloat16 if mixed_precision == "bf16" else None
    graphed = device.type == "cuda" if cuda_graph is None else cuda_graph
    net = frozen_compiled(model) if compile else model
    if graphed:
        forward = graphed_logits(net, data, device, dtype, bucket)
    else:
        def forward(batch):
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                return net(**batch).logits
    with inductor_freezing(compile):  # compilation happens at each shape's first call, inside this block
        return logits_in_order(forward, data, batch_size, pad_id, device, bucket)


def frozen_compiled(model):
    """`model` under torch.compile for inference only (see predict's `compile`): a fresh compile, dynamic shapes off
    (one graph per bucket width, as the CUDA graphs have)."""
    torch._dynamo.reset()  # a fresh cache: earlier compiles (of the training step, or of older weights) are not reused
    return torch.compile(model, dynamic=False)


@contextlib.contextmanager
def inductor_freezing(enabled: bool):
    """Inductor's `freezing` for the compiles inside the block: parameters become constants of the compiled code."""
    if not enabled:
        yield
        return
    from torch._inductor import config

    with config.patch(freezing=True):
        yield
