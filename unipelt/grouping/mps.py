"""NVIDIA MPS for a sweep's worker processes.

A sweep keeps several processes on each GPU (group workers and the solo fine-tuning runs). Without MPS the GPU
time-slices between their contexts: one process's kernels at a time, and a grouped step of a small encoder is
thousands of kernels that each fill only part of the GPU. Under MPS the processes share one context, so their
kernels run side by side. Kernels and their order per process do not change, so neither do the results.

`mps_daemon` starts a control daemon for the duration of a block and stops it after, whatever happens inside;
processes started inside the block (they inherit the environment) are its clients.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"
PIPE_ENV, LOG_ENV = "CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"
QUIT_TIMEOUT_S = 30


class MPSError(RuntimeError):
    """MPS was asked for and cannot be had; the message says why."""


@contextlib.contextmanager
def mps_daemon(devices: list[str], control: str = CONTROL):
    """Run the block under an MPS control daemon for `devices` (cuda or cuda:N entries). Yields the daemon's pipe
    directory, or None when the environment already names one (CUDA_MPS_PIPE_DIRECTORY: a daemon someone else
    runs, left alone). Raises MPSError, before anything starts, for CPU devices or a missing control binary."""
    not_cuda = [d for d in devices if not str(d).startswith("cuda")]
    if not_cuda:
        raise MPSError(f"MPS shares CUDA GPUs between processes; devices {not_cuda} are not CUDA devices "
                       "(leave --mps off on CPU)")
    if os.environ.get(PIPE_ENV):
        yield None
        return
    binary = shutil.which(control)
    if binary is None:
        raise MPSError(f"{control!r} is not on PATH: MPS needs the NVIDIA driver's MPS tools (or leave --mps off)")
    root = Path(tempfile.mkdtemp(prefix="unipelt_mps_"))
    env = {PIPE_ENV: str(root / "pipe"), LOG_ENV: str(root / "log")}
    for path in env.values():
        Path(path).mkdir()
    indices = sorted({d.split(":", 1)[1] for d in devices if ":" in d})
    daemon_env = {**os.environ, **env}
    if indices and "CUDA_VISIBLE_DEVICES" not in os.environ:
        daemon_env["CUDA_VISIBLE_DEVICES"] = ",".join(indices)
    started = subprocess.run([binary, "-d"], env=daemon_env, capture_output=True, text=True)
    if started.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise MPSError(f"{control} -d failed ({started.returncode}): {(started.stderr or started.stdout).strip()}")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield Path(env[PIPE_ENV])
    finally:
        try:  # quit waits for the daemon's clients to exit; a hung one must not hang the caller
            subprocess.run([binary], input="quit\n", env=daemon_env, capture_output=True, text=True,
                           timeout=QUIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            warnings.warn(f"the MPS daemon did not quit within {QUIT_TIMEOUT_S} s (a client still attached?); "
                          f"stop it with: CUDA_MPS_PIPE_DIRECTORY={env[PIPE_ENV]} {control} <<< quit")
            root = None  # its pipe directory stays: the daemon still uses it
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
