"""Atomic file writes: a reader sees the old file or the new one, never half of either.

A temporary file is named `.<name>.<pid>-<random>.tmp` beside its target. A hard kill (SIGKILL, power loss)
leaves it behind; the next write to the same target removes such leftovers of processes that are no longer
running, says so in one warning, and never reads them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mechslice.errors import MechsliceError


def _writer_alive(pid: int) -> bool:
    """Whether process `pid` (the writer named in a temporary file) still runs: its file may be in use."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_leftovers(folder: Path, prefixes: Sequence[str], suffix: str = "") -> list[str]:
    """Remove the entries `<prefix><pid>-*<suffix>` in `folder` whose writer is gone (files or folders), and
    any `<prefix>*<suffix>` without a pid (written before names carried one); warn once naming them."""
    if not folder.is_dir():
        return []
    starts = "|".join(re.escape(prefix) for prefix in prefixes)
    # tempfile's names end in 8 characters of [a-z0-9_]: anything else is another file, left alone
    pattern = re.compile(f"(?:{starts})" + r"(?:(\d+)-)?[a-z0-9_]{8}" + re.escape(suffix) + "$")
    removed = []
    for entry in sorted(folder.iterdir()):
        match = pattern.match(entry.name)
        if match is None or (match.group(1) is not None and _writer_alive(int(match.group(1)))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    if removed:
        warnings.warn(
            f"removed {len(removed)} leftover(s) of an interrupted run in '{folder}': {', '.join(removed)}",
            UserWarning,
            stacklevel=3,
        )
    return removed


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path.parent, [f".{path.name}."], ".tmp")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
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
    # what a hard-killed write left behind; never a complete folder
    remove_leftovers(out.parent, [f".{out.name}.partial-", f".{out.name}.old-"])
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
