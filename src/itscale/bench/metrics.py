"""One row of the bench's answer: a method at a budget, over every problem and seed.

Definitions (per method × budget, over the n = problems × seeds graded records):

* ``accuracy``: mean of the per-record score; a record scores 1 when its chosen answer is
  correct, or the subsampling average in [0, 1] for the best-of-N family.
  ``ci_low``/``ci_high``: the 95% Wilson interval for that mean over n.
* ``coverage``: pass@budget. For the best-of-N family the unbiased estimator
  1 − C(N−c, b)/C(N, b) from N samples with c correct; for step-level methods, whether any
  final candidate is correct.
* ``generated_tokens``, ``prm_tokens``, ``flops``, ``wall_time``: means per problem.

The compute-optimal frontier (:func:`frontier`) is read off these rows: the best accuracy
reachable at each token cost, across methods and budgets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..stats import wilson


@dataclass(frozen=True)
class MetricRow:
    method: str           # the label shown in tables and plot legends, e.g. "particle_filtering"
    budget: int
    n: int                # graded records (problems × seeds)
    accuracy: float
    ci_low: float
    ci_high: float
    coverage: float | None
    generated_tokens: float
    prm_tokens: float
    flops: float | None
    wall_time: float      # seconds per problem
    errors: int = 0       # records whose run failed (counted as wrong)

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(records, methods: list[str] | None = None) -> list[MetricRow]:
    """One :class:`MetricRow` per (method, budget) of ``records`` (``bench.store.Record``s).

    ``methods`` gives the row order (default: first seen). A failed run scores 0 and is
    counted in ``errors``; wall time averages the records whose phase finished."""
    groups: dict[tuple[str, int], list] = {}
    for r in records:
        groups.setdefault((r.method, r.budget), []).append(r)
    order = methods or list(dict.fromkeys(r.method for r in records))
    rows = []
    for (method, budget), rs in sorted(groups.items(), key=lambda kv: (_index(order, kv[0][0]), kv[0][1])):
        n = len(rs)
        acc = sum(r.score for r in rs) / n
        lo, hi = wilson(acc, n)
        cov = [r.coverage for r in rs if r.coverage is not None]
        flops = [r.flops for r in rs if r.flops is not None]
        walls = [r.wall_time for r in rs if r.wall_time is not None]
        rows.append(MetricRow(
            method=method, budget=budget, n=n, accuracy=acc, ci_low=lo, ci_high=hi,
            coverage=sum(cov) / len(cov) if cov else None,
            generated_tokens=sum(r.generated_tokens for r in rs) / n,
            prm_tokens=sum(r.prm_tokens for r in rs) / n,
            flops=sum(flops) / len(flops) if flops else None,
            wall_time=sum(walls) / len(walls) if walls else float("nan"),
            errors=sum(r.status == "error" for r in rs)))
    return rows


def _index(order: list[str], method: str) -> int:
    return order.index(method) if method in order else len(order)


def token_cost(row: MetricRow) -> float:
    """A row's token cost per problem: tokens the policy generated plus tokens the PRM read."""
    return row.generated_tokens + row.prm_tokens


def frontier(rows) -> list[MetricRow]:
    """The compute-optimal frontier: the rows, cheapest first, each more accurate than every
    row that costs no more (:func:`token_cost`) — so the accuracy reachable at cost c is that
    of the last frontier row with cost ≤ c. Ties in cost keep the more accurate row."""
    best, out = -1.0, []
    for row in sorted(rows, key=lambda r: (token_cost(r), -r.accuracy)):
        if row.accuracy > best:
            out.append(row)
            best = row.accuracy
    return out
