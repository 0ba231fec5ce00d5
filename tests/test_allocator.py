"""Allocator defaults: importing mechslice asks torch for huge pages unless the caller decided, before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hooks.allocator import HUGE_PAGES_ENV, MMAP_THRESHOLD
from hooks.stats import BLOCK_BYTES

# The variable as a fresh process sees it once mechslice is imported.
PROBE = f"import os; import mechslice; print(os.environ.get({HUGE_PAGES_ENV!r}))"


def _probe(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != HUGE_PAGES_ENV}
    if env_value is not None:
        env[HUGE_PAGES_ENV] = env_value
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize(("given", "seen"), [(None, "1"), ("0", "0"), ("1", "1")])
def test_importing_mechslice_asks_for_huge_pages_unless_the_caller_chose(
    given: str | None, seen: str
) -> None:
    assert _probe(given) == seen


def test_moment_blocks_stay_below_the_pinned_mmap_threshold() -> None:
    # a working block at or over the threshold would be mapped and faulted in afresh for every block
    assert 0 < BLOCK_BYTES < MMAP_THRESHOLD
