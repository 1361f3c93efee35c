"""Inference of a trained model, compiled with and without inductor's `freezing` (issue 12's inference ratio).

The deployment forward of `unipelt-bench --compile --cuda-graph` (prefix folded, one CUDA graph per batch shape,
bf16 autocast) reads every weight as an fp32 parameter and casts it to bf16 on each call: one small kernel per
weight, and UniPELT's APL has about three times as many weights per layer as the encoder alone. With
`torch._inductor.config.freezing` the compiled inference graph takes the weights as constants and folds those casts
once, for every method alike (the full fine-tuning row too). Inference only: no training step is timed here.

    python experiments/bench_frozen_inference.py --methods finetune,unipelt_apl --out bench_frozen.md
"""
from __future__ import annotations

import argparse
import statistics

import torch

from unipelt.bench import build_unipelt, encoder_config, make_batches, time_calls
from unipelt.inference import fold_for_inference
from unipelt.training.cuda_graph import GraphedForward


def infer_ms(method: str, base, batches, freezing: bool, steps: int, warmup: int, device) -> float:
    torch._inductor.config.freezing = freezing
    model, _, _, infer_fn = build_unipelt(base, method, device, "default", None)
    model.eval()
    fold_for_inference(model)
    infer = GraphedForward(infer_fn, device, torch.bfloat16, max_shapes=2)
    return 1e3 * statistics.median(time_calls(infer, batches, steps, warmup, device))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="finetune,unipelt_apl")
    ap.add_argument("--model", default="bert-base")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = encoder_config(args.model)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    from transformers import AutoModel

    base = AutoModel.from_config(cfg)
    batches = make_batches(cfg.vocab_size, args.batch, args.length, 4, device)
    rows = {}
    for freezing in (False, True):
        for method in args.methods.split(","):
            rows[method, freezing] = infer_ms(method, base, batches, freezing, args.steps, args.warmup, device)
            print(f"{method:14s} freezing={freezing!s:5s} infer {rows[method, freezing]:.3f} ms", flush=True)
    methods = args.methods.split(",")
    lines = [f"{torch.cuda.get_device_name()}, {args.model} shape (random weights), bf16 autocast, batch {args.batch}, "
             f"length {args.length}, compiled (inductor) + one CUDA graph, prefix folded; median of {args.steps} calls",
             "", "| method | infer ms | infer ms, freezing | x finetune | x finetune, freezing |", "|---|---|---|---|---|"]
    for m in methods:
        ratio = [rows[m, f] / rows["finetune", f] if "finetune" in methods else float("nan") for f in (False, True)]
        lines.append(f"| {m} | {rows[m, False]:.3f} | {rows[m, True]:.3f} | {ratio[0]:.2f} | {ratio[1]:.2f} |")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
