"""Whole-step CUDA graphs: the forward, backward and optimizer update of a fixed-shape batch are captured once and
then replayed, so a training step costs one graph launch instead of hundreds of kernel launches from Python.

Why: a PEFT step of a frozen BERT-base is ~1.4 TFLOP (~2 ms of H100 arithmetic) but takes tens of ms eagerly,
because it is bound by kernel launches; a graph removes that overhead. Requirements: batches of one fixed shape
(pad to a fixed length; batches of another shape, such as an epoch's short last batch, run eagerly on the same
tensors), an optimizer that is capturable with its learning rate in a device tensor (`capturable_adamw`; an LR
scheduler then fills that tensor between steps), autocast without its weight-cast cache, and no host sync inside
the step (the model forward has none; see state.py).

Every step is a real training step: the first `warmup` fixed-shape steps run eagerly on a side stream (cuBLAS
and the optimizer state are initialised by them), the next one is captured and then replayed. On a CPU the same
static-buffer code runs without capture, which is how its arithmetic is tested against the plain step.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


DEFAULT_GRAPH_BUCKET = 16  # tokens: batches padded to the next multiple (a handful of widths up to 128, one graph each)


def capturable_adamw(params, lr: float, weight_decay: float = 0.0, device=None) -> torch.optim.AdamW:
    """AdamW whose step can be captured: on CUDA fused + capturable with the LR as a device tensor; on CPU the
    plain single-tensor AdamW with a tensor LR (the same update rule)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        lr_t = torch.tensor(float(lr), device=device)
        return torch.optim.AdamW(params, lr=lr_t, weight_decay=weight_decay, fused=True, capturable=True)
    return torch.optim.AdamW(params, lr=torch.tensor(float(lr), dtype=torch.float64), weight_decay=weight_decay,
                             foreach=False)


def _shape_key(batch: dict[str, torch.Tensor]) -> tuple:
    return tuple(sorted((k, tuple(v.shape), v.dtype) for k, v in batch.items()))


def bucket_width(longest: int, multiple: int, cap: int) -> int:
    """The padded width of a batch whose longest row has `longest` tokens: the next multiple of `multiple`, at most
    `cap` (the data's max length) and never less than `longest`. A handful of widths, so a handful of graphs."""
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
        raise ValueError(f"bucket multiple must be a positive integer, got {multiple!r}")
    return max(longest, min(cap, -(-longest // multiple) * multiple))


class _Shape:
    """One batch shape's static input buffers, its static output (the loss, or the logits) and its captured graph."""

    def __init__(self) -> None:
        self.batch: dict[str, torch.Tensor] | None = None
        self.output: torch.Tensor | None = None
        self.graph = None
        self.seen = 0


class ShapeGraphs:
    """What a graphed training step and a graphed forward share: static input buffers per batch shape (the first
    `max_shapes` shapes seen; others run eagerly), `warmup` eager calls of a shape on a side stream, then one
    capture and replays. On a CPU the same static-buffer path runs without capture. Subclasses say what an eager
    call does (`_eager`) and how a call is captured (`_capture`); both get the call's extra `context` arguments.

    `share_pool`: every shape's graph allocates from one memory pool (for graphs that are never replayed at once and
    keep nothing in it from one replay to the next but their outputs) instead of one pool per shape."""

    def __init__(self, device, autocast_dtype: torch.dtype | None, warmup: int, max_shapes: int,
                 share_pool: bool = False) -> None:
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.warmup = warmup
        self.max_shapes = max_shapes
        self.capture = self.device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if share_pool and self.capture else None
        self.shapes: dict[tuple, _Shape] = {}  # in the order first seen
        self.seen = 0  # calls on a graphed shape so far (all shapes)
        self.replays = 0
        self.captures = 0

    def drop(self, keep: Callable[[tuple], bool]) -> None:
        """Forget the graphs (and static buffers) of the keys for which `keep(key)` is false."""
        self.shapes = {k: v for k, v in self.shapes.items() if keep(k)}
        if self.pool is not None and not any(s.graph is not None for s in self.shapes.values()):
            # a shared pool goes with its last graph: later captures need a new one
            self.pool = torch.cuda.graph_pool_handle()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None, cache_enabled=False)

    def _eager(self, batch: dict[str, torch.Tensor], *context):
        raise NotImplementedError

    def _capture(self, batch: dict[str, torch.Tensor], *context) -> tuple:
        """(graph, static output) of one call on the static `batch`."""
        raise NotImplementedError

    def __call__(self, batch: dict[str, torch.Tensor], *context, key: tuple = ()):
        """`context`: what the call reads besides `batch` (passed on as it is; the same objects for every call with
        the same shapes and `key`, since a graph reads what its capture read); `key`: what, besides the batch's
        shapes, calls must share to share a graph."""
        key = (key, _shape_key(batch))
        shape = self.shapes.get(key)
        if shape is None:
            if len(self.shapes) >= self.max_shapes:  # a shape without a graph: a plain call
                return self._eager(batch, *context)
            shape = self.shapes[key] = _Shape()
        if shape.batch is None:
            shape.batch = {k: v.clone() for k, v in batch.items()}
        else:
            for k, v in batch.items():
                shape.batch[k].copy_(v, non_blocking=True)
        shape.seen += 1
        self.seen += 1
        if not self.capture:
            # CPU: the same static-buffer call without capture (tests compare it with the plain one)
            return self._eager(shape.batch, *context)
        if shape.seen <= self.warmup:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                out = self._eager(shape.batch, *context)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return out
        if shape.graph is None:
            shape.graph, shape.output = self._capture(shape.batch, *context)
            self.captures += 1
        shape.graph.replay()
        self.replays += 1
        return shape.output


class GraphedTrainStep(ShapeGraphs):
    """Callable `step(batch) -> loss` doing zero-grad, forward, backward and `optimizer.step()`.

    `loss_fn(batch) -> scalar loss` is the model call (autocast is applied here, with the weight-cast cache
    off, as capture requires). The returned loss lives in a static buffer that the next replay of that shape
    overwrites: read or accumulate it (on the device) before the next step.

    `max_shapes`: how many batch shapes get a graph (each its own static buffers and memory pool; the first ones
    seen). 1: one fixed shape, every other shape (e.g. the short last batch of an epoch) runs eagerly; with length
    buckets (`bucket_width`) one per bucket width. Shapes beyond the limit run eagerly.
    """

    def __init__(self, loss_fn: Callable[[dict], torch.Tensor], optimizer: torch.optim.Optimizer,
                 device, autocast_dtype: torch.dtype | None = None, warmup: int = 3, max_shapes: int = 1) -> None:
        super().__init__(device, autocast_dtype, warmup, max_shapes)
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.eager_steps = 0

    # the first shape's buffers (a single fixed shape: the common case, and what the tests look at)
    @property
    def key(self) -> tuple | None:
        return next(iter(self.shapes), None)

    @property
    def static_batch(self) -> dict[str, torch.Tensor] | None:
        return self.shapes[self.key].batch if self.shapes else None

    @property
    def static_loss(self) -> torch.Tensor | None:
        return self.shapes[self.key].output if self.shapes else None

    @property
    def graph(self):
        return self.shapes[self.key].graph if self.shapes else None

    def _eager(self, batch: dict[str, torch.Tensor], *context) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.loss_fn(batch)
        loss.backward()
        self.optimizer.step()
        self.eager_steps += 1
        return loss.detach()

    def _capture(self, batch: dict[str, torch.Tensor], *context) -> tuple:
        # grads are then allocated inside this graph's own pool (each shape's graph keeps its own buffers)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph, pool=self.pool):
            with self._autocast():
                loss = self.loss_fn(batch)
            loss.backward()
            self.optimizer.step()
        return graph, loss.detach()


class GraphedForward(ShapeGraphs):
    """Callable `forward(batch) -> output` for evaluation and inference (no autograd): one CUDA graph per batch
    shape, for the first `max_shapes` shapes seen (with length buckets: one per bucket width, plus a short last
    batch); other shapes run eagerly. The returned tensor is a static buffer that the next call of the same shape
    overwrites: copy it (to the host, or `.clone()`) before. Parameters are read where they live, so a graph
    captured during training evaluates the current weights (optimizer steps update them in place).

    The first `warmup` calls of a shape run eagerly on a side stream, the next one is captured. On a CPU the same
    static-buffer code runs without capture (its arithmetic is what the CPU tests compare).
    """

    def __init__(self, fn: Callable[[dict], torch.Tensor], device, autocast_dtype: torch.dtype | None = None,
                 warmup: int = 1, max_shapes: int = 8) -> None:
        super().__init__(device, autocast_dtype, warmup, max_shapes)
        self.fn = fn
        self.eager_calls = 0

    def _run(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad(), self._autocast():
            return self.fn(batch)

    def _eager(self, batch: dict[str, torch.Tensor], *context) -> torch.Tensor:
        self.eager_calls += 1
        return self._run(batch)

    def _capture(self, batch: dict[str, torch.Tensor], *context) -> tuple:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._run(batch)
        return graph, out
