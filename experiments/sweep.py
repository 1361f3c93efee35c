"""Run a grid of unipelt experiments with several runs packed on one machine (GPU or CPU), resumably.

Each worker process imports torch once and runs many experiments in turn; runs whose complete record exists are
skipped, so the same command finishes only what is missing. A deadline stops new runs from starting (for
time-limited jobs); runs in flight finish and write their records.

    python experiments/sweep.py --runs-dir experiments/results/low_resource_minilm/runs --workers 12 \
        --tasks cola,sst2,mrpc,stsb,rte --ks 100,500,1000 --seeds 111,222,333,444,555 \
        --methods finetune,bitfit,adapter,prefix,lora,unipelt_apl --deadline 500 [--set model.path=... ...]

Order: all K=100 runs first, then K=500, then K=1000 (the low-resource table fills from the left).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path


def grid(args) -> list[list[str]]:
    runs = []
    for k in args.ks.split(","):
        for seed in args.seeds.split(","):
            for task in args.tasks.split(","):
                for method in args.methods.split(","):
                    runs.append([f"task={task}", f"method={method}", f"data.k={k}", f"data.seed={seed}"])
    return runs


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def run_one(overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    from unipelt.confdir import CONF_DIR
    from unipelt.run import execute

    t0 = time.perf_counter()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    try:
        record = execute(cfg)
        status = "skipped" if record is None else record["status"]
    except Exception as err:  # a failed run is recorded by the runner; the sweep goes on
        status = f"error: {err}"
    return {"overrides": overrides, "status": status, "wall_s": time.perf_counter() - t0}


def done_filter(runs_dir: Path, extra: list[str]):
    """A predicate `overrides -> complete record exists?`. One Hydra compose for the shared settings (model
    name, training seed, tag); each grid point's run id is then derived directly, so scanning hundreds of runs
    takes milliseconds instead of a compose each."""
    from hydra import compose, initialize_config_dir

    from unipelt.confdir import CONF_DIR
    from unipelt.training.record import RECORD_FILE, is_complete, run_id

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        base = compose("config", overrides=extra)

    def done(overrides: list[str]) -> bool:
        axis = dict(o.split("=", 1) for o in overrides)
        k = axis["data.k"] if axis["data.k"] == "full" else int(axis["data.k"])
        rid = run_id(axis["task"], axis["method"], k, int(axis["data.seed"]), base.train.seed, base.model.name,
                     base.output.get("tag"))
        return is_complete(runs_dir / rid / RECORD_FILE)

    return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-dir", required=True)
    p.add_argument("--tasks", default="cola,sst2,mrpc,stsb,rte")
    p.add_argument("--ks", default="100,500,1000")
    p.add_argument("--seeds", default="111,222,333,444,555")
    p.add_argument("--methods", default="finetune,bitfit,adapter,prefix,lora,unipelt_apl")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    p.add_argument("--deadline", type=float, default=None, help="seconds after which no new run starts")
    p.add_argument("--set", action="append", default=[], help="extra Hydra override for every run (repeatable)")
    p.add_argument("--log", default=None, help="append one JSON line per finished run here")
    args = p.parse_args(argv)
    extra = [f"output.runs_dir={args.runs_dir}", "output.progress=false", "output.save_modules=false", *args.set]
    done = done_filter(Path(args.runs_dir), extra)
    todo = [o + extra for o in grid(args) if not done(o)]
    print(f"{len(todo)} runs to do ({len(grid(args)) - len(todo)} already complete), {args.workers} workers", flush=True)
    finished, log = [], open(args.log, "a") if args.log else None
    start = time.perf_counter()  # the deadline counts from here, not from the (slow) scan for finished runs
    ctx = mp.get_context("spawn")  # CUDA-safe: no forked CUDA state
    with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init_worker, initargs=(args.threads,)) as pool:
        pending, queue = set(), list(todo)
        while queue or pending:
            late = args.deadline is not None and time.perf_counter() - start > args.deadline
            while queue and len(pending) < args.workers and not late:
                pending.add(pool.submit(run_one, queue.pop(0)))
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                result = fut.result()
                finished.append(result)
                if log:
                    log.write(json.dumps(result) + "\n")
                    log.flush()
                print(f"[{time.perf_counter() - start:7.1f}s] {result['status']:9s} {result['wall_s']:6.1f}s "
                      + " ".join(result["overrides"][:4]), flush=True)
    elapsed = time.perf_counter() - start
    complete = [r for r in finished if r["status"] == "complete"]
    print(f"finished {len(complete)} runs in {elapsed:.0f}s with {args.workers} workers: "
          f"{3600 * len(complete) / max(elapsed, 1e-9):.0f} runs/hour; {len(queue)} not started", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
