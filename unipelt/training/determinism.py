"""`train.deterministic`: torch's deterministic kernels for the length of one training.

Why: torch lists the backward of flash and memory-efficient attention (what `scaled_dot_product_attention` picks
for the per-run trainer: full fine-tuning, `group.enabled=false`) among its nondeterministic kernels (atomic adds into
the query gradient). A sweep on two H200s once gave one fine-tuning record in 200 that differed from the same run on
one GPU (experiments/results/two_gpus/README.md); six copies of that run trained at once on an H100 agreed bit for
bit, so that one was not reproduced (experiments/results/bench/determinism_h100.md). This mode takes torch's
deterministic kernels throughout. It changes which kernels run, so its records differ from the default mode's
(also in groups), and it is off by default so that records made without it stay comparable.
"""
from __future__ import annotations

import contextlib
import os

import torch

# cuBLAS needs a fixed workspace split for reproducible results when several streams share a handle; torch refuses
# some cuBLAS calls in deterministic mode unless this is set (the value torch's own docs give)
CUBLAS_WORKSPACE = ":4096:8"


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """Inside the block, torch uses deterministic algorithms, strictly: with `warn_only` torch only warns about
    flash and memory-efficient attention's backward and keeps their atomic adds (measured,
    experiments/results/bench/determinism_h100.md); a kernel that has no deterministic version stops the run at its
    first step with torch's error naming it. On exit the previous mode comes back, since worker processes train many
    runs one after another. `enabled=False` changes nothing."""
    if not enabled:
        yield
        return
    was_on, was_warn_only = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)
