"""Per-run dropout noise, so that a run's dropout masks do not depend on the group it trains in.

Every run owns a generator, re-seeded from (training seed, epoch) at each epoch start, and draws one block of
uniform noise per training step: one row of noise per example row, laid out by site (embeddings, each layer's
attention probabilities and hidden dropouts, the head) at the data's *maximum* length. A site reads the corner
it needs ([:T] of the positions). So the noise an example gets depends only on its run, step and row, never on
how many other runs share the step or how wide the group's batch is padded: a run trains the same alone or in a
group of any size (tests/test_grouping.py).

Prefix runs draw a second block (the attention probabilities of the prefix columns) after the first; runs
without a prefix do not, so adding prefix runs to a group does not change anybody else's stream.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class NoiseLayout:
    """Where each site's noise sits in one example row of noise."""

    hidden: int
    heads: int
    layers: int
    max_length: int
    prefix: int  # prefix length of the group's prefix runs (0: none)
    probs: bool = True  # noise for the attention probabilities (False: group.attention_dropout=fused draws its own)
    sites: dict = field(default_factory=dict, compare=False)  # name -> (offset, shape) in the common row
    prefix_sites: dict = field(default_factory=dict, compare=False)  # name -> (offset, shape) in the prefix row

    def __post_init__(self) -> None:
        L, h, H = self.max_length, self.hidden, self.heads
        shapes = [("emb", (L, h))]
        for i in range(self.layers):
            probs = [(("probs", i), (H, L, L))] if self.probs else []
            shapes += probs + [(("attn", i), (L, h)), (("ffn", i), (L, h))]
        shapes += [("head1", (h,)), ("head2", (h,))]
        _place(self.sites, shapes)
        if self.prefix and self.probs:
            _place(self.prefix_sites, [(("probs", i), (H, L, self.prefix)) for i in range(self.layers)])

    @property
    def row_size(self) -> int:
        return _size(self.sites)

    @property
    def prefix_row_size(self) -> int:
        return _size(self.prefix_sites)


def _place(table: dict, shapes) -> None:
    offset = 0
    for name, shape in shapes:
        table[name] = (offset, shape)
        n = 1
        for d in shape:
            n *= d
        offset += n


def _size(table: dict) -> int:
    if not table:
        return 0
    offset, shape = max(table.values(), key=lambda v: v[0])
    n = 1
    for d in shape:
        n *= d
    return offset + n


def noise_dtype(device: torch.device) -> torch.dtype:
    """Half precision on CUDA (half the bytes to write; a 2^-11 grid is ample for a keep/drop threshold)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


class RunNoise:
    """One run's noise stream: `reseed(epoch)` at each epoch start, then one `draw` per training step."""

    def __init__(self, seed: int, device) -> None:
        self.seed = seed
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.reseed(0)

    def reseed(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)

    def draw_into(self, out: torch.Tensor) -> None:
        """Fill `out` (contiguous) with uniform noise from this run's stream."""
        torch.rand(out.numel(), generator=self.generator, out=out.view(-1))


class NoiseBatch:
    """The noise of one grouped training step: (runs, rows, row) buffers and per-site keep masks."""

    def __init__(self, layout: NoiseLayout, runs: list[RunNoise], rows: list[int], has_prefix: list[bool],
                 width: int, device) -> None:
        self._allocate(layout, len(runs), width, device)
        self.draw(runs, rows, has_prefix)

    @classmethod
    def static(cls, layout: NoiseLayout, runs: int, width: int, device) -> "NoiseBatch":
        """Buffers for `runs` runs of `width` rows that `draw` refills at every step in place (a CUDA graph reads
        them where its capture found them)."""
        self = cls.__new__(cls)
        self._allocate(layout, runs, width, device)
        return self

    def _allocate(self, layout: NoiseLayout, runs: int, width: int, device) -> None:
        self.layout = layout
        dtype = noise_dtype(device)
        self.R, self.B = runs, width
        self.common = torch.empty(self.R, width, layout.row_size, device=device, dtype=dtype)
        self.prefix = None
        if layout.prefix_row_size:  # prefix runs' probability noise (none under group.attention_dropout=fused)
            self.prefix = torch.zeros(self.R, width, layout.prefix_row_size, device=device, dtype=dtype)

    def draw(self, runs: list[RunNoise], rows: list[int], has_prefix: list[bool]) -> None:
        """This step's noise: `rows[r]` rows from run r's stream (and its prefix block if it has a prefix)."""
        if len(runs) != self.R:
            raise ValueError(f"noise buffers for {self.R} runs cannot hold {len(runs)}")
        for r, (stream, n) in enumerate(zip(runs, rows)):
            stream.draw_into(self.common[r, :n])
            if has_prefix[r] and self.prefix is not None:
                stream.draw_into(self.prefix[r, :n])
        if any(n < self.B for n in rows):  # filler rows (shorter runs): no dropout, nothing random
            for r, n in enumerate(rows):
                if n < self.B:
                    self.common[r, n:] = 1.0
                    if self.prefix is not None:
                        self.prefix[r, n:] = 0.0

    def _view(self, buffer: torch.Tensor, table: dict, name) -> torch.Tensor:
        offset, shape = table[name]
        n = 1
        for d in shape:
            n *= d
        return buffer[:, :, offset:offset + n].view(self.R, self.B, *shape)

    def hidden_keep(self, name, p: float, length: int) -> torch.Tensor:
        """(R*B, T, hidden) keep mask for a hidden-state dropout site."""
        view = self._view(self.common, self.layout.sites, name)[:, :, :length]
        return (view >= p).reshape(self.R * self.B, length, -1)

    def head_keep(self, name, p: torch.Tensor) -> torch.Tensor:
        """(R, B, hidden) keep mask for a head dropout; `p` (R,) holds each run's own rate."""
        view = self._view(self.common, self.layout.sites, name)
        return view >= p.to(view.dtype).view(-1, 1, 1)

    def probs_noise(self, layer: int, length: int, prefix: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The noise of `layer`'s attention probabilities, as views (no copy): (R*B, H, T, T) for the token columns,
        and (R*B, H, T, P) for the prefix columns (None without a prefix). A row keeps where noise >= p."""
        tokens = self._view(self.common, self.layout.sites, ("probs", layer)).flatten(0, 1)[..., :length, :length]
        if not prefix:
            return tokens, None
        cols = self._view(self.prefix, self.layout.prefix_sites, ("probs", layer)).flatten(0, 1)
        return tokens, cols[..., :length, :prefix]


def keep_mask(tokens: torch.Tensor, prefix: torch.Tensor | None, p: float) -> torch.Tensor:
    """Keep mask (prefix columns first) from the noise views of `NoiseBatch.probs_noise`."""
    keep = tokens >= p
    return keep if prefix is None else torch.cat([prefix >= p, keep], dim=-1)


def dropout_scale(keep: torch.Tensor, p: float) -> torch.Tensor:
    """The keep mask times 1/(1-p), in fp32: one tensor that applies inverted dropout in one product."""
    return torch.mul(keep, 1.0 / (1.0 - p))


def apply_dropout(x: torch.Tensor, keep: torch.Tensor, p) -> torch.Tensor:
    """Inverted dropout with a given keep mask, x * keep * 1/(1-p); `p` a float or a tensor broadcastable to `x`
    (a rate per run). With a float rate it is one product each way (`_ScaledMask`), the same numbers as the plain
    formula's two products and cast."""
    if isinstance(p, torch.Tensor):
        return x * keep.to(x.dtype) * (1.0 / (1.0 - p))
    return _ScaledMask.apply(x, dropout_scale(keep, p))


class _ScaledMask(torch.autograd.Function):
    """x * scaled (fp32, zero where dropped), rounded once into x's dtype, forward and backward. In fp32 or bf16 this
    equals (x * keep) * s: keep is 0 or 1, so that first product is exact and one rounding remains either way."""

    @staticmethod
    def forward(ctx, x, scaled):
        ctx.save_for_backward(scaled)
        return torch.mul(x, scaled, out=torch.empty_like(x))

    @staticmethod
    def backward(ctx, grad):
        (scaled,) = ctx.saved_tensors
        return torch.mul(grad, scaled, out=torch.empty_like(grad)), None
