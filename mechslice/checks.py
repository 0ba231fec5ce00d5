"""Checks every command runs on its arguments before any work: devices, output locations, counts.

Each refuses bad input with a `MechsliceError` (one line, with what to do), so a command can call them before
it loads a model or calibrates and a user never waits a minute for a refusal.
"""

from __future__ import annotations

import os
from numbers import Real
from pathlib import Path

import torch

from mechslice.errors import MechsliceError

DEVICE_KINDS = ("cpu", "cuda", "mps")


def check_sparsity(value: object, what: str = "sparsity", example: str = "--sparsity 0.25") -> float:
    """A sparsity s as a float, refused outside [0, 1): at s = 1 nothing is left (NaN and non-numbers too).

    The one place the range is written; `what` names the quantity in the message, `example` shows a good value.
    """
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= value < 1.0:
        raise MechsliceError(f"{what} must lie in [0, 1), got {value}; e.g. {example}")
    return float(value)


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch device that exists on this machine: cpu, cuda[:N] with that GPU present, or mps."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise MechsliceError(
            f"unknown device '{device}'; use one of {', '.join(DEVICE_KINDS)} or cuda:N"
        ) from err
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise MechsliceError(
                f"device '{device}' asked for, but this machine has no CUDA GPU; use --device cpu"
            )
        if dev.index is not None and dev.index >= count:
            raise MechsliceError(
                f"device '{device}' does not exist: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise MechsliceError(f"device '{device}' asked for, but MPS is not available here; use --device cpu")
    elif dev.type not in DEVICE_KINDS:
        raise MechsliceError(
            f"device '{device}' is not supported; use one of {', '.join(DEVICE_KINDS)} or cuda:N"
        )
    return dev


def _nearest_existing(path: Path) -> Path:
    """`path` itself or the closest ancestor of it that exists (the folder a write would be created in)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_creatable(path: Path, flag: str) -> None:
    """The folders up to `path` exist or can be made: the nearest existing one is a writable folder."""
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise MechsliceError(f"{flag} '{path}' cannot be written: '{base}' is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise MechsliceError(f"{flag} '{path}' cannot be written: no write permission in '{base}'")


def check_output_file(path: str | Path, flag: str) -> Path:
    """A file that can be written (replacing any file there): not a folder, its folder writable or creatable."""
    path = Path(path)
    if path.is_dir():
        raise MechsliceError(f"{flag} '{path}' cannot be written: it is a folder; give a file path")
    _check_creatable(path, flag)
    return path


def check_output_dir(path: str | Path, flag: str) -> Path:
    """A folder that can be written into: an existing writable folder, or one that can be created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MechsliceError(f"{flag} '{path}' is a file, not a folder; give a folder path")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise MechsliceError(f"{flag} '{path}' cannot be written: no write permission")
    else:
        _check_creatable(path, flag)
    return path


def check_at_least(value: int | None, minimum: int, flag: str) -> None:
    """Refuse a count below `minimum` (None: the option was left at its default meaning)."""
    if value is not None and value < minimum:
        raise MechsliceError(f"{flag} {value} must be at least {minimum}")


def check_seqlen(seqlen: int, context: int, flag: str) -> None:
    """Refuse a window length below 2 tokens or beyond the model's context (positions it was never trained on)."""
    if not 2 <= seqlen <= context:
        raise MechsliceError(f"{flag} {seqlen} must lie in [2, {context}] (the model's context)")


def available_memory(device: torch.device) -> int:
    """Bytes a computation on `device` can still allocate: free GPU memory, else the OS's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
