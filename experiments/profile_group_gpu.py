"""Where a grouped epoch's time goes on a GPU: training steps against dev evaluation, GPU kernel time against wall
time (a launch-bound or host-bound process keeps the GPU waiting), kernels per step and host syncs per epoch.

Builds R real runs (the grouped methods in turn, data seeds 111.., the per-method learning rates of conf/method)
on one task and K, like a sweep's group, and times whole epochs of GroupTrainer (`_round`: the training steps,
then every run's dev evaluation). Prints a Markdown table, one row per group size:

    python experiments/profile_group_gpu.py --model .dev/minilm --data .dev/glue --task sst2 --k 100 --runs 1,8,32

Columns: train ms and eval ms per epoch (wall, synchronised); GPU busy = CUDA kernel time / wall time of one
profiled epoch (torch.profiler); kernels per epoch; host syncs per epoch (torch.cuda sync debug mode); the GPU ms of
drawing one step's dropout noise; GPU kernel ms per run and epoch (training + dev evaluation: what bounds a sweep
whose processes keep the GPU busy). `--random-weights` builds the encoder from --model's config.json: a timing run
then needs only the config and tokenizer files on the device.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

METHODS = ["bitfit", "adapter", "prefix", "lora", "unipelt_ap", "unipelt_apl", "unipelt_apl_nogate"]
LR = {"bitfit": 1e-4, "adapter": 1e-4, "prefix": 2e-4, "lora": 5e-4, "unipelt_ap": 5e-4, "unipelt_apl": 5e-4,
      "unipelt_apl_nogate": 5e-4}


def build(args, R: int, device, graphed: bool = False, activations: str = "fp32", attention_dropout: str = "per_run"):
    from unipelt import PeltModel, preset
    from unipelt.data import build_task_data, get_task
    from unipelt.encoders import load_encoder, load_tokenizer
    from unipelt.grouping.trainer import GroupRun, GroupTrainer
    from unipelt.training.batching import encode
    from unipelt.training.trainer import TrainSettings

    spec = get_task(args.task)
    tokenizer = load_tokenizer(args.model)
    if args.random_weights:  # the model's shape from its config.json, random weights: timing only, no weights to carry
        from transformers import AutoConfig, AutoModel

        torch.manual_seed(0)
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(args.model))
    else:
        encoder = load_encoder(args.model)
    model = PeltModel(encoder).to(device)
    tmp = Path(tempfile.mkdtemp())
    runs = []
    for i in range(R):
        method = METHODS[i % len(METHODS)]
        data = build_task_data(spec, args.k, 111 * (1 + i % 5), args.data, 1000)
        torch.manual_seed(42)
        model.add_task(f"r{i}", preset(method), spec.num_labels, activate=False)
        settings = TrainSettings(lr=LR[method], mixed_precision=args.precision, eval_batch_size=256,
                                 checkpoint_every_s=1e9)
        runs.append(GroupRun(f"r{i}", spec, settings, encode(data.train, spec, tokenizer, 128),
                             encode(data.dev, spec, tokenizer, 128), tmp / f"r{i}"))
    extra = {} if activations == "fp32" else {"activations": activations}  # packages before the setting: fp32
    if attention_dropout != "per_run":  # likewise: packages before group.attention_dropout know per_run only
        extra["attention_dropout"] = attention_dropout
    trainer = GroupTrainer(model, runs, tokenizer.pad_token_id, 128, device, args.precision, progress=False,
                           cuda_graph=graphed, **extra)
    trainer._start()
    return trainer


def measure(args, R: int, device, graphed: bool = False, activations: str = "fp32",
            attention_dropout: str = "per_run") -> dict:
    trainer = build(args, R, device, graphed, activations, attention_dropout)
    if args.losses:  # every step's loss of every run (a host sync per step: for comparing packages, not timing)
        trainer.step_losses = {}
    live = list(trainer.runs)
    sync = torch.cuda.synchronize
    trainer._round(live)  # warm-up epoch (allocator, cuBLAS handles, optimizer state)
    sync()
    rounds, train_ms, eval_ms = args.epochs, 0.0, 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        trainer._round(live)
        sync()
        t1 = time.perf_counter()
        trainer.evaluate_dev(live)
        sync()
        t2 = time.perf_counter()
        eval_ms += 1000 * (t2 - t1) / rounds
        train_ms += 1000 * (t1 - t0) / rounds
    train_ms -= eval_ms  # _round = training steps + one dev evaluation
    # syncs: count torch's warnings for one epoch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        trainer._round(live)
        torch.cuda.set_sync_debug_mode(0)
    syncs = len([w for w in caught if "synchroniz" in str(w.message)])
    where = sorted({str(w.filename).split("/")[-1] + ":" + str(w.lineno) for w in caught})[:8]
    # GPU busy: kernel time in one profiled epoch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        trainer._round(live)
        sync()
        wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    kernel_s = sum(e.device_time for e in kernels) / 1e6
    top = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    noise_ms = time_noise(trainer, live, device)
    if args.losses:
        Path(args.losses).write_text(json.dumps(trainer.step_losses))
    trainer.close()
    del trainer
    torch.cuda.empty_cache()
    return {"R": R, "graphed": graphed, "activations": activations, "attention_dropout": attention_dropout, "train_ms": train_ms, "eval_ms": eval_ms, "busy": 100 * kernel_s / wall,
            "kernels": len(kernels), "syncs": syncs, "noise_ms": noise_ms, "kernel_ms": 1000 * kernel_s, "where": where, "top": top,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30}


def time_noise(trainer, live, device, n: int = 20) -> float:
    """GPU ms of drawing one training step's dropout noise (NoiseBatch: every run's rows at the full max length)."""
    from unipelt.grouping.noise import NoiseBatch

    streams = [r.noise for r in live]
    rows = [r.settings.batch_size for r in live]
    prefix = ["prefix" in trainer.model.tasks[r.name].methods for r in live]
    return gpu_ms(lambda: NoiseBatch(trainer.engine.noise_layout, streams, rows, prefix, max(rows), device), n)


def gpu_ms(fn, n: int = 20) -> float:
    """GPU milliseconds per call of `fn` (CUDA events around n calls, after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def attention_table() -> None:
    """Evaluation-shaped attention (bf16, a padding mask, heads 12): SDPA with a boolean mask (what the grouped
    forward passes), SDPA with an additive mask, SDPA's memory-efficient kernel forced, and explicit matmuls."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def timed(fn):
        return gpu_ms(fn) * 1000

    print("\n| rows | T | head dim | SDPA bool mask us | SDPA additive us | SDPA efficient us | explicit us |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for rows, T, D in [(1024, 32, 32), (1024, 64, 32), (1024, 128, 32), (512, 64, 64), (512, 128, 64)]:
        q, k, v = (torch.randn(rows, 12, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        lengths = torch.randint(T // 2, T + 1, (rows,), device="cuda")
        keep = (torch.arange(T, device="cuda")[None] < lengths[:, None])[:, None, None, :]
        additive = torch.zeros(keep.shape, device="cuda", dtype=torch.bfloat16).masked_fill(~keep, float("-inf"))

        def explicit():
            s = torch.matmul(q, k.transpose(-1, -2)) * D ** -0.5
            return torch.matmul(torch.softmax(s.masked_fill(~keep, float("-inf")).float(), -1).to(v.dtype), v)

        def efficient():
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

        cells = [timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep)),
                 timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive)),
                 timed(efficient), timed(explicit)]
        print(f"| {rows} | {T} | {D} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=".dev/minilm")
    p.add_argument("--data", default=".dev/glue")
    p.add_argument("--task", default="sst2")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--runs", default="1,8,32")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--top", action="store_true", help="print the profiler's top kernels for each size")
    p.add_argument("--random-weights", action="store_true",
                   help="build the encoder from --model's config.json with random weights (a timing run needs no weights)")
    p.add_argument("--attention", action="store_true", help="also time the attention kernels at eval shapes")
    p.add_argument("--losses", default=None,
                   help="write every run's per-step training losses to this JSON file (one group size and mode)")
    p.add_argument("--graph", default="off", help="group.cuda_graph values to measure, e.g. off,on (graphed steps)")
    p.add_argument("--activations", default="fp32", help="group.activations values to measure, e.g. fp32,bf16")
    p.add_argument("--attention-dropout", default="per_run",
                   help="group.attention_dropout values to measure, e.g. per_run,fused")
    args = p.parse_args(argv)
    device = torch.device("cuda")
    if args.attention:
        attention_table()
    modes = [{"off": False, "on": True}[m] for m in args.graph.split(",")]
    rows = [measure(args, int(r), device, g, a, d) for r in args.runs.split(",") for g in modes
            for a in args.activations.split(",") for d in args.attention_dropout.split(",")]
    print(f"\n{torch.cuda.get_device_name()}, {args.task} K={args.k}, {args.precision}, batch 16, "
          f"dev 1000 (eval batch 256 per run)\n")
    print("| runs | graphed | activations | attention dropout | train ms/epoch | eval ms/epoch | ms per run-epoch | GPU busy % | kernels (epoch) | syncs/epoch | peak GB "
          "| noise ms/step | GPU ms per run-epoch |")
    print("|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['R']} | {'yes' if r['graphed'] else 'no'} | {r['activations']} | {r['attention_dropout']} | {r['train_ms']:.0f} | {r['eval_ms']:.0f} | {(r['train_ms'] + r['eval_ms']) / r['R']:.1f} "
              f"| {r['busy']:.0f} | {r['kernels']} | {r['syncs']} | {r['peak_gb']:.1f} | {r['noise_ms']:.2f} | {r['kernel_ms'] / r['R']:.1f} |")
    for r in rows:
        print(f"\nR={r['R']}: sync sites {r['where']}")
        if args.top:
            print(r["top"])


if __name__ == "__main__":
    main()
