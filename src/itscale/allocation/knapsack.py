r"""The multiple-choice knapsack, solved exactly for every capacity at once.

Problem. Groups g = 1..G (the difficulty bins), each with items i (the options: a method at a
budget) of cost c_{g,i} ≥ 0 and value v_{g,i}; choose exactly one item per group,

    maximise  Σ_g v_{g,i_g}   subject to   Σ_g c_{g,i_g} ≤ C.

For the allocation, v_{g,i} = n_g·acc_g(i) and c_{g,i} = n_g·cost_g(i) (n_g problems in bin g),
so the objective is the number of problems answered correctly and the constraint the total
cost. Costs are real numbers (mean tokens), so a DP over an integer capacity would be an
approximation; this solver is exact.

Method. A total (c, v) *dominates* (c', v') when c ≤ c' and v ≥ v', one of them strict. The
*Pareto frontier* of a set of totals is its undominated points; sorted by cost, their values
strictly increase.

1. Per group, only the group's Pareto set P_g can be needed: replacing a dominated item by one
   that dominates it never raises the cost nor lowers the value.
2. Let F_j be the frontier of the totals over groups 1..j. Then F_j = Pareto(F_{j−1} ⊕ P_j),
   where ⊕ adds every point to every item: a dominated partial total over groups 1..j−1,
   extended by an item, is dominated by its dominator extended by the same item, so pruning
   after each merge loses nothing.
3. The optimum at capacity C is the point of F = F_G with the largest cost ≤ C (values increase
   along F), or none when even the cheapest point costs more than C.

|F_j| is at most the number of distinct value totals (with 0/1 scores, the number of problems
+ 1), so the merge costs O(Σ_j |F_{j−1}|·|P_j|·log) — milliseconds for 5 bins × 100 options.

Ties and rounding: points are sorted by (cost, −value, choice), so at equal cost the more
valuable, then the lexicographically first choice is kept; a point joins the frontier only
when its value exceeds every cheaper point's by more than ``VALUE_TOLERANCE`` (relative), so
rounding noise in the sums does not create points; a capacity is met up to
``COST_TOLERANCE`` (relative).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

VALUE_TOLERANCE = 1e-12
COST_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Point:
    """A total over the groups merged so far: its cost, value and the item chosen per group."""

    cost: float
    value: float
    choice: tuple[int, ...]


def _prune(points: list[Point]) -> list[Point]:
    points.sort(key=lambda p: (p.cost, -p.value, p.choice))
    out: list[Point] = []
    for p in points:
        if not out or p.value > out[-1].value + VALUE_TOLERANCE * max(1.0, abs(out[-1].value)):
            out.append(p)
    return out


def pareto(items: Sequence[tuple[float, float]]) -> list[int]:
    """The indices of the undominated ``(cost, value)`` items, cheapest first."""
    return [p.choice[0] for p in _prune([Point(float(c), float(v), (i,)) for i, (c, v) in enumerate(items)])]


def frontier(groups: Sequence[Sequence[tuple[float, float]]]) -> list[Point]:
    """The Pareto frontier F of one-item-per-group totals (module docstring), cheapest first.
    ``groups[g][i]`` is item i of group g as ``(cost, value)``; every group needs an item."""
    front = [Point(0.0, 0.0, ())]
    for g, items in enumerate(groups):
        if not items:
            raise ValueError(f"group {g} has no items: every group needs at least one choice")
        keep = pareto(items)
        merged = [Point(p.cost + float(items[i][0]), p.value + float(items[i][1]), p.choice + (i,))
                  for p in front for i in keep]
        front = _prune(merged)
    return front


def best_within(front: Sequence[Point], capacity: float) -> Point | None:
    """The most valuable point of a frontier with cost ≤ ``capacity`` (None: none fits)."""
    limit = capacity + COST_TOLERANCE * max(1.0, abs(capacity))
    best = None
    for p in front:  # cheapest first, values increasing
        if p.cost > limit:
            break
        best = p
    return best


def solve(groups: Sequence[Sequence[tuple[float, float]]], capacity: float) -> Point | None:
    """The optimal choice at one capacity (:func:`frontier`, then :func:`best_within`)."""
    return best_within(frontier(groups), capacity)

