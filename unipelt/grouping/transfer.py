"""Host-to-device copies that never wait for the GPU."""
from __future__ import annotations

import torch


def to_device(values, dtype, device) -> torch.Tensor:
    """torch.tensor(values) on `device` without a host sync: `torch.tensor(..., device="cuda")` copies with a
    blocking copy that waits for every queued kernel, so the host could never run ahead of a launch-bound GPU.
    A non-blocking copy from pageable memory is staged by the driver at once, so `values` may go away."""
    out = torch.tensor(values, dtype=dtype)
    return out if torch.device(device).type == "cpu" else out.to(device, non_blocking=True)
