"""Where the GPU time of one training step and one inference forward goes, per kernel (issue 12).

    python experiments/profile_step_gpu.py --methods unipelt_apl,peft_lora,finetune [--compile] [--top 25]

BERT-base shape (random weights), bf16 autocast, batch 32, length 128, the bench's batches and builders
(`unipelt.bench`). A captured CUDA graph replays the same kernels without the launch gaps, so the kernel time per
step measured here (unprofiled inside a graph, compiled or not) is what a graphed step costs. Prints per method the
GPU ms per train step and per inference forward, the kernel count, and the top kernels with their share, grouped
into GEMM / attention / elementwise (fused Triton or ATen) / other.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict

import torch

from unipelt.bench import build_peft, build_unipelt, encoder_config, make_batches
from unipelt.inference import fold_for_inference


def category(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("gemm", "cutlass", "sm90_xmma", "nvjet", "ampere_", "sm80_", "cublas", "splitk")):
        return "gemm"
    if any(s in n for s in ("flash", "fmha", "attention", "efficient")):
        return "attention"
    if n.startswith("triton_") or "elementwise" in n or "vectorized" in n or "reduce" in n:
        return "elementwise/reduce"
    return "other"


def profile_calls(fn, batches, n: int) -> tuple[float, int, dict]:
    """GPU ms per call, kernels per call and {kernel name: ms per call} over `n` profiled calls."""
    from torch.profiler import ProfilerActivity, profile

    for b in batches[:3]:  # warm-up (compile, autotune)
        fn(b)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            fn(batches[i % len(batches)])
        torch.cuda.synchronize()
    per = defaultdict(float)
    count = 0
    for e in prof.events():
        if e.device_type.name == "CUDA":
            per[e.name] += e.device_time / 1e3 / n
            count += 1
    return sum(per.values()), count // n, dict(per)


def report(label: str, ms: float, kernels: int, per: dict, top: int) -> None:
    cats = defaultdict(float)
    for name, t in per.items():
        cats[category(name)] += t
    print(f"\n## {label}: {ms:.3f} GPU ms, {kernels} kernels per call")
    print("  " + ", ".join(f"{c} {t:.3f} ms ({100 * t / ms:.0f}%)" for c, t in sorted(cats.items(), key=lambda x: -x[1])))
    for name, t in sorted(per.items(), key=lambda x: -x[1])[:top]:
        short = re.sub(r"\s+", " ", name)[:110]
        print(f"  {t:7.3f} ms {100 * t / ms:5.1f}%  [{category(name)}] {short}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="unipelt_apl,peft_lora,finetune")
    p.add_argument("--compile", action="store_true", help="torch.compile (inductor) the models, as the fastest rows do")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--no-infer", action="store_true", help="profile the training step only")
    p.add_argument("--no-train", action="store_true", help="profile the inference forward only (one compile, not two)")
    args = p.parse_args(argv)
    from transformers import AutoModel

    device = torch.device("cuda")
    cfg = encoder_config("bert-base")
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    base = AutoModel.from_config(cfg)
    batches = make_batches(cfg.vocab_size, args.batch, args.length, 4, device)
    mode = "default" if args.compile else None
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, compile={args.compile}, "
          f"batch {args.batch}, length {args.length}", flush=True)
    for method in args.methods.split(","):
        if method.startswith("peft_"):
            model, params, step_fn, infer_fn = build_peft(cfg, method, device, mode)
        else:
            model, params, step_fn, infer_fn = build_unipelt(base, method, device, mode, None)
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

        def train(batch):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = step_fn(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        try:
            if not args.no_train:
                report(f"{method} train", *profile_calls(train, batches, args.calls), args.top)
            if not args.no_infer:
                model.eval()
                if hasattr(model, "active"):
                    fold_for_inference(model)

                @torch.no_grad()
                def infer(batch):
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        infer_fn(batch)

                report(f"{method} inference", *profile_calls(infer, batches, args.calls), args.top)
        except Exception as err:  # one failing method must not lose the others
            print(f"{method}: failed: {err!r}", file=sys.stderr, flush=True)
        del model, params, opt
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
