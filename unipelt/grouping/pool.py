"""A multirun's jobs on every device: worker processes, several per device, each taking the next job when free.
One scheduler for both ways of running a sweep: the Hydra launcher (`run_jobs`, via runner.execute_many) and
experiments/sweep.py (WorkerPool with solo workers, a deadline and a job log).

A job is a list of run configs that `execute_many` trains in one process: a compatible group, or one run that
trains alone. Jobs go largest first to whichever worker is free, so the longest groups do not end the
sweep alone. Each worker sees only its own GPU (CUDA_VISIBLE_DEVICES), and on GPUs the workers run under NVIDIA
MPS when it is available (mps.py), so that their kernels share the GPU. A run trains the same way in a worker as in
the calling process: same plan, same group, same records.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import time
from dataclasses import dataclass

from .mps import MPSError, mps_available, mps_daemon


@dataclass
class Job:
    cfgs: list | None  # DictConfigs of the job's runs; None: the worker composes `overrides` (WorkerPool's `compose`)
    overrides: list | None  # each run's command-line overrides (for its record, or to compose), or None
    slots: int  # runs trained at once (a group's max_runs)
    cost: float = 1.0  # relative size: larger jobs start first
    solo: bool = False  # a run that trains alone (full fine-tuning): solo workers take these


@dataclass
class JobResult:
    """What a worker reports for one job: execute_many's outcomes (in the job's run order) and where and when it ran."""

    outcomes: list
    device: str  # as planned (cuda:1), whatever the worker's own CUDA numbering
    worker: int
    began: float  # time.time() at the job's start
    wall_s: float


def physical_gpu(device: str, visible: str | None) -> str:
    """What a worker for `device` (cuda:N, numbered among the caller's visible GPUs) sets CUDA_VISIBLE_DEVICES to:
    the N-th entry of the caller's own CUDA_VISIBLE_DEVICES if it has one (cuda:1 under "2,3" is GPU 3), else N."""
    index = int(device.split(":", 1)[1])
    entries = [e.strip() for e in visible.split(",") if e.strip()] if visible else []
    if not entries:
        return str(index)
    if index >= len(entries):
        raise ValueError(f"device {device} is not among the {len(entries)} visible GPUs (CUDA_VISIBLE_DEVICES={visible})")
    return entries[index]


def visible_devices(spec: str | None = "auto") -> list[str]:
    """`auto` (or None): every visible CUDA device (cuda:0, cuda:1, ...), else cpu; or an explicit comma list."""
    if spec not in (None, "auto"):
        return [d.strip() for d in str(spec).split(",") if d.strip()]
    import torch

    n = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(n)] or ["cpu"]


def next_job(pending: list[Job], solo_only: bool) -> Job | None:
    """The next job for a worker, taken out of `pending` (largest first): group workers take groups, and lone runs
    once no group is left; solo workers take lone runs only."""
    for solo in ((True,) if solo_only else (False, True)):
        for i, job in enumerate(pending):
            if job.solo == solo:
                return pending.pop(i)
    return None


def _worker_main(device: str, visible: str | None, threads: int | None, compose, jobs, results, worker: int) -> None:
    """A worker process on one device: take jobs from its queue until it says stop (None)."""
    if device.startswith("cuda:"):  # before anything initialises CUDA: see only this device's GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = physical_gpu(device, visible)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # several processes share a GPU: growable segments return less fragmented memory between groups
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch

    if threads:
        torch.set_num_threads(threads)
    from .runner import Outcome, execute_many

    local = "cuda" if device.startswith("cuda") else device
    while (item := jobs.get()) is not None:
        index, job = item
        t0, began = time.perf_counter(), time.time()
        try:
            cfgs = job.cfgs if job.cfgs is not None else [compose(o) for o in job.overrides]
            outcomes = execute_many(cfgs, overrides=job.overrides, device=local, max_runs=job.slots, queue=len(cfgs),
                                    progress=False)
        except Exception as err:  # the runner records run failures itself; this is a bug or a bad config
            message = f"worker on {device} failed: {type(err).__name__}: {err}"
            outcomes = [Outcome(None, "error", message=message) for _ in range(_size(job))]
        results.put((index, JobResult(outcomes, device, worker, began, time.perf_counter() - t0)))


def _size(job: Job) -> int:
    return len(job.cfgs if job.cfgs is not None else job.overrides)


def stop_workers(workers, grace_s: float = 20.0) -> None:
    """Let idle workers exit, and end those that have not within `grace_s` in all. Every job's result is in by now
    (the records are written before a worker reports), so nothing is lost; a process that hangs on its way out (seen
    under MPS: the sweep then waited 30 s per worker) must not hold up the sweep or the MPS daemon's shutdown."""
    deadline = time.monotonic() + grace_s
    for w in workers:
        w.join(timeout=max(deadline - time.monotonic(), 0.0))
    late = [w for w in workers if w.is_alive()]
    for w in late:
        w.terminate()
    for w in late:
        w.join(timeout=5)
        if w.is_alive():
            w.kill()
            w.join(timeout=5)
    if late:
        print(f"{len(late)} idle worker(s) did not exit within {grace_s:.0f}s and were stopped", flush=True)


def check_pool_settings(devices: list[str], workers_per_device: int, solo_per_device: int) -> None:
    """Clear errors for settings no pool can run with (before any process starts, also when there is no job)."""
    if workers_per_device < 1:
        raise ValueError(f"workers_per_device must be at least 1, got {workers_per_device}")
    if solo_per_device < 0:
        raise ValueError(f"solo workers per device must be at least 0, got {solo_per_device}")
    if not devices:
        raise ValueError("no devices to run on")


class WorkerPool:
    """Worker processes, `workers_per_device` per device for any job and `solo_per_device` more for lone runs only
    (each uses a sliver of a GPU, so on a GPU several run beside the groups). They start at once, so their imports
    (torch, transformers: seconds) overlap whatever the caller does before `run`. A worker that dies in a job (the
    kernel's OOM killer, a crash in CUDA) turns that job's runs into 'error' outcomes and is replaced; the records
    its runs wrote stay, and re-running resumes them."""

    def __init__(self, devices: list[str], workers_per_device: int = 1, solo_per_device: int = 0,
                 threads: int | None = None, compose=None) -> None:
        check_pool_settings(devices, workers_per_device, solo_per_device)
        self.kinds = [(d, False) for _ in range(workers_per_device) for d in devices] + \
                     [(d, True) for _ in range(solo_per_device) for d in devices]
        self._ctx = mp.get_context("spawn")  # CUDA-safe: no forked CUDA state
        self._args = (os.environ.get("CUDA_VISIBLE_DEVICES"), threads, compose)
        self.results = self._ctx.Queue()
        self.workers: list = [None] * len(self.kinds)
        self.queues: list = [None] * len(self.kinds)
        for i in range(len(self.kinds)):
            self._start(i)

    def _start(self, i: int) -> None:
        visible, threads, compose = self._args
        self.queues[i] = self._ctx.Queue()
        self.workers[i] = self._ctx.Process(target=_worker_main, daemon=True, args=(
            self.kinds[i][0], visible, threads, compose, self.queues[i], self.results, i))
        self.workers[i].start()

    def run(self, jobs: list[Job], on_result=None, deadline: float | None = None) -> list[JobResult | None]:
        """Each job's result, in `jobs` order (None: not started because `deadline`, a time.monotonic() value, had
        passed). Jobs start largest first; `on_result(job, result)` is called as each one ends."""
        pending = sorted(jobs, key=lambda j: -j.cost)
        index = {id(j): i for i, j in enumerate(jobs)}
        results: list[JobResult | None] = [None] * len(jobs)
        busy: list[int | None] = [None] * len(self.kinds)  # the job index each worker is on

        def feed(w: int) -> None:
            if deadline is not None and time.monotonic() > deadline:
                return
            job = next_job(pending, solo_only=self.kinds[w][1])
            if job is not None:
                if not self.workers[w].is_alive():  # died while idle: a fresh one takes its place
                    self._start(w)
                self.queues[w].put((index[id(job)], job))
                busy[w] = index[id(job)]

        def finish(w: int, i: int, result: JobResult) -> None:
            busy[w] = None
            results[i] = result
            if on_result is not None:
                on_result(jobs[i], result)

        for w in range(len(self.kinds)):
            feed(w)
        while any(b is not None for b in busy):
            try:
                i, result = self.results.get(timeout=2)
            except queue.Empty:
                for w, i in enumerate(busy):
                    if i is not None and not self.workers[w].is_alive():
                        from .runner import Outcome

                        message = (f"worker on {self.kinds[w][0]} died (exit code {self.workers[w].exitcode}) during "
                                   "this job; its runs' records and checkpoints so far stay, a re-run resumes them")
                        finish(w, i, JobResult([Outcome(None, "error", message=message) for _ in range(_size(jobs[i]))],
                                               self.kinds[w][0], w, time.time(), 0.0))
                        self._start(w)
                        feed(w)
                continue
            if results[i] is None:  # (a result sent just before its worker died was already counted as an error)
                finish(result.worker, i, result)
            for w in range(len(self.kinds)):  # this worker, and a group worker that found nothing earlier
                if busy[w] is None:
                    feed(w)
        return results

    def close(self, grace_s: float = 20.0) -> None:
        for q in self.queues:
            q.put(None)
        stop_workers(self.workers, grace_s)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def maybe_mps(devices: list[str], mode: str):
    """MPS for the block per `mode` (auto | on | off): `auto` uses it where it can be had, `on` requires it."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"mps must be auto, on or off, got {mode!r}")
    reason = mps_available(devices) if mode != "off" else "off"
    if mode == "off" or (mode == "auto" and reason is not None):
        yield None
        return
    if reason is not None:
        raise MPSError(reason)
    with mps_daemon(devices) as pipe:
        yield pipe


def run_jobs(jobs: list[Job], devices: list[str], workers_per_device: int = 1, mps: str = "auto",
             solo_per_device: int = 0) -> list[list]:
    """Every job's outcomes (execute_many's, in the job's run order), running `workers_per_device` processes per
    device (WorkerPool) and `solo_per_device` more for the lone runs (`Job.solo`), under MPS per `mps`. A job whose
    worker breaks (a bug, a killed process) gets an 'error' outcome per run; the records its runs wrote stay, and
    re-running the sweep resumes them."""
    check_pool_settings(devices, workers_per_device, solo_per_device)
    if not jobs:  # everything was skipped or refused: no workers, no MPS daemon
        return []
    with maybe_mps(devices, mps), WorkerPool(devices, workers_per_device, solo_per_device) as pool:
        return [r.outcomes for r in pool.run(jobs)]
