"""How high can the MFU of a frozen-encoder training step go on this GPU? The matmuls alone, nothing else.

Issue 12 asks for >= 30% MFU on the unipelt_apl training step (BERT-base shape, bf16, batch 32, length 128), counting
useful FLOPs only (unipelt.bench.flops_per_step: forward 2*N*tokens + attention, backward ~1x forward, because a
frozen encoder needs input gradients but no weight gradients). This times exactly those matmuls, at the step's
shapes, in one CUDA graph: per layer the q/k/v, output and two feed-forward projections and the two attention
products, forward, then the same GEMMs again for the input gradients. No layer norms, activations, dropout, softmax,
PEFT modules or optimizer (the attention's backward takes four products, which the count credits as two, so the
floor is a little conservative). Its MFU is the ceiling of a step built from these cuBLAS matmuls: whatever else the step
does has to fit in the time between this floor and the target.

    python experiments/mfu_ceiling.py [--batch 32 --length 128]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from unipelt.bench import BF16_PEAK_FLOPS, encoder_config, flops_per_step  # noqa: E402


def matmul_step(cfg, batch: int, length: int, device):
    """A function that runs the step's frozen-encoder matmuls (forward, then input gradients) once."""
    h, ffn, heads, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers
    d = h // heads
    n = batch * length
    bf = dict(device=device, dtype=torch.bfloat16)
    x, grad_h = torch.randn(n, h, **bf), torch.randn(n, h, **bf)
    mid, grad_mid = torch.randn(n, ffn, **bf), torch.randn(n, ffn, **bf)
    qkv_w, o_w = torch.randn(3 * h, h, **bf), torch.randn(h, h, **bf)
    up_w, down_w = torch.randn(ffn, h, **bf), torch.randn(h, ffn, **bf)
    q, k, v = (torch.randn(batch * heads, length, d, **bf) for _ in range(3))
    probs = torch.randn(batch * heads, length, length, **bf)
    grad_qkv = torch.randn(n, 3 * h, **bf)

    def step():
        for _ in range(layers):
            # forward
            torch.mm(x, qkv_w.t())
            torch.bmm(q, k.transpose(1, 2))
            torch.bmm(probs, v)
            torch.mm(x, o_w.t())
            torch.mm(x, up_w.t())
            torch.mm(mid, down_w.t())
            # input gradients (same shapes, the weights' other side)
            torch.mm(grad_h, down_w)
            torch.mm(grad_mid, up_w)
            torch.mm(grad_h, o_w)
            torch.bmm(probs.transpose(1, 2), v)   # dv-shaped
            torch.bmm(probs, k)                   # dq
            torch.bmm(probs.transpose(1, 2), q)   # dk
            torch.bmm(q, v.transpose(1, 2))       # dprobs
            torch.mm(grad_qkv, qkv_w)
    return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bert-base")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args(argv)
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = encoder_config(args.model)
    step = matmul_step(cfg, args.batch, args.length, device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / args.reps
    gpu = torch.cuda.get_device_name(device)
    peak = next((v for k, v in BF16_PEAK_FLOPS.items() if k in gpu), None)
    flops = flops_per_step(cfg, args.batch, args.length, trains_encoder=False)
    mfu = flops / (ms / 1e3) / peak if peak else float("nan")
    print(f"{gpu}, torch {torch.__version__}: {args.model} batch {args.batch} length {args.length}, bf16\n")
    print("| what | ms | useful TFLOP | MFU (bf16 peak) | step ms for 30% MFU |")
    print("|---|---:|---:|---:|---:|")
    target_ms = flops / (0.30 * peak) * 1e3 if peak else float("nan")
    print(f"| the step's matmuls alone, one CUDA graph | {ms:.2f} | {flops / 1e12:.3f} | {100 * mfu:.1f}% | "
          f"{target_ms:.2f} |")


if __name__ == "__main__":
    main()
