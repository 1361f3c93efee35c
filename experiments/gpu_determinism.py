"""Is a training bit-reproducible on this GPU, with and without train.deterministic? (device tool; CUDA only)

1. The kernel: SDPA's backward (flash, memory-efficient and cuDNN backends, bf16, an RTE batch of MiniLM's shape) run
   `--repeats` times on the same inputs, with torch's deterministic mode off, on with warn_only (what
   train.deterministic sets) and strict: the largest difference of the query gradient from the first repeat.
2. The runs: `--copies` copies of one fine-tuning run trained at the same time under NVIDIA MPS (kernels of several
   processes side by side on the GPU, as in a sweep), with train.deterministic=false and then true; are their
   records (train losses per epoch, test score) identical?
3. The grouped engine in strict deterministic mode: one RTE slice (7 PEFT methods in a group, fine-tuning alone)
   through experiments/sweep.py with train.deterministic=false and true: every run completes? same records?

    python experiments/gpu_determinism.py --model .dev/minilm --data .dev/glue --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def kernel_spread(backend, mode: str, repeats: int) -> float | str:
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (16, 12, 256, 32)  # batch, heads, tokens, head dim
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)
    torch.use_deterministic_algorithms(mode != "off", warn_only=mode == "warn_only")
    first, spread = None, 0.0
    try:
        with warnings.catch_warnings(record=True) as caught, sdpa_kernel(backend):
            warnings.simplefilter("always")
            for _ in range(repeats):
                q.grad = None
                torch.manual_seed(1)  # the same dropout mask every time
                F.scaled_dot_product_attention(q, k, v, dropout_p=0.1).backward(grad)
                dq = q.grad.float()
                first = dq.clone() if first is None else first
                spread = max(spread, (dq - first).abs().max().item())
        warned = any("deterministic" in str(w.message) for w in caught)
        return f"{spread:.3g}" + (" (warned)" if warned else "")
    except RuntimeError as err:
        return f"error: {str(err).splitlines()[0][:80]}"
    finally:
        torch.use_deterministic_algorithms(False)


def train_copies(args, deterministic: bool) -> list[dict]:
    root = Path(args.work) / f"det_{deterministic}"
    procs = []
    for i in range(args.copies):
        cmd = [sys.executable, "-m", "unipelt.run", "task=rte", "method=finetune", "data.k=500", "data.seed=333",
               f"model.path={args.model}", f"data.dir={args.data}", "train.mixed_precision=bf16",
               "train.eval_batch_size=256", "train.cuda_graph=false", f"train.deterministic={str(deterministic).lower()}",
               "output.progress=false", "output.save_modules=false", f"output.runs_dir={root / str(i)}"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    records = []
    for i, p in enumerate(procs):
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"copy {i} failed:\n{err[-2000:]}")
        (path,) = (root / str(i)).glob("*/record.json")
        records.append(json.loads(path.read_text()))
    return records


def sweep_slice(args, deterministic: bool) -> Path:
    runs = Path(args.work) / f"sweep_{deterministic}"
    cmd = [sys.executable, "experiments/sweep.py", "--runs-dir", str(runs), "--mode", "grouped", "--ks", "100",
           "--tasks", "rte", "--seeds", "111", "--workers-per-device", "2", "--mps", "off",
           "--set", f"model.path={args.model}", "--set", f"data.dir={args.data}", "--set", "train.mixed_precision=bf16",
           "--set", "train.eval_batch_size=256", "--set", "train.cuda_graph=false",
           "--set", f"train.deterministic={str(deterministic).lower()}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    print(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:], flush=True)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default=".")
    ap.add_argument("--work", default=".sweep/determinism")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--copies", type=int, default=4)
    args = ap.parse_args()
    lines = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", "",
             "| SDPA backward backend | deterministic mode | max abs dq difference over repeats |", "|---|---|---|"]
    # cuDNN's is the backend torch picks for bf16 on an H100 (the per-run trainer's kernel profiles show it)
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("memory-efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cuDNN", SDPBackend.CUDNN_ATTENTION)):
        for mode in ("off", "warn_only", "strict"):
            lines.append(f"| {name} | {mode} | {kernel_spread(backend, mode, args.repeats)} |")
    print("\n".join(lines), flush=True)
    lines += ["", f"| train.deterministic | copies | distinct train-loss histories | test scores |", "|---|---|---|---|"]
    from unipelt.grouping.mps import mps_daemon

    for deterministic in (False, True):
        with mps_daemon(["cuda:0"]):
            records = train_copies(args, deterministic)
        histories = {tuple(h["train_loss"] for h in r["history"]) for r in records}
        scores = sorted({r["test_score"] for r in records})
        lines.append(f"| {deterministic} | {len(records)} | {len(histories)} | {', '.join(f'{s:.4f}' for s in scores)} |")
        print(lines[-1], flush=True)
    slices = [sweep_slice(args, d) for d in (False, True)]
    done = [len(list(p.glob("*/record.json"))) for p in slices]
    compared = subprocess.run([sys.executable, "experiments/compare_records.py", *map(str, slices)],
                              capture_output=True, text=True).stdout.strip()
    lines += ["", f"grouped slice (RTE, K=100, seed 111, 8 runs): records {done[0]} without, {done[1]} with "
              f"train.deterministic=true", "", "    " + compared.replace("\n", "\n    ")]
    print("\n".join(lines[-3:]), flush=True)
    Path(args.out, "determinism.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
