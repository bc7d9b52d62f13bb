"""Shared pytest set-up.

Statistical tests call ``report_statistic(...)`` with what they observed (for the
correct code and for the deliberately broken variant). The values travel in the
test reports' ``user_properties`` (so they survive pytest-xdist workers) and are
printed in a table at the end of the run: CI logs show the margins, not just "passed".
"""

from __future__ import annotations

import pytest

STAT_KEY = "itscale_statistic"


@pytest.fixture
def report_statistic(request):
    def report(variant: str, statistic: str, value: float, verdict: str) -> None:
        request.node.user_properties.append((STAT_KEY, (variant, statistic, float(value), verdict)))

    return report


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = []
    for outcome in ("passed", "failed"):
        for report in terminalreporter.stats.get(outcome, []):
            if getattr(report, "when", "call") != "call":
                continue
            for key, value in getattr(report, "user_properties", []):
                if key == STAT_KEY:
                    rows.append((report.nodeid.split("::", 1)[-1], *value))
    if not rows:
        return
    terminalreporter.section("statistical tests: observed statistics")
    width = max(len(r[0]) for r in rows)
    for test, variant, statistic, value, verdict in sorted(rows):
        terminalreporter.write_line(f"{test:<{width}}  {variant:<8}  {statistic:<16} {value:>12.4g}  {verdict}")
