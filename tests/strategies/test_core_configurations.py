"""Beam search, DVTS, the best-of-N family and parallel tempering are configurations of the
core now; on the same seeds they give exactly what their own loops gave before
(``legacy.py`` keeps those loops), and parallel tempering no longer re-scores its
references."""

from __future__ import annotations

import numpy as np
import pytest

from itscale.strategies import make_strategy
from itscale.testing import SimulatedTask
from itscale.types import SamplingParams, StepFormat

from . import legacy

FORMAT = StepFormat(delimiter="\n\n", max_steps=12)
SAMPLING = SamplingParams(temperature=1.0)


@pytest.fixture(scope="module")
def task():
    return SimulatedTask(n_problems=8, seed=3, depth=(2, 3), branching=3, p_correct=0.6)


def build(task, method, **params):
    policy, prm = task.policy(), task.prm(noise=0.5, seed=1)
    if isinstance(method, str):
        return make_strategy(method, policy, prm, format=FORMAT, sampling=SAMPLING, **params)
    return method(policy, prm, format=FORMAT, sampling=SAMPLING, **params)


def same_run(a, b) -> bool:
    return (
        a.answer == b.answer
        and [c.text for c in a.candidates] == [c.text for c in b.candidates]
        and np.allclose([c.weight for c in a.candidates], [c.weight for c in b.candidates], rtol=1e-12)
        and a.cost.generated_tokens == b.cost.generated_tokens
        and a.cost.policy_calls == b.cost.policy_calls
    )


@pytest.mark.parametrize("name, old, budgets, params", [
    ("beam_search", legacy.BeamSearch, (4, 8, 16), {}),
    ("beam_search", legacy.BeamSearch, (6,), {"beam_width": 3}),
    ("dvts", legacy.DVTS, (4, 8, 16), {}),
    ("best_of_n", legacy.BestOfN, (1, 4, 16), {}),
    ("weighted_best_of_n", legacy.WeightedBestOfN, (1, 4, 16), {}),
])
def test_core_configuration_gives_the_old_answers(task, name, old, budgets, params):
    runs = [(p, b, seed) for p in task.problems for b in budgets for seed in range(2)]
    differ = [r for r in runs if not same_run(build(task, name, **params).solve(*r), build(task, old, **params).solve(*r))]
    assert not differ, f"{len(differ)} of {len(runs)} runs differ, e.g. {differ[0][0].id} budget {differ[0][1]}"


def test_the_comparison_can_fail(task):
    """A different width is a different search: the comparison above notices."""
    runs = [(p, 8, seed) for p in task.problems for seed in range(2)]
    assert any(not same_run(build(task, "beam_search", beam_width=2).solve(*r),
                            build(task, legacy.BeamSearch, beam_width=4).solve(*r)) for r in runs)


def test_parallel_tempering_reads_potentials_from_the_genealogy(task):
    """Same swaps, same answers, one PRM call fewer per swap round (rounds − 1 of them)."""
    for p in task.problems[:4]:
        for seed in range(2):
            new = build(task, "parallel_tempering", rounds=3).solve(p, 9, seed)
            old = build(task, legacy.ParallelTempering, rounds=3).solve(p, 9, seed)
            assert same_run(new, old) and new.extras == old.extras
            assert new.cost.prm_calls == old.cost.prm_calls - 2
