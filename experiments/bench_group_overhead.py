"""Host-side cost of one grouped training step, by phase, as the group grows (no GPU needed).

A grouped step on a GPU is launch-bound when the host takes longer to issue it than the GPU to run it. This
measures the host side alone: a tiny encoder (hidden 16, 6 layers) makes the arithmetic negligible, so the times
are mostly Python + dispatch + autograd bookkeeping per step, for R runs of the 7 grouped methods (bitfit, adapter,
prefix, lora, unipelt_ap, unipelt_apl, unipelt_apl_nogate), batch 4 per run. Prints a Markdown table, with the
number of PyTorch operators one forward + backward issues (on a GPU, roughly its kernel launches plus views).
Read it with two caveats: the tensors still grow with R, so at R=35 a CPU spends part of the time on arithmetic that
a GPU does in microseconds; and on CPU AdamW runs tensor by tensor, where CUDA runs one fused launch per bucket of
runs (GroupTrainer.step_optimizers), so the optimizer column is a CPU artefact.

    python experiments/bench_group_overhead.py [--runs 1,7,35] [--steps 6]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def measure(R: int, steps: int) -> dict:
    from transformers import AutoConfig, AutoModel

    from unipelt import PeltModel, preset
    from unipelt.data import get_task
    from unipelt.grouping.noise import NoiseBatch
    from unipelt.grouping.trainer import GroupRun, GroupTrainer
    from unipelt.training.batching import Encoded
    from unipelt.training.trainer import TrainSettings

    cfg = AutoConfig.for_model("bert", hidden_size=16, num_hidden_layers=6, num_attention_heads=2,
                               intermediate_size=16, vocab_size=100, max_position_embeddings=64,
                               hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    model = PeltModel(AutoModel.from_config(cfg))
    methods = ["bitfit", "adapter", "prefix", "lora", "unipelt_ap", "unipelt_apl", "unipelt_apl_nogate"]
    runs, tmp = [], Path(tempfile.mkdtemp())
    for i in range(R):
        torch.manual_seed(i)
        model.add_task(f"r{i}", preset(methods[i % len(methods)]), 2, activate=False)
        data = Encoded([[1, 5, 6, 7, 8, 9, 10]] * 8, None, torch.tensor([0, 1] * 4))
        runs.append(GroupRun(f"r{i}", get_task("rte"), TrainSettings(batch_size=4, seed=i), data, data, tmp / f"r{i}"))
    trainer = GroupTrainer(model, runs, 0, 8, "cpu", progress=False)
    trainer._start()
    names = [r.name for r in runs]
    batch = trainer.train_bank.batch([trainer.train_bank.offsets[r.index] + j for r in runs for j in range(4)])
    labels = batch.pop("labels")
    model.train()
    totals = {"noise": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for step in range(steps + 2):
        t0 = time.perf_counter()
        noise = NoiseBatch(trainer.engine.noise_layout, [r.noise for r in runs], [4] * R,
                           ["prefix" in model.tasks[n].methods for n in names], 4, "cpu")
        t1 = time.perf_counter()
        losses = trainer.engine.losses(trainer.engine.forward(names, **batch, noise=noise), labels)
        t2 = time.perf_counter()
        for r in runs:
            r.optimizer.zero_grad(set_to_none=True)
        zero_stacked_grads(trainer)
        losses.sum().backward()
        route_grads(trainer)
        t3 = time.perf_counter()
        trainer.step_optimizers(runs)
        t4 = time.perf_counter()
        if step >= 2:  # warm-up steps excluded
            for key, value in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                totals[key] += value / steps
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:  # one more step, counting the operators it issues
        noise = NoiseBatch(trainer.engine.noise_layout, [r.noise for r in runs], [4] * R,
                           ["prefix" in model.tasks[n].methods for n in names], 4, "cpu")
        losses = trainer.engine.losses(trainer.engine.forward(names, **batch, noise=noise), labels)
        zero_stacked_grads(trainer)
        losses.sum().backward()
        route_grads(trainer)
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.step_optimizers(runs)
    opt_ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    trainer.close()
    return {**{k: 1000 * v for k, v in totals.items()}, "ops": ops, "opt_ops": opt_ops}


def route_grads(trainer) -> None:
    """Before persistent stacks (2026-11-26), gradients reached the parameters after the backward."""
    if hasattr(trainer.engine, "route_grads"):
        trainer.engine.route_grads()


def zero_stacked_grads(trainer) -> None:
    if hasattr(trainer, "stacked_adam"):
        trainer.stacked_adam.zero_grad()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="1,7,35")
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print("| runs | noise ms | forward ms | backward ms | optimizer ms | step ms | ms per run | aten ops fwd+bwd "
          "| aten ops optimizer |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for R in (int(x) for x in args.runs.split(",")):
        t = measure(R, args.steps)
        ops, opt_ops = t.pop("ops"), t.pop("opt_ops")
        total = sum(t.values())
        print(f"| {R} | {t['noise']:.1f} | {t['forward']:.1f} | {t['backward']:.1f} | {t['optimizer']:.1f} | "
              f"{total:.1f} | {total / R:.2f} | {ops} | {opt_ops} |", flush=True)


if __name__ == "__main__":
    main()
