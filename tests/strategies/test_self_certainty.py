"""Self-certainty best-of-N and Borda voting, on the embedded policy read by its own confidence PRM."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("torch")

import itscale  # noqa: E402
from itscale.bench.problems import load_problems  # noqa: E402
from itscale.strategies import make_strategy  # noqa: E402
from itscale.types import SamplingParams  # noqa: E402
from itscale.strategies.self_certainty import borda_votes  # noqa: E402
from itscale.tasks import arithmetic  # noqa: E402
from itscale.testing import SimulatedTask  # noqa: E402


SAMPLING = SamplingParams(temperature=0.8, max_step_tokens=24)


def test_borda_votes_are_rank_powers_and_ties_share():
    s = np.array([0.2, 0.9, np.nan, 0.5, 0.5])
    v = borda_votes(s, 1.0)  # N = 4 scored: ranks 0.9 → 1, 0.5/0.5 → 2,3, 0.2 → 4
    assert v.tolist() == [1.0, 4.0, 0.0, 2.5, 2.5]
    assert borda_votes(s, 0.0).tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]  # p = 0: one vote each (majority vote)
    assert borda_votes(s, 2.0)[1] == 16.0


@pytest.fixture(scope="module")
def pair():
    policy = itscale.load_policy("embedded")
    prm = itscale.load_prm("embedded", kind="confidence")
    return policy, prm


def test_argmax_picks_the_most_self_certain_sample_and_borda_at_p0_is_majority(pair):
    policy, prm = pair
    problems = load_problems("arithmetic:medium", limit=6)
    fmt = arithmetic.STEP_FORMAT
    for i, problem in enumerate(problems):
        best = make_strategy("self_certainty", policy, prm, format=fmt, sampling=SAMPLING, selection="argmax")
        ctx = best.context(problem, np.random.default_rng(i))
        particles, scores = asyncio.run(best.sample_pool(ctx, 8))
        direct = asyncio.run(ctx.prm_scores(particles))  # the confidence PRM read again
        np.testing.assert_allclose(scores, direct)
        r = best.select(ctx, 8, particles, scores)
        assert r.solution == particles[int(np.argmax(scores))].text
        borda0 = make_strategy("self_certainty", policy, prm, format=fmt, power=0.0)
        vote = make_strategy("self_consistency", policy, format=fmt)
        a = borda0.select(borda0.context(problem, np.random.default_rng(0)), 8, particles, scores)
        b = vote.select(vote.context(problem, np.random.default_rng(0)), 8, particles, None)
        assert a.answer == b.answer


def test_other_prms_are_refused():
    task = SimulatedTask(n_problems=1, seed=0)
    with pytest.raises(ValueError, match="self_certainty: the PRM must be the policy's self-certainty"):
        make_strategy("self_certainty", task.policy(), task.prm())
