"""CUDA graphs of grouped training steps (group.cuda_graph): a step of R runs is thousands of small kernels, each
launched from Python; captured once per (live runs, batch shape) and replayed, it costs one graph launch.

What varies from step to step lives in static buffers the graph reads in place: the batch (padded to a few
`graph_bucket`-token widths, so a live set needs a handful of graphs), the runs' dropout noise (drawn into per-shape
buffers from each run's own stream before the replay, as the eager step draws it), a NaN-injection factor (tests)
and StackedAdamW's coefficient table (each run's learning rate and step count). The graph holds the forward, the
losses, the backward and the stacks' AdamW update; schedules and bookkeeping stay on the host. Captures share one
memory pool: steps never run at once and keep nothing in it between replays but their loss outputs.

A run that stops changes the live set: its graphs are dropped and the next steps capture new ones. A re-formed group
(a waiting run takes a slot) has new stacks, so every graph goes (`reset`). On a CPU the same static-buffer step runs
without capture, which is how its arithmetic is tested against the eager step.
"""
from __future__ import annotations

import torch

from ..training.cuda_graph import ShapeGraphs
from .noise import NoiseBatch


class GroupStepGraphs(ShapeGraphs):
    def __init__(self, device, autocast_dtype: torch.dtype | None, warmup: int = 1, max_shapes: int = 32) -> None:
        super().__init__(device, autocast_dtype, warmup, max_shapes, share_pool=True)
        self.noise: dict[tuple, NoiseBatch] = {}  # (live runs, rows per run) -> static noise buffers
        self.eager_steps = 0

    def reset(self) -> None:
        """A new engine (a re-formed group): no graph or buffer of the old one applies."""
        self.drop(lambda key: False)
        self.noise.clear()

    def step(self, trainer, runs: list, batch: dict, labels: torch.Tensor, valid: torch.Tensor | None,
             valid_rows: list[int], has_prefix: list[bool], factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step of `runs` (forward, backward and the stacks' update): (losses, losses * `factor`, the NaN
        injection), (R,) each, in static buffers that the next step of the same shape overwrites."""
        names = tuple(r.name for r in runs)
        if any(key[0] != (names,) for key in self.shapes):  # a run stopped: the old live set never comes back
            self.drop(lambda key: key[0] == (names,))
            self.noise = {k: v for k, v in self.noise.items() if k[0] == names}
        rows = labels.shape[0] // len(runs)
        noise = self.noise.get((names, rows))
        if noise is None:
            noise = self.noise[(names, rows)] = NoiseBatch.static(trainer.engine.noise_layout, len(runs), rows,
                                                                  self.device)
        noise.draw([r.noise for r in runs], valid_rows, has_prefix)
        inputs = dict(batch, labels=labels, factor=factor,
                      table=trainer.stacked_adam.table([r.index for r in runs]))
        if valid is not None:
            inputs["valid"] = valid
        return self(inputs, trainer, names, noise, key=(names,))

    def _body(self, batch: dict, trainer, names: tuple, noise: NoiseBatch):
        engine = trainer.engine
        trainer.stacked_adam.zero_grad()
        with self._autocast():
            logits = engine.forward(list(names), batch["input_ids"], batch["attention_mask"],
                                    batch.get("token_type_ids"), noise=noise)
        raw = engine.losses(logits, batch["labels"], batch.get("valid"))
        losses = raw * batch["factor"]
        losses.sum().backward()
        trainer.stacked_adam.apply(batch["table"])
        return raw.detach(), losses.detach()

    def _eager(self, batch: dict, *context):
        self.eager_steps += 1
        return self._body(batch, *context)

    def _capture(self, batch: dict, *context) -> tuple:
        trainer = context[0]
        trainer.stacked_adam.zero_grad()  # the gradients are then allocated in the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._body(batch, *context)
        return graph, out
