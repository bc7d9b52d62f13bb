"""The HTML report in a real browser: headless Chromium renders the table and the plots.

Needs ``/usr/bin/chromium`` (Debian's package; ``make test`` installs it). Without it the
test fails, so a CI image that lost the browser cannot pass silently; set
``ITSCALE_SKIP_BROWSER=1`` to skip these tests on purpose.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from itscale.bench.plots import method_colors
from itscale.bench.report import write_report
from itscale.bench.table import sort_rows

from .test_report import color_pixel_count, missing_colors, parse, synthetic_rows

pytestmark = pytest.mark.integration

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
TIMEOUT_S = 60


def require_chromium() -> str:
    """The Chromium executable; skips on ITSCALE_SKIP_BROWSER=1, fails when there is none."""
    if os.environ.get("ITSCALE_SKIP_BROWSER") == "1":
        pytest.skip("ITSCALE_SKIP_BROWSER=1")
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("Chromium not found at /usr/bin/chromium (nor on PATH): install it with "
                "`apt-get install chromium` (make test does), or set ITSCALE_SKIP_BROWSER=1 to skip.",
                pytrace=False)


def run_chromium(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium with a fresh profile; fail with its stderr if it does not exit 0."""
    profile.mkdir(parents=True)
    command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not finish within {TIMEOUT_S} s: {' '.join(command)}", pytrace=False)
    if result.returncode != 0:
        pytest.fail(f"chromium exited {result.returncode}:\n{result.stderr[-3000:]}", pytrace=False)
    return result


def screenshot(chromium: str, report: Path, folder: Path) -> Path:
    png = folder / "screenshot.png"
    run_chromium(chromium, folder / "profile", f"--screenshot={png}", "--window-size=1400,3000",
                 report.as_uri())
    assert png.is_file(), "chromium wrote no screenshot"
    return png


def corrupt_images(document: str) -> str:
    """The report with every embedded image's base64 broken ('*' is outside the alphabet)."""
    return re.sub(r"(base64,[A-Za-z0-9+/]{64})[A-Za-z0-9+/]{8}", r"\1********", document)


def test_report_renders_in_chromium(tmp_path):
    chromium = require_chromium()
    rows = synthetic_rows()
    colors = method_colors(rows)
    report = write_report(rows, tmp_path / "report.html", config={"budgets": [1, 4, 16]},
                          environment={"python": "test"})

    # (a) the DOM after parsing: the table and the three images are where the report put them.
    dom = parse(run_chromium(chromium, tmp_path / "dom-profile", "--dump-dom", report.as_uri()).stdout)
    assert [(a["data-method"], int(a["data-budget"])) for a, _ in dom.metric_rows] == [
        (r.method, r.budget) for r in sort_rows(rows)]
    assert [cells[0] for _, cells in dom.metric_rows] == [a["data-method"] for a, _ in dom.metric_rows]
    for key in ("budget", "tokens", "frontier"):
        tag, attrs = dom.element(f"plot-{key}")
        assert tag == "img" and attrs["src"].startswith("data:image/png;base64,")

    # (b) the pixels: every method's line color shows, so the embedded PNGs decoded and drew.
    shot = screenshot(chromium, report, tmp_path / "good")
    assert missing_colors(shot, colors) == [], "plot lines missing from the screenshot"

    # The check can fail: with the base64 broken the page still renders (dark text) but no
    # method color appears anywhere.
    broken = tmp_path / "broken.html"
    broken.write_text(corrupt_images(report.read_text(encoding="utf-8")), encoding="utf-8")
    assert broken.read_text(encoding="utf-8").count("********") == 3
    broken_shot = screenshot(chromium, broken, tmp_path / "broken")
    assert color_pixel_count(broken_shot, "#222222", tolerance=0.1) > 1000, "page did not render"
    assert missing_colors(broken_shot, colors) == list(colors)
