"""How many forwards a grouped dev evaluation takes, and how many padded tokens, under the fixed row cap (before
2026-11-26: min(eval batch, 1024 // R) rows per run) and under the token budget of GroupTrainer.eval_chunks
(group.eval_rows rows' worth of tokens at the max length), on the real dev sets of the low-resource protocol.
No GPU and no model needed: lengths come from the tokenizer. At K=100 the dev evaluation is about half of a grouped
epoch on the GPU and host-bound in its number of forwards (experiments/results/bench/group_stacks_gpu.md).

    python experiments/eval_chunk_plan.py [--runs 32] [--k 100] [--data ../shared/data/glue]
"""
from __future__ import annotations

import argparse
from types import SimpleNamespace


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=32)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--model", default="minilm")
    p.add_argument("--data", default="../shared/data/glue")
    p.add_argument("--tasks", default="cola,sst2,mrpc,stsb,rte")
    p.add_argument("--eval-rows", type=int, default=1024)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--max-length", type=int, default=128)
    args = p.parse_args(argv)

    from unipelt.data import build_task_data, get_task
    from unipelt.encoders import load_tokenizer
    from unipelt.grouping.trainer import GroupTrainer
    from unipelt.training.batching import encode

    tokenizer = load_tokenizer(args.model)
    R = args.runs
    print(f"{R} runs (data seeds 111..555 in turn), K={args.k}, dev 1000 per run, eval batch {args.eval_batch}, "
          f"group.eval_rows {args.eval_rows}, max length {args.max_length}\n")
    print("| task | forwards, row cap | forwards, token budget | padded tokens, row cap | padded tokens, token budget "
          "| largest forward (tokens) |")
    print("|---|---:|---:|---:|---:|---:|")
    for task in args.tasks.split(","):
        spec = get_task(task)
        per_seed = []
        for seed in (111, 222, 333, 444, 555):
            data = build_task_data(spec, args.k, seed, args.data, 1000)
            per_seed.append([len(x) for x in encode(data.dev, spec, tokenizer, args.max_length).input_ids])
        lengths = [per_seed[i % 5] for i in range(R)]
        flat = [n for run in lengths for n in run]
        offsets, at = [], 0
        for run in lengths:
            offsets.append(at)
            at += len(run)
        orders = [sorted(range(len(run)), key=run.__getitem__) for run in lengths]
        runs = [SimpleNamespace(settings=SimpleNamespace(eval_batch_size=args.eval_batch))] * R
        trainer = SimpleNamespace(eval_rows_cap=args.eval_rows, engine=SimpleNamespace(max_length=args.max_length))
        budget = GroupTrainer.eval_chunks(trainer, runs, SimpleNamespace(lengths=flat), offsets, orders)
        b = max(1, min(args.eval_batch, args.eval_rows // R))
        n = max(len(o) for o in orders)
        fixed = [(s, min(s + b, n)) for s in range(0, n, b)]

        def tokens(chunk):
            s, e = chunk
            width = max(flat[o + order[min(e, len(order)) - 1]] for o, order in zip(offsets, orders) if s < len(order))
            return R * (e - s) * width

        print(f"| {task} | {len(fixed)} | {len(budget)} | {sum(map(tokens, fixed)):,} | {sum(map(tokens, budget)):,} "
              f"| {max(map(tokens, budget)):,} |")


if __name__ == "__main__":
    main()
