"""Memory traffic of one grouped training step, by operator and by output shape (no GPU needed).

A graphed grouped step is bound by its kernels, and most of them stream activations through memory: what bounds it
is how many bytes they read and write, more than the matmul FLOPs. This runs one eager grouped step (forward,
backward, the stacked AdamW update) on CPU under a dispatch mode that logs every operator that computes (views and
allocations skipped) with the bytes of its tensor inputs and outputs. The group is built as in
profile_group_gpu.py: R runs of the grouped methods in turn, random weights of --model's shape, batch 16 per run,
bf16 autocast. CPU autocast casts a little differently from CUDA's, and the noise is fp32 here (fp16 on CUDA), so
read the totals as a map of where the bytes go, not as the GPU's exact figure.

    python experiments/group_step_traffic.py --model .dev/minilm --data .dev/glue --task rte --runs 12

Prints the total operators and GB, then the top operators and the top (operator, output shape, dtype) rows.
`--attention-dropout fused`: on this CPU, SDPA with dropout runs torch's math fallback (fp32 probabilities, a
Bernoulli mask), so the map shows attention bytes that the GPU's one fused kernel never writes; read the rest.
`--by-source` first prints the bytes by the unipelt file that caused them, forward and backward.
"""
from __future__ import annotations

import argparse
import collections
import re
import traceback

import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from profile_group_gpu import build

SKIPPED = {"view", "_unsafe_view", "expand", "transpose", "t", "permute", "slice", "select", "unsqueeze", "squeeze",
           "as_strided", "unbind", "split", "split_with_sizes", "detach", "alias", "_reshape_alias", "lift_fresh",
           "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_"}


def tensor_bytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))


class Traffic(TorchDispatchMode):
    """(operator, output shape, output dtype, bytes in + out) of every computing operator; with `sources`, each row
    also names the unipelt module that caused it (see source_of)."""

    def __init__(self, sources: bool = False) -> None:
        super().__init__()
        self.rows = []
        self.sources = sources

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in SKIPPED:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
            dtype = str(out.dtype).replace("torch.", "") if isinstance(out, torch.Tensor) else ""
            row = (name, shape, dtype, tensor_bytes((args, kwargs)) + tensor_bytes(out))
            self.rows.append(row + (source_of(),) if self.sources else row)
        return out


def source_of() -> str:
    """"forward FILE" or "backward FILE": the innermost unipelt file on the Python stack, or, inside the backward,
    on the stack that built the autograd node being run (kept there by anomaly mode, which the caller turns on)."""
    node = torch._C._current_autograd_node()
    if node is None:
        frames = [f"{f.filename}\n" for f in traceback.extract_stack()]
        phase = "forward"
    else:
        trace = node.metadata.get("traceback_", "")
        frames = (trace if isinstance(trace, str) else "".join(trace)).split("\n")
        phase = "backward"
    files = [re.search(r"/unipelt/([\w/]+\.py)", f) for f in frames]
    files = [m.group(1) for m in files if m]
    return f"{phase} {files[-1] if files else '?'}"


def one_step(trainer, rows: int = 16) -> None:
    live = list(trainer.runs)
    index = []
    for r in live:
        base = trainer.train_bank.offsets[r.index]
        index += [base + i for i in range(rows)]
    batch = trainer.train_bank.batch(index)
    labels = batch.pop("labels")
    has_prefix = ["prefix" in trainer.model.tasks[r.name].methods for r in live]
    trainer._eager_step(live, batch, labels, None, [rows] * len(live), has_prefix, rows, [False] * len(live))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=".dev/minilm")
    p.add_argument("--data", default=".dev/glue")
    p.add_argument("--task", default="rte")
    p.add_argument("--k", type=int, default=500)
    p.add_argument("--runs", type=int, default=12)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--activations", default="fp32", choices=["fp32", "bf16"], help="group.activations")
    p.add_argument("--attention-dropout", default="per_run", choices=["per_run", "fused"],
                   help="group.attention_dropout")
    p.add_argument("--by-source", action="store_true", help="also the bytes by unipelt file, forward and backward "
                   "(the backward's by the file that built each autograd node: runs under anomaly mode, slower)")
    args = p.parse_args(argv)
    args.precision, args.random_weights = "bf16", True
    trainer = build(args, args.runs, torch.device("cpu"), activations=args.activations,
                    attention_dropout=args.attention_dropout)
    trainer.model.train()
    one_step(trainer)  # warm-up: optimizer state, cached stacks
    traffic = Traffic(sources=args.by_source)
    with torch.autograd.set_detect_anomaly(args.by_source, check_nan=False), traffic:
        one_step(trainer)
    total = sum(r[3] for r in traffic.rows)
    print(f"{args.runs} runs x 16 rows, {args.task} K={args.k}, bf16 autocast, {args.activations} activations, "
          f"{args.attention_dropout} attention dropout (CPU): "
          f"{len(traffic.rows)} operators, {total / 1e9:.1f} GB read + written\n")
    by_op, by_shape = collections.Counter(), collections.Counter()
    calls_op, calls_shape = collections.Counter(), collections.Counter()
    if args.by_source:
        by_source = collections.Counter()
        for row in traffic.rows:
            by_source[row[4]] += row[3]
        print("| phase and unipelt file | GB | share |\n|---|---:|---:|")
        for where, nbytes in by_source.most_common(args.top):
            print(f"| {where} | {nbytes / 1e9:.2f} | {100 * nbytes / total:.1f}% |")
        print()
    for name, shape, dtype, nbytes, *_ in traffic.rows:
        by_op[name] += nbytes
        calls_op[name] += 1
        by_shape[(name, shape, dtype)] += nbytes
        calls_shape[(name, shape, dtype)] += 1
    print("| operator | calls | GB |\n|---|---:|---:|")
    for name, nbytes in by_op.most_common(args.top):
        print(f"| {name} | {calls_op[name]} | {nbytes / 1e9:.2f} |")
    print("\n| operator | output shape | dtype | calls | GB |\n|---|---|---|---:|---:|")
    for key, nbytes in by_shape.most_common(args.top):
        name, shape, dtype = key
        print(f"| {name} | {shape} | {dtype} | {calls_shape[key]} | {nbytes / 1e9:.2f} |")


if __name__ == "__main__":
    main()
