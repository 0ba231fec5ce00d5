"""The report in a real browser: headless Chromium opens a realistic sweep's page offline, every figure draws
its svg, the page logs nothing to the console, and it stays under the size limit.

Chromium comes from the system (Debian's `chromium-headless-shell`, which `make test` installs where apt-get
can); without one on PATH these tests are skipped and say so.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from analyses.report import build_report
from tests.test_report import PAGE_LIMIT, make_results, write_sweep

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
BROWSER = next((path for name in BROWSERS if (path := shutil.which(name))), None)
pytestmark = pytest.mark.skipif(
    BROWSER is None,
    reason=f"no headless Chromium on PATH (looked for {', '.join(BROWSERS)}); "
    "on Debian: apt-get install chromium-headless-shell",
)
LAYERS = 30  # SmolLM2-135M's depth and width, eight sparsities: the page a quick sweep writes
NOMINAL = (0.0, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)


def chromium(page: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """Open `page` in headless Chromium with `flags`, letting its scripts run for up to 20 s of page time."""
    argv = [str(BROWSER), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    argv += ["--virtual-time-budget=20000", "--enable-logging=stderr", "--v=0", *flags, page.as_uri()]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180, check=True)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    return build_report(
        write_sweep(folder, make_results(nominal=NOMINAL, d=576, layers=LAYERS), layers=LAYERS)
    )


def test_every_figure_renders_an_svg_without_console_messages(page: Path) -> None:
    assert page.stat().st_size < PAGE_LIMIT
    source = page.read_text(encoding="utf-8")
    run = chromium(page, "--dump-dom")
    plots = run.stdout.split('class="plotly-graph-div')[1:]
    # Plots do not nest, so each piece runs from one plot's div to the next: its svg is in that piece.
    assert len(plots) == source.count("Plotly.newPlot(") > 10
    assert all('class="main-svg"' in piece for piece in plots)
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []


def test_a_screenshot_of_the_page_is_drawn(page: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    chromium(page, "--window-size=1200,4000", f"--screenshot={shot}")
    data = shot.read_bytes()
    assert (
        data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 100_000
    )  # a blank page compresses to a few kB
