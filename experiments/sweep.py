"""Run a grid of unipelt experiments on every visible device, resumably: grouped (default) or packed.

grouped: the grid's PEFT runs are split into groups that share the frozen encoder's forward (same task, K,
         lengths, ...; unipelt/grouping) and each group trains in one process; full fine-tuning runs train alone.
         Groups (largest first) and solo runs go to `--workers-per-device` processes on each device.
packed:  one run after another in each of `--workers` processes on one device (the earlier way; pass
         `--set group.enabled=false` for the per-run trainer exactly as before grouping existed; on a GPU also
         `--set train.cuda_graph=false`, since the default graphs the per-run trainer's steps there).

On GPUs the worker processes run under NVIDIA MPS by default (`--mps auto|on|off`, unipelt/grouping/mps.py): their
kernels share each GPU instead of time-slicing it; the records do not change.

Runs whose complete record exists are skipped, so the same command finishes only what is missing. A deadline
stops new work from starting (for time-limited jobs); work in flight finishes and writes its records.

    python experiments/sweep.py --runs-dir runs/low_resource --tasks cola,sst2,mrpc,stsb,rte --ks 100,500,1000 \
        --seeds 111,222,333,444,555 --methods finetune,bitfit,adapter,prefix,lora,unipelt_ap,unipelt_apl,unipelt_apl_nogate \
        [--mode grouped|packed] [--devices auto|cpu|cuda:0,cuda:1] [--workers-per-device 2] [--max-runs N] \
        [--queue Q] [--costs-from RUNS_DIR] [--mps auto|on|off] [--dry-run] \
        [--deadline SECONDS] [--set model.path=... ...]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from unipelt.grouping.pool import Job, WorkerPool, maybe_mps, visible_devices


def grid(args) -> list[list[str]]:
    runs = []
    for k in args.ks.split(","):
        for seed in args.seeds.split(","):
            for task in args.tasks.split(","):
                for method in args.methods.split(","):
                    runs.append([f"task={task}", f"method={method}", f"data.k={k}", f"data.seed={seed}"])
    return runs


class Composer:
    """Hydra configs for grid points: one compose per (task, method), the K and seed axes set directly (a
    compose takes tens of milliseconds; a 600-run grid would spend half a minute composing)."""

    def __init__(self, extra: list[str]) -> None:
        self.extra = extra
        self._base: dict = {}

    def __call__(self, overrides: list[str]):
        from hydra import compose, initialize_config_dir
        from omegaconf import OmegaConf, open_dict

        from unipelt.confdir import CONF_DIR

        axis = dict(o.split("=", 1) for o in overrides)
        fixed = tuple(o for o in overrides if not o.startswith(("data.k=", "data.seed=")))
        if fixed not in self._base:
            with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
                cfg = compose("config", overrides=list(fixed) + self.extra)
            if "hydra" in cfg:
                with open_dict(cfg):
                    del cfg["hydra"]
            self._base[fixed] = cfg
        cfg = OmegaConf.create(OmegaConf.to_container(self._base[fixed]))
        k = axis.get("data.k")
        if k is not None:
            cfg.data.k = k if k == "full" else int(k)
        if "data.seed" in axis:
            cfg.data.seed = int(axis["data.seed"])
        return cfg


def done_filter(runs_dir: Path, extra: list[str]):
    """A predicate `overrides -> complete record exists?`, deriving each run id without a compose."""
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


# --- planning (pure: tested on CPU for several devices) -------------------------------------------------------
def plan_jobs(todo: list[list[str]], composer: Composer, max_runs: int, queued: int | None = None,
              task_factors: dict | None = None) -> list[Job]:
    """Jobs (largest first) of overrides, which the pool's workers compose: each a compatible group of up to `queued`
    runs (default max_runs) trained `max_runs` at a time, or one run that must train alone. `task_factors`
    ((task, K) -> relative cost, from earlier records: `task_factors_from`) put the groups that ran longest before
    first, so they do not end the sweep alone."""
    factors = task_factors or {}
    from unipelt.grouping.runner import partition, solo_reason
    from unipelt.plan import plan

    solo, grouped = [], []
    planned = {}  # the data seed changes neither grouping nor cost: one compose + plan per other grid point
    for overrides in todo:
        key = tuple(o for o in overrides if not o.startswith("data.seed="))
        if key not in planned:
            cfg = composer(overrides)
            first = plan(cfg)
            planned[key] = (first, solo_reason(first, cfg) is None)
        base, groupable = planned[key]
        p = with_data_seed(base, overrides)
        (grouped if groupable else solo).append(p)
    total = max(max_runs, queued or max_runs)
    # a group's step costs about sqrt(runs at once) of one run's; its steps are the sum of its runs' over its slots
    jobs = [Job(None, [g.overrides for g in group], max_runs,
                sum(_cost(g, factors) for g in group) / min(len(group), max_runs) ** 0.5)
            for group in partition(grouped, total)]
    jobs += [Job(None, [p.overrides], 1, 2 * _cost(p, factors), solo=True) for p in solo]
    return sorted(jobs, key=lambda j: -j.cost)


def plan_sweep(args, todo: list[list[str]], extra: list[str], devices: list[str]) -> tuple[int, list[Job]]:
    """(runs trained at once per group, jobs largest first) for the grid points `todo`: what a grouped sweep runs
    and what --dry-run shows."""
    composer = Composer(extra)
    max_runs = args.max_runs or _auto_max_runs(devices, args.workers_per_device, todo, composer)
    factors = task_factors_from(args.costs_from) if args.costs_from else None
    if factors:
        print("task cost factors from earlier records: " + ", ".join(
            f"{t} k={k} {v:.2f}" for (t, k), v in sorted(factors.items())), flush=True)
    return max_runs, plan_jobs(todo, composer, max_runs, args.queue, factors)


def simulate_makespan(jobs: list[Job], workers: int) -> float:
    """When the last of `jobs` (in order) ends if each of `workers` processes takes the next job as soon as it is
    free and a job lasts its planned cost: the planner's view of how well the jobs balance over the workers (it
    ignores that jobs sharing a device slow each other down, and that early stopping makes real times differ)."""
    import heapq

    free = [0.0] * max(1, workers)
    for job in jobs:
        heapq.heappush(free, heapq.heappop(free) + job.cost)
    return max(free)


def dry_run(args, todo: list[list[str]], extra: list[str]) -> None:
    """Print the plan (jobs, largest first) and how its groups balance over 1, 2 and the visible devices, without
    training: for comparing --max-runs / --queue / --workers-per-device before a timed sweep. The balance figure is
    planned costs only (simulate_makespan): real groups speed up when fewer share a device and cannot end before
    their longest run, so it ranks plans by how evenly they split, it does not predict a wall time."""
    devices = visible_devices(args.devices)
    max_runs, jobs = plan_sweep(args, todo, extra, devices)
    groups = [j for j in jobs if not j.solo]
    print(f"dry run: {len(todo)} runs in {len(groups)} groups (at most {max_runs} at a time) and "
          f"{len(jobs) - len(groups)} runs that train alone")
    lines: dict[str, int] = {}  # identical jobs (e.g. the fine-tuning runs of one task) on one line
    for job in jobs:
        axis = dict(o.split("=", 1) for o in job.overrides[0])
        kind = "alone" if job.solo else f"group of {len(job.overrides)}"
        line = f"{kind:12s} task={axis.get('task')} k={axis.get('data.k')} planned cost {job.cost:.0f}"
        lines[line] = lines.get(line, 0) + 1
    for line, count in lines.items():
        print(f"  {count:3d} x {line}")
    if not groups:
        return
    total = sum(j.cost for j in groups)
    one = simulate_makespan(groups, args.workers_per_device)
    for n in sorted({1, 2, len(devices)}):
        workers = n * args.workers_per_device
        span = simulate_makespan(groups, workers)
        print(f"  {n} device(s) x {args.workers_per_device} group workers: the groups end at {span:.0f} cost units, "
              f"workers busy {100 * total / (workers * span):.0f}%, {one / span:.2f}x one device (balance only)")


def with_data_seed(base, overrides: list[str]):
    """`base`'s plan for the grid point `overrides`, which differs from it at most in the data seed."""
    import dataclasses

    from unipelt.training.record import run_id

    axis = dict(o.split("=", 1) for o in overrides)
    seed = int(axis.get("data.seed", base.data_seed))
    rid = run_id(base.spec.name, base.method, base.k, seed, base.settings.seed, base.model_name,
                 (base.config or {}).get("output", {}).get("tag"))
    return dataclasses.replace(base, data_seed=seed, run_id=rid, run_dir=base.run_dir.parent / rid,
                               overrides=overrides)


def _cost(p, factors: dict | None = None) -> float:
    """Relative work of a run: steps ~ K (or the train size) times its epochs, times its task's factor at that K
    (how much longer its runs took than the K's average, where earlier records say so)."""
    k = p.k if isinstance(p.k, int) else 10_000
    return (k + p.dev_size / 3) * p.settings.epochs * (factors or {}).get((p.spec.name, str(p.k)), 1.0)


def task_factors_from(runs_dirs: list[str]) -> dict:
    """(task, K) -> mean train + eval seconds of its complete PEFT records over the mean of all tasks at that K.
    Early stopping makes some tasks run several times longer than others (MiniLM at K=500: STS-B 35 epochs, MRPC
    14); only the ratios within one K are used, so records from another device or sweep mode still rank them."""
    import glob
    import statistics
    from collections import defaultdict

    seconds = defaultdict(list)
    for folder in runs_dirs:
        for path in glob.glob(os.path.join(folder, "*", "record.json")):
            try:
                r = json.loads(Path(path).read_text())
            except (OSError, ValueError):
                continue
            if r.get("status") != "complete" or r.get("method") == "finetune" or not r.get("time"):
                continue
            seconds[(r["task"], str(r["k"]))].append(r["time"].get("train_s", 0) + r["time"].get("eval_s", 0))
    mean = {key: statistics.mean(v) for key, v in seconds.items()}
    per_k = defaultdict(list)
    for (task, k), value in mean.items():
        per_k[k].append(value)
    return {(task, k): value / statistics.mean(per_k[k]) for (task, k), value in mean.items() if value > 0}


def solo_workers(devices: list[str], requested: int | None) -> int:
    """Extra processes per device for the runs that train alone (full fine-tuning): each uses a sliver of a GPU,
    so on a GPU several run beside the groups, as in packed mode (default 4); on CPU none (the group workers take
    them once no group is left)."""
    if requested is not None:
        return requested
    return 4 if any(d.startswith("cuda") for d in devices) else 0


# --- execution ------------------------------------------------------------------------------------------------
def run_grouped(args, todo: list[list[str]], extra: list[str], start: float, log) -> list[dict]:
    """The plan's jobs on grouping/pool.py's WorkerPool: group workers and solo workers on every device, composing
    the runs' configs in the workers; one log row per run."""
    devices = visible_devices(args.devices)
    n_solo = solo_workers(devices, args.solo_workers_per_device)
    epoch0 = time.time() - (time.perf_counter() - start)  # the sweep's start on the wall clock, for the log
    finished: list[dict] = []

    def on_result(job: Job, result) -> None:
        for overrides, outcome in zip(job.overrides, result.outcomes):
            status = outcome.status if outcome.status != "error" else f"error: {outcome.message}"
            # began_s: when the job started, seconds after the sweep's start (a timeline of where the time went)
            row = {"overrides": overrides, "status": status, "wall_s": result.wall_s, "device": result.device,
                   "group_size": len(job.overrides), "worker": result.worker, "began_s": round(result.began - epoch0, 2)}
            finished.append(row)
            log(row)
        print(f"[{time.perf_counter() - start:7.1f}s] {result.device} group of {len(job.overrides)} "
              f"({' '.join(job.overrides[0][:1] + job.overrides[0][2:3])}): "
              f"{sum(o.status == 'complete' for o in result.outcomes)} complete in {result.wall_s:.1f}s; "
              f"{len(finished)} of {len(todo)} runs finished", flush=True)

    # the workers start first: their imports (torch, transformers; seconds) overlap the planning here
    with WorkerPool(devices, args.workers_per_device, n_solo, threads=args.threads, compose=Composer(extra)) as pool:
        max_runs, jobs = plan_sweep(args, todo, extra, devices)
        sizes = [len(j.overrides) for j in jobs]
        at_once = f", {max_runs} at a time" if max(sizes) > max_runs else ""
        print(f"{len(todo)} runs in {len(jobs)} jobs (group sizes {sorted(sizes, reverse=True)}{at_once}) on "
              f"{len(devices)} device(s) x {args.workers_per_device} worker(s)", flush=True)
        if n_solo and any(j.solo for j in jobs):
            print(f"+ {n_solo} worker(s) per device for the {sum(j.solo for j in jobs)} runs that train alone",
                  flush=True)
        deadline = None if args.deadline is None else time.monotonic() + args.deadline - (time.perf_counter() - start)
        results = pool.run(jobs, on_result, deadline)
    not_started = sum(len(j.overrides) for j, r in zip(jobs, results) if r is None)
    if not_started:
        print(f"{not_started} runs not started (deadline)", flush=True)
    return finished


def _auto_max_runs(devices, workers_per_device, todo, composer) -> int:
    """Runs per group from the smallest device's free memory, shared by that device's workers."""
    from unipelt.grouping.runner import CPU_MAX_RUNS, GPU_MAX_RUNS, estimate_run_bytes
    from unipelt.plan import plan

    if not any(d.startswith("cuda") for d in devices):
        return CPU_MAX_RUNS
    import torch
    from transformers import AutoConfig

    from unipelt.encoders import resolve_model_path

    sample = plan(composer(todo[0]))
    model_cfg = AutoConfig.from_pretrained(resolve_model_path(str(sample.model_path)))
    free = min(torch.cuda.mem_get_info(int(d.split(":")[1]) if ":" in d else 0)[0] for d in devices)
    per_run = estimate_run_bytes(sample, model_cfg)
    return max(1, min(GPU_MAX_RUNS, int(0.5 * free / workers_per_device // per_run)))


def _packed_one(overrides: list[str]) -> dict:
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


def _init_packed(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def run_packed(args, todo: list[list[str]], extra: list[str], start: float, log) -> list[dict]:
    finished = []
    ctx = mp.get_context("spawn")  # CUDA-safe: no forked CUDA state
    with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init_packed, initargs=(args.threads,)) as pool:
        pending, waiting = set(), [o + extra for o in todo]
        while waiting or pending:
            late = args.deadline is not None and time.perf_counter() - start > args.deadline
            while waiting and len(pending) < args.workers and not late:
                pending.add(pool.submit(_packed_one, waiting.pop(0)))
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                result = fut.result()
                finished.append(result)
                log(result)
                print(f"[{time.perf_counter() - start:7.1f}s] {len(finished):4d}/{len(todo)} {result['status']:9s} "
                      f"{result['wall_s']:6.1f}s " + " ".join(result["overrides"][:4]), flush=True)
    return finished


@contextlib.contextmanager
def sweep_mps(args):
    """The sweep's MPS daemon (--mps), up for the whole sweep. `on` and MPS unavailable: a clear exit before any work
    starts; `auto` and unavailable: plain processes (said when the devices are GPUs)."""
    from unipelt.grouping.mps import PIPE_ENV, MPSError, mps_available

    devices = visible_devices(args.devices)
    stack = contextlib.ExitStack()
    try:
        pipe = stack.enter_context(maybe_mps(devices, args.mps))
    except MPSError as err:
        raise SystemExit(f"--mps on: {err}") from None
    with stack:
        if pipe is not None:
            print(f"MPS daemon started (pipe {pipe})", flush=True)
        elif args.mps != "off" and os.environ.get(PIPE_ENV):
            print(f"MPS: the daemon of {PIPE_ENV}", flush=True)
        elif args.mps != "off" and any(d.startswith("cuda") for d in devices):
            print(f"MPS off: {mps_available(devices)}", flush=True)
        yield


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-dir", required=True)
    p.add_argument("--tasks", default="cola,sst2,mrpc,stsb,rte")
    p.add_argument("--ks", default="100,500,1000")
    p.add_argument("--seeds", default="111,222,333,444,555")
    p.add_argument("--methods", default="finetune,bitfit,adapter,prefix,lora,unipelt_ap,unipelt_apl,unipelt_apl_nogate")
    p.add_argument("--mode", choices=("grouped", "packed"), default="grouped")
    p.add_argument("--devices", default="auto", help="auto (every visible GPU, else cpu) or a list: cuda:0,cuda:1")
    p.add_argument("--workers-per-device", type=int, default=2, help="grouped: processes per device")
    p.add_argument("--max-runs", type=int, default=None, help="grouped: runs trained at once per group (default: "
                   "from memory)")
    p.add_argument("--queue", type=int, default=None, help="grouped: runs per group in all (default: --max-runs); "
                   "runs beyond --max-runs take the slots of runs that stop")
    p.add_argument("--costs-from", action="append", default=[], metavar="RUNS_DIR",
                   help="grouped: earlier records whose run times rank the tasks' groups (longest first; repeatable)")
    p.add_argument("--solo-workers-per-device", type=int, default=None,
                   help="grouped: extra processes per device for runs that train alone (default 4 on GPU, 0 on CPU)")
    p.add_argument("--workers", type=int, default=1, help="packed: worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    p.add_argument("--deadline", type=float, default=None, help="seconds after which no new work starts")
    p.add_argument("--set", action="append", default=[], help="extra Hydra override for every run (repeatable)")
    p.add_argument("--log", default=None, help="append one JSON line per finished run here")
    p.add_argument("--mps", choices=("auto", "on", "off"), default="auto",
                   help="run the workers under an NVIDIA MPS daemon that the sweep starts (their kernels share each GPU "
                   "instead of time-slicing it; results do not change): auto = on when every device is a CUDA GPU and "
                   "nvidia-cuda-mps-control is on PATH; on = required (error otherwise); off")
    p.add_argument("--dry-run", action="store_true", help="grouped: print the plan and how its groups balance over "
                   "1, 2 and the visible devices, then stop (nothing trains)")
    args = p.parse_args(argv)
    extra = [f"output.runs_dir={args.runs_dir}", "output.progress=false", "output.save_modules=false", *args.set]
    done = done_filter(Path(args.runs_dir), extra)
    todo = [o for o in grid(args) if not done(o)]
    print(f"{len(todo)} runs to do ({len(grid(args)) - len(todo)} already complete), mode {args.mode}", flush=True)
    if args.dry_run:
        if args.mode != "grouped":
            raise SystemExit(f"--dry-run plans grouped sweeps; got --mode {args.mode}")
        if todo:
            dry_run(args, todo, extra)
        return 0
    log_file = open(args.log, "a") if args.log else None

    def log(row: dict) -> None:
        if log_file:
            log_file.write(json.dumps({**row, "mode": args.mode}) + "\n")
            log_file.flush()

    start = time.perf_counter()  # the deadline counts from here, not from the scan for finished runs
    finished = []
    if todo:
        with sweep_mps(args):
            finished = (run_grouped if args.mode == "grouped" else run_packed)(args, todo, extra, start, log)
    elapsed = time.perf_counter() - start
    complete = [r for r in finished if r["status"] == "complete"]
    errors = [r for r in finished if r["status"].startswith("error")]
    for r in errors[:10]:
        print(f"error: {' '.join(r['overrides'][:4])}: {r['status']}", flush=True)
    print(f"finished {len(complete)} runs in {elapsed:.0f}s ({args.mode}): "
          f"{3600 * len(complete) / max(elapsed, 1e-9):.0f} runs/hour; {len(errors)} errors", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
