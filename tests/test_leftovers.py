"""What a hard-killed run leaves (temporary files, partial folders) is removed by the next write in that place,
with one warning, and is never read as a result."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mechslice.atomic import atomic_write_json, remove_leftovers
from mechslice.loading import load_model
from mechslice.slicing import save_sliced, slice_model
from tests.conftest import DEAD_PID
from tests.test_slicing import CALIB, random_lm


def test_stale_temp_files_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    old_style = tmp_path / ".results.json.k3j5l2m1.tmp"  # named before temp files carried their writer's pid
    dead = tmp_path / f".results.json.{DEAD_PID}-x1y2z3w4.tmp"
    live = tmp_path / f".results.json.{os.getppid()}-a1b2c3d4.tmp"  # a running writer: its file may be in use
    other = tmp_path / ".fits.json.k3j5l2m1.tmp"  # beside another target: not this write's business
    neighbour = tmp_path / f".results.json.old.{DEAD_PID}-k3j5l2m1.tmp"  # a temp of `results.json.old`
    for path in (old_style, dead, live, other, neighbour):
        path.write_text("")
    with pytest.warns(UserWarning, match=r"removed 2 leftover\(s\) of an interrupted run"):
        atomic_write_json(target, {"records": []})
    assert json.loads(target.read_text()) == {"records": []}
    assert not old_style.exists() and not dead.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (target, live, other, neighbour)
    )
    assert remove_leftovers(tmp_path, [".results.json."], ".tmp") == []  # nothing stale is left to say


@pytest.fixture(scope="module")
def tokenizer():
    return load_model(device="cpu").tokenizer


def test_partial_folders_of_a_killed_save_are_removed_and_the_save_is_unchanged(
    tokenizer, tmp_path: Path
) -> None:
    """A save beside a killed save's `.partial-*` and `.old-*` folders removes them and writes the same files."""
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    for root in (clean, killed):
        root.mkdir()
    save_sliced(lm := random_lm(tokenizer), slice_model(lm, 0.25, CALIB, progress=False), clean / "sliced")
    partial = killed / ".sliced.partial-abc12345"  # as saves named them before they carried the pid
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 4096)  # half a weight file
    old = killed / f".sliced.old-{DEAD_PID}-abc12345"
    (old / "sliced").mkdir(parents=True)
    with pytest.warns(UserWarning, match=r"removed 2 leftover\(s\)"):
        save_sliced(
            lm := random_lm(tokenizer), slice_model(lm, 0.25, CALIB, progress=False), killed / "sliced"
        )
    assert [p.name for p in killed.iterdir()] == ["sliced"]
    sums = [
        json.loads((root / "sliced" / "slicing.json").read_text())["checksums"] for root in (clean, killed)
    ]
    assert sums[0] == sums[1] and "model.safetensors" in sums[0]
    ids = torch.arange(16)[None]
    a, b = (load_model(str(root / "sliced"), device="cpu", dtype=torch.float32) for root in (clean, killed))
    assert torch.equal(a.model(ids).logits, b.model(ids).logits)
