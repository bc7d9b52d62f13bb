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


# Keep ``--dist loadgroup`` working for the tests that share a model or a server (xdist groups
# ``vllm``, ``smollm2``): pytest-xdist 3.8 tags each worker's items with their ``xdist_group`` by
# appending ``@group`` to ``item._nodeid``; the controller then sends every test of a group to one
# worker. Since pytest 9.2 ``Item.nodeid`` is derived from ``item._id`` (a structured ``NodeId``),
# so that tag is lost and the group's tests are spread over the workers (each would start its own
# vLLM servers or load its own model). This hook re-applies the tag through ``_id`` when (and only
# when) xdist's own did not take.
@pytest.hookimpl(trylast=True)  # after xdist's own hook
def pytest_collection_modifyitems(config, items):
    if not getattr(config.option, "loadgroup", False):
        return
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # pytest < 9.2: xdist's tag works as it is
        return
    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        nodeid = item.nodeid
        if groups and nodeid.rfind("@") <= nodeid.rfind("]"):  # untagged (the test in xdist's _split_scope)
            item._id = NodeId.parse(f"{nodeid}@{'_'.join(groups)}")
