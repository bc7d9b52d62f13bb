"""Shared pytest set-up.

Statistical tests call ``report_statistic(...)`` with what they observed (for the
correct code and for the deliberately broken variant). The values travel in the
test reports' ``user_properties`` (so they survive pytest-xdist workers) and are
printed in a table at the end of the run: CI logs show the margins, not just "passed".
"""

from __future__ import annotations

import pytest

STAT_KEY = "itscale_statistic"
#: ``(what, text)`` measurements worth a line in the CI log (e.g. vLLM's start-up time).
MEASURE_KEY = "itscale_measurement"


@pytest.fixture
def report_statistic(request):
    def report(variant: str, statistic: str, value: float, verdict: str) -> None:
        request.node.user_properties.append((STAT_KEY, (variant, statistic, float(value), verdict)))

    return report


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows, measured = [], {}
    for outcome in ("passed", "failed"):
        for report in terminalreporter.stats.get(outcome, []):
            for key, value in getattr(report, "user_properties", []):
                if key == MEASURE_KEY:
                    measured.setdefault(value[0], value[1])
                if key == STAT_KEY and getattr(report, "when", "call") == "call":
                    rows.append((report.nodeid.split("::", 1)[-1], *value))
    if measured:
        terminalreporter.section("measurements")
        for what, text in sorted(measured.items()):
            terminalreporter.write_line(f"{what}: {text}")
    if not rows:
        return
    terminalreporter.section("statistical tests: observed statistics")
    width = max(len(r[0]) for r in rows)
    for test, variant, statistic, value, verdict in sorted(rows):
        terminalreporter.write_line(f"{test:<{width}}  {variant:<8}  {statistic:<16} {value:>12.4g}  {verdict}")
