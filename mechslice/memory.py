"""Peak memory of this process: the one reading every command and benchmark reports, in the unit it prints."""

from __future__ import annotations

import resource
from collections.abc import Sequence

import torch


def peak_memory_gb(devices: Sequence[torch.device | str] = ()) -> dict[str, float]:
    """Peak memory of this process in GB: host RSS under "cpu", and the allocator peak of each CUDA device."""
    peaks = {"cpu": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}  # ru_maxrss: KiB on Linux
    for device in {torch.device(d) for d in devices}:
        if device.type == "cuda":
            peaks[str(device)] = torch.cuda.max_memory_allocated(device) / 1024**3
    return peaks
