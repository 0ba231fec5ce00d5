"""Atomic file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mechslice.errors import MechsliceError


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, payload: Any) -> Path:
    """`atomic_write_text` of `payload` as strict JSON (NaN and infinities refused)."""
    return atomic_write_text(path, json.dumps(payload, indent=1, allow_nan=False) + "\n")


def atomic_write_folder(out: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Fill a hidden temporary folder beside `out` with `write(folder)`, then rename it into place.

    An interrupted write leaves only the hidden folder, never a half-written `out`; an existing `out` is
    refused unless `overwrite`, and then replaced only once the new folder is complete.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise MechsliceError(
            f"output folder '{out}' exists; pass --overwrite to replace it or choose another"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
