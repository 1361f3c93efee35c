"""One matmul for the small linear maps that several modules take of the same tensor.

A layer's input feeds the prefix gate, the LoRA gates (and BitFit's) and LoRA's down-projections [A_q; A_v]; an
adapter's input feeds its down-projection and its gate. Taken one by one these are small GEMMs, and those with 1-3
output columns (the gates) run cuBLAS's unaligned kernels: on an H100 (BERT-base shape, bf16, batch 32) those took
0.35 of a 9.8 ms unipelt_apl training step. Here their weight rows are stacked, zero-padded to a multiple of
`ALIGN` so each output row stays 16-byte aligned, and multiplied once; each reader takes its columns. Same values
up to float rounding; the gradients reach every reader's own weights through the concatenation.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ALIGN = 8  # output columns padded to a multiple of this (8 bf16 values = 16 bytes)

Part = tuple[torch.Tensor, torch.Tensor | None]  # (weight (n, d_in), bias (n,) or None)


def stacked_linear(x: torch.Tensor, parts: list[Part]) -> list[torch.Tensor]:
    """`F.linear(x, w, b)` for each (w, b) of `parts`, as one matmul; each result is a column slice of its output."""
    weights = [w for w, _ in parts]
    rows = [w.shape[0] for w in weights]
    pad = -sum(rows) % ALIGN
    first = weights[0]
    if pad:
        weights.append(first.new_zeros(pad, first.shape[1]))
    bias = None
    if any(b is not None for _, b in parts):
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in parts]
                         + ([first.new_zeros(pad)] if pad else []))
    out = F.linear(x, torch.cat(weights, 0), bias)
    return list(out.split(rows + ([pad] if pad else []), dim=-1)[:len(parts)])


class ProjectionBank:
    """The linear maps of one tensor that a task's modules read, computed together once per forward.

    A reader registers a getter of its (weight, bias) per task and gets back a function of the input tensor that
    returns its columns. The first read in a forward computes every registered map of that task on that tensor;
    the result is cached in the forward state per input tensor, so a reader that passes another tensor gets
    correct columns computed on that tensor (just not shared)."""

    def __init__(self, state, key) -> None:
        self.state = state
        self.key = key
        self.parts: dict[str, list[Callable[[], Part]]] = {}  # task -> getters in registration order
        self._readers: dict[tuple[str, object], Callable] = {}  # (task, name) -> reader of a named part

    def add(self, task: str, part: Callable[[], Part], name=None) -> Callable[[torch.Tensor], torch.Tensor]:
        """Register `part` for `task`; returns its reader. A `name` already registered for the task returns that
        part's reader instead (several readers of one stacked part, e.g. LoRA's query and value targets)."""
        if name is not None and (task, name) in self._readers:
            return self._readers[(task, name)]
        getters = self.parts.setdefault(task, [])
        index = len(getters)
        getters.append(part)

        def read(x: torch.Tensor) -> torch.Tensor:
            return self._outputs(task, x)[index]

        if name is not None:
            self._readers[(task, name)] = read
        return read

    def _outputs(self, task: str, x: torch.Tensor) -> list[torch.Tensor]:
        # found by identity (`is`), not by id(x): torch.compile before 2.13 breaks the graph on id() of a tensor
        # made inside it, and a broken graph loses inductor's fusions (unipelt lora 7.1 -> 9.0 ms on an H100)
        done = self.state.cache.setdefault(("projection_bank", self.key, task), [])
        for seen, outputs in done:
            if seen is x:
                return outputs
        outputs = stacked_linear(x, [get() for get in self.parts[task]])
        done.append((x, outputs))
        return outputs

    def remove_task(self, task: str) -> None:
        self.parts.pop(task, None)
        self._readers = {k: v for k, v in self._readers.items() if k[0] != task}
