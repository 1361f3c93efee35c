"""Shared test utilities: tiny encoders, batches, and weight copying."""
from __future__ import annotations

import torch

from unipelt import PeltModel, preset, tiny_encoder

ALL_PRESETS = ["finetune", "headonly", "bitfit", "adapter", "houlsby", "prefix", "lora",
               "unipelt_ap", "unipelt_apl", "unipelt_aplb", "unipelt_apl_nogate"]


def batch(seed: int = 0, b: int = 4, t: int = 9, vocab: int = 100, pad_rows: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    for r in range(min(pad_rows, b)):
        mask[r, t - 2 - r:] = 0
        ids[r, t - 2 - r:] = 0
    return ids, mask


def model_with(config, arch: str = "bert", seed: int = 0, task: str = "t", num_labels: int = 2, **enc) -> PeltModel:
    model = PeltModel(tiny_encoder(arch, seed=seed, **enc))
    torch.manual_seed(1234)
    model.add_task(task, preset(config) if isinstance(config, str) else config, num_labels)
    model.eval()
    return model


def randomize_(module: torch.nn.Module, seed: int = 7, std: float = 0.1) -> None:
    """Give every parameter a non-trivial value (e.g. LoRA's B, the adapters' up projections)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def copy_matching_(dst: torch.nn.Module, src: torch.nn.Module) -> int:
    """Copy every parameter of `src` into the same-named parameter of `dst`; returns how many were copied."""
    dst_params = dict(dst.named_parameters())
    n = 0
    with torch.no_grad():
        for name, p in src.named_parameters():
            if name in dst_params:
                dst_params[name].copy_(p)
                n += 1
    return n


def compose_or_die(overrides: list[str]):
    """A WorkerPool `compose` for tests: ["die"] kills the worker process mid-job, anything else is a bad config."""
    import os

    if overrides == ["die"]:
        os._exit(9)
    raise ValueError(f"not a run: {overrides}")
