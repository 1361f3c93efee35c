"""A multirun's jobs on every device: worker processes, several per device, each taking the next job when free.

A job is a list of run configs that `execute_many` trains in one process: a compatible group, or one run that
trains alone. Jobs go largest first to whichever device has a free worker, so the longest groups do not end the
sweep alone. Each worker sees only its own GPU (CUDA_VISIBLE_DEVICES), and on GPUs the workers run under NVIDIA
MPS when it is available (mps.py), so that their kernels share the GPU. A run trains the same way in a worker as in
the calling process: same plan, same group, same records.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass

from .mps import MPSError, mps_available, mps_daemon


@dataclass
class Job:
    cfgs: list  # DictConfigs of the job's runs
    overrides: list | None  # each run's command-line overrides (for its record), or None
    slots: int  # runs trained at once (a group's max_runs)
    cost: float = 1.0  # relative size: larger jobs start first


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


def _pin(device: str, visible: str | None) -> None:
    """Worker initializer: see only `device`'s GPU (before anything initialises CUDA)."""
    if device.startswith("cuda:"):
        os.environ["CUDA_VISIBLE_DEVICES"] = physical_gpu(device, visible)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def _work(job: Job, device: str) -> list:
    from .runner import execute_many

    local = "cuda" if device.startswith("cuda") else device
    return execute_many(job.cfgs, overrides=job.overrides, device=local, max_runs=job.slots, queue=len(job.cfgs))


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


def run_jobs(jobs: list[Job], devices: list[str], workers_per_device: int = 1, mps: str = "auto") -> list[list]:
    """Every job's outcomes (execute_many's, in the job's run order), running `workers_per_device` processes per
    device. A job whose worker breaks (a bug, a killed process) gets an 'error' outcome per run; the records its runs
    wrote stay, and re-running the sweep resumes them."""
    from .runner import Outcome

    if workers_per_device < 1:
        raise ValueError(f"workers_per_device must be at least 1, got {workers_per_device}")
    if not devices:
        raise ValueError("no devices to run on")
    if not jobs:  # everything was skipped or refused: no workers, no MPS daemon
        return []
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i].cost)
    results: list[list | None] = [None] * len(jobs)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ctx = mp.get_context("spawn")
    with maybe_mps(devices, mps), contextlib.ExitStack() as stack:
        pools = [stack.enter_context(ProcessPoolExecutor(workers_per_device, mp_context=ctx, initializer=_pin,
                                                         initargs=(d, visible))) for d in devices]
        in_flight: dict = {}  # future -> (job index, device index)
        load = [0] * len(devices)
        pending = list(order)
        while pending or in_flight:
            while pending and min(load) < workers_per_device:
                d = load.index(min(load))
                i = pending.pop(0)
                in_flight[pools[d].submit(_work, jobs[i], devices[d])] = (i, d)
                load[d] += 1
            done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            for future in done:
                i, d = in_flight.pop(future)
                load[d] -= 1
                try:
                    results[i] = future.result()
                except Exception as err:  # the worker broke: every run of the job says so; records stay as written
                    message = f"worker on {devices[d]} failed: {type(err).__name__}: {err}"
                    results[i] = [Outcome(None, "error", message=message) for _ in jobs[i].cfgs]
    return results
