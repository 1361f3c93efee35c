"""NVIDIA MPS for a sweep's worker processes.

A sweep keeps several processes on each GPU (group workers and the solo fine-tuning runs). Without MPS the GPU
time-slices between their contexts: one process's kernels at a time, and a grouped step of a small encoder is
thousands of kernels that each fill only part of the GPU. Under MPS the processes share one context, so their
kernels run side by side. Kernels and their order per process do not change, so neither do the results.

`mps_daemon` starts a control daemon for the duration of a block and asks it to quit after, whatever happens
inside; processes started inside the block (they inherit the environment) are its clients. Measured on one GPU, the
same MiniLM sweep with MPS off and on: its work ended 1.19-1.29x sooner (H100, H200; K=100 and K=500), every record
identical (experiments/results/bench/mps/).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"
PIPE_ENV, LOG_ENV = "CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"
QUIT_WAIT_S = 1  # seconds to wait for the daemon to quit before leaving it to finish alone (5 s cost a short
# two-GPU sweep 3% of its wall time)


log = logging.getLogger("unipelt.mps")


def mps_available(devices: list[str], control: str = CONTROL) -> str | None:
    """Why MPS cannot run for `devices` here (a sentence), or None when it can: every device a CUDA GPU and the
    control binary on PATH."""
    not_cuda = [d for d in devices if not str(d).startswith("cuda")]
    if not_cuda:
        return (f"MPS shares CUDA GPUs between processes; devices {not_cuda} are not CUDA devices "
                "(leave --mps off on CPU)")
    if not os.environ.get(PIPE_ENV) and shutil.which(control) is None:
        return f"{control!r} is not on PATH: MPS needs the NVIDIA driver's MPS tools (or leave --mps off)"
    return None


class MPSError(RuntimeError):
    """MPS was asked for and cannot be had; the message says why."""


@contextlib.contextmanager
def mps_daemon(devices: list[str], control: str = CONTROL):
    """Run the block under an MPS control daemon for `devices` (cuda or cuda:N entries). Yields the daemon's pipe
    directory, or None when the environment already names one (CUDA_MPS_PIPE_DIRECTORY: a daemon someone else
    runs, left alone). Raises MPSError, before anything starts, for CPU devices or a missing control binary."""
    reason = mps_available(devices, control)
    if reason is not None:
        raise MPSError(reason)
    if os.environ.get(PIPE_ENV):
        yield None
        return
    binary = shutil.which(control)
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
        # quit waits for the daemon's last clients to detach, which on a GPU took longer than the sweep's own
        # shutdown (30 s and more after every worker had exited): ask it to quit and go on; it ends by itself
        quitter = subprocess.Popen([binary], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env=daemon_env, text=True, start_new_session=True)
        quitter.stdin.write("quit\n")
        quitter.stdin.close()
        try:
            quitter.wait(timeout=QUIT_WAIT_S)
        except subprocess.TimeoutExpired:
            log.info("the MPS daemon is shutting down in the background (pipe %s)", env[PIPE_ENV])
            root = None  # the daemon still uses its pipe directory
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
