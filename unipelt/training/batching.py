"""Tokenise a split once, then batch it with per-batch (dynamic) padding.

Training order is a pure function of (training seed, epoch), so a resumed run sees the same batches as an
uninterrupted one without saving any sampler state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import TaskSpec
from .cuda_graph import bucket_width


@dataclass
class Encoded:
    """A tokenised split: ragged token lists plus labels."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(dataset, spec: TaskSpec, tokenizer, max_length: int) -> Encoded:
    table = dataset.to_dict()  # plain lists: one column read each, no per-row Python objects
    columns = [table[f] for f in spec.text_fields]
    enc = tokenizer(*columns, truncation=True, max_length=max_length, padding=False)
    dtype = torch.float32 if spec.is_regression else torch.long
    labels = torch.tensor(table["label"], dtype=dtype)
    return Encoded(enc["input_ids"], enc.get("token_type_ids"), labels)


def collate(data: Encoded, index: list[int], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Pad to the longest row, or to at least `pad_to` (a fixed shape, e.g. for CUDA graphs)."""
    width = max(max(len(data.input_ids[i]) for i in index), pad_to or 0)
    ids = torch.full((len(index), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(index), width), dtype=torch.long)
    types = torch.zeros((len(index), width), dtype=torch.long) if data.token_type_ids is not None else None
    for row, i in enumerate(index):
        n = len(data.input_ids[i])
        ids[row, :n] = torch.tensor(data.input_ids[i])
        mask[row, :n] = 1
        if types is not None:
            types[row, :n] = torch.tensor(data.token_type_ids[i])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": data.labels[index]}
    if types is not None:
        batch["token_type_ids"] = types
    return batch


def epoch_order(n: int, seed: int, epoch: int, shard: tuple[int, int] = (0, 1)) -> list[int]:
    """The example order of one training epoch; `shard=(rank, world)` splits it across processes."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    rank, world = shard
    return order[rank::world]


def batches(data: Encoded, order: list[int], batch_size: int, pad_id: int, bucket: bool = False,
            pad_to: int | None = None, pad_multiple: int | None = None):
    """Yield padded batches in `order`. `bucket=True` groups similar lengths (less padding; same batch set per
    epoch, shuffled batch order). `pad_to`: pad every batch to at least this width (see `collate`);
    with `pad_multiple`, pad each batch only up to the next multiple of it, at most `pad_to` (length buckets for
    CUDA graphs: a few widths instead of one)."""
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if bucket:
        window = batch_size * 50
        chunks = []
        for start in range(0, len(order), window):
            block = sorted(order[start : start + window], key=lambda i: len(data.input_ids[i]))
            chunks += [block[i : i + batch_size] for i in range(0, len(block), batch_size)]
        perm = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(len(order) + sum(order[:8])))
        chunks = [chunks[i] for i in perm.tolist()]
    for chunk in chunks:
        width = pad_to
        if pad_multiple is not None:
            longest = max(len(data.input_ids[i]) for i in chunk)
            width = bucket_width(longest, pad_multiple, pad_to or longest)
        yield collate(data, chunk, pad_id, width)


def eval_batches(data: Encoded, batch_size: int, pad_id: int, pad_multiple: int | None = None,
                 max_width: int | None = None):
    """Evaluation batches sorted by length (less padding); `index` says where each row goes back. `pad_multiple`:
    pad each batch up to the next multiple of it, at most `max_width` (length buckets: a few shapes, one CUDA graph
    each)."""
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = None
        if pad_multiple is not None:
            cap = max_width or len(data.input_ids[order[-1]])  # default: the longest row of the split
            width = bucket_width(len(data.input_ids[chunk[-1]]), pad_multiple, cap)
        batch = collate(data, chunk, pad_id, width)
        batch["index"] = torch.tensor(chunk)
        yield batch
