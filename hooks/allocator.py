"""Process-wide allocator setting that keeps the peak memory of large forward passes flat on glibc."""

from __future__ import annotations

import ctypes

_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


def pin_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Make glibc serve every allocation over `nbytes` with mmap and return it to the OS on free.

    By default glibc raises its mmap threshold each time a large block is freed, so the multi-MB activations
    of a forward pass end up in the heap and fragment it, and the peak RSS grows with the number of layers run.
    Measured on SmolLM2-135M: ten fully traced layers on 4x512 tokens peak at 2.0 GB instead of 1.0 GB, and
    per-layer slicing on 16x2048 calibration tokens at 3.05 GB instead of 2.16 GB. Pinning the threshold
    (process-wide; idempotent) costs page faults on each large allocation, a few % of CPU. No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, nbytes)
