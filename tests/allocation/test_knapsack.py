"""The multiple-choice knapsack against brute force on random small instances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from itscale.allocation.knapsack import (
    COST_TOLERANCE,
    best_within,
    frontier,
    pareto,
    solve,
)


def brute_force(groups, capacity):
    """The best value of any one-item-per-group choice with cost ≤ capacity (None: none fits)."""
    best = None
    for choice in itertools.product(*(range(len(g)) for g in groups)):
        cost = sum(groups[g][i][0] for g, i in enumerate(choice))
        value = sum(groups[g][i][1] for g, i in enumerate(choice))
        if cost <= capacity + COST_TOLERANCE * max(1.0, abs(capacity)) and (best is None or value > best):
            best = value
    return best


def random_instance(rng):
    n_groups = int(rng.integers(1, 5))
    groups = []
    for _ in range(n_groups):
        n_items = int(rng.integers(1, 6))
        if rng.random() < 0.5:  # small integers: many ties in cost and value
            items = [(float(rng.integers(0, 6)), float(rng.integers(0, 6))) for _ in range(n_items)]
        else:
            items = [(float(rng.uniform(0, 10)), float(rng.uniform(0, 1))) for _ in range(n_items)]
        groups.append(items)
    return groups


@pytest.mark.parametrize("seed", range(4))
def test_the_solver_matches_brute_force_at_every_capacity(seed):
    rng = np.random.default_rng(seed)
    for _ in range(100):
        groups = random_instance(rng)
        front = frontier(groups)
        total_max = sum(max(c for c, _ in g) for g in groups)
        for capacity in [*rng.uniform(-1, total_max + 1, 6), 0.0, total_max]:
            expected = brute_force(groups, capacity)
            got = best_within(front, capacity)
            if expected is None:
                assert got is None
                continue
            assert got is not None and got.value == pytest.approx(expected, abs=1e-9)
            # the point is a real choice: its cost and value are those of its items, and it fits
            assert len(got.choice) == len(groups)
            assert got.cost == pytest.approx(sum(groups[g][i][0] for g, i in enumerate(got.choice)))
            assert got.value == pytest.approx(sum(groups[g][i][1] for g, i in enumerate(got.choice)))
            assert got.cost <= capacity + 1e-9 * max(1.0, abs(capacity))
            assert solve(groups, capacity) == got


def test_the_frontier_is_cheapest_first_with_strictly_increasing_values():
    rng = np.random.default_rng(7)
    for _ in range(50):
        front = frontier(random_instance(rng))
        assert [p.cost for p in front] == sorted(p.cost for p in front)
        assert all(b.value > a.value for a, b in zip(front, front[1:]))


def test_pareto_keeps_the_undominated_items_cheapest_first():
    items = [(3.0, 0.5), (1.0, 0.2), (2.0, 0.2), (1.0, 0.1), (4.0, 0.9), (5.0, 0.9)]
    assert pareto(items) == [1, 0, 4]


def test_a_group_without_items_is_an_error():
    with pytest.raises(ValueError, match="group 1 has no items"):
        frontier([[(1.0, 1.0)], []])
