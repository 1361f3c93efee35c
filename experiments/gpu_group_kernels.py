"""The grouped step's dropout kernels on a GPU: the plain formulas against the lean ones (grouping/attention.py,
grouping/noise.py), bit for bit and in GPU time, at a sweep group's shapes (MiniLM: 12 heads of 32, length 128, a
10-token prefix; 12 runs x 16 rows), bf16 autocast as the grouped trainer runs.

    python experiments/gpu_group_kernels.py [--rows 192] [--length 128] [--prefix 10]

Prints a Markdown table: forward + backward GPU ms of each (CUDA events, median of 20 after 3 warm-ups) and whether
the outputs and every input gradient are identical (torch.equal) between the two.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from unipelt.grouping.attention import dropout_attention
from unipelt.grouping.noise import apply_dropout, keep_mask


def plain_attention(q, k, v, mask, tokens, cols, p, scale):
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1)
    probs = probs * keep_mask(tokens, cols, p).to(probs.dtype) * (1.0 / (1.0 - p))
    return torch.matmul(probs.to(v.dtype), v)


def plain_dropout(x, keep, p):
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


def timed(fn, n: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=192)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--prefix", type=int, default=10)
    args = p.parse_args(argv)
    dev, H, D, T, P, n = "cuda", 12, 32, args.length, args.prefix, args.rows
    g = torch.Generator(device=dev).manual_seed(0)
    # q, k, v fp32 as the grouped step has them after a BitFit or LoRA delta; q in the projection's layout
    q0 = torch.randn(n, T, H, D, device=dev, generator=g).transpose(1, 2)
    k0, v0 = (torch.randn(n, H, P + T, D, device=dev, generator=g) for _ in range(2))
    lengths = torch.randint(T // 2, T + 1, (n,), device=dev, generator=g)
    mask = torch.cat([torch.ones(n, P, dtype=torch.bool, device=dev),
                      torch.arange(T, device=dev)[None] < lengths[:, None]], 1)[:, None, None, :]
    tokens = torch.rand(n, H, T, T, device=dev, generator=g).half()
    cols = torch.rand(n, H, T, P, device=dev, generator=g).half()
    grad = torch.randn(n, H, T, D, device=dev, generator=g).bfloat16()
    x0 = torch.randn(n, T, 384, device=dev, generator=g)
    keep = torch.rand(n, T, 384, device=dev, generator=g) >= 0.1
    gx = torch.randn(n, T, 384, device=dev, generator=g)

    def attention(fn):
        q, k, v = (t.detach().clone().requires_grad_() for t in (q0, k0, v0))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(q, k, v, mask, tokens, cols, 0.1, D ** -0.5)
        out.backward(grad)
        return [out.detach(), q.grad, k.grad, v.grad]

    def dropout(fn):
        x = x0.detach().clone().requires_grad_()
        y = fn(x, keep, 0.1)
        y.backward(gx)
        return [y.detach(), x.grad]

    rows = []
    for name, run, plain, lean in [("attention with per-run dropout", attention, plain_attention, dropout_attention),
                                   ("hidden dropout (fp32)", dropout, plain_dropout, apply_dropout)]:
        a, b = run(plain), run(lean)
        same = all(torch.equal(x, y) for x, y in zip(a, b))
        rows.append((name, timed(lambda: run(plain)), timed(lambda: run(lean)), same))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, rows {n}, heads {H}x{D}, length {T}, "
          f"prefix {P}, bf16 autocast; forward + backward\n")
    print("| op | plain ms | lean ms | speed-up | outputs and gradients identical |")
    print("|---|---:|---:|---:|---|")
    for name, a, b, same in rows:
        print(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.2f}x | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
