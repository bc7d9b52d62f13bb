"""Beta self-consistency: the leader against all other samples, not only the runner-up."""

from __future__ import annotations

import math

import pytest

from itscale.strategies import make_strategy
from itscale.strategies.self_consistency import majority_confidence
from itscale.testing import SimulatedTask
from itscale.types import SamplingParams, StepFormat

FORMAT = StepFormat(delimiter="\n\n", max_steps=12)


def beta_tail(alpha: int, beta: int) -> float:
    """P(θ > ½) for θ ~ Beta(α, β), by numerical integration (independent of the binomial identity)."""
    steps = 200_000
    h = 0.5 / steps
    xs = [0.5 + (i + 0.5) * h for i in range(steps)]
    dens = sum(x ** (alpha - 1) * (1 - x) ** (beta - 1) for x in xs) * h
    return dens * math.gamma(alpha + beta) / (math.gamma(alpha) * math.gamma(beta))


@pytest.mark.parametrize("v, n, prior", [(3, 3, (1, 1)), (5, 10, (1, 1)), (5, 10, (2, 3)), (7, 9, (1, 1))])
def test_confidence_is_the_beta_posterior_tail(v, n, prior):
    a, b = prior
    got = majority_confidence(v + a - 1, n - v + b - 1)
    assert got == pytest.approx(beta_tail(v + a, n - v + b), abs=1e-6)


def test_split_runners_up_stop_adaptive_but_not_beta():
    task = SimulatedTask(n_problems=1, seed=0)
    adaptive = make_strategy("adaptive_self_consistency", task.policy(), format=FORMAT)
    beta = make_strategy("beta_self_consistency", task.policy(), format=FORMAT)
    ranked, n = [6, 1, 1, 1, 1], 10  # the leader has 6 of 10
    assert adaptive.confidence(ranked, n) > 0.95  # 6 against 1: 0.965
    assert beta.confidence(ranked, n) < 0.75  # 6 against 4: 0.726, far from settled
    assert beta.confidence([5, 1, 1, 1, 1, 1], 10) == pytest.approx(0.5)  # 5 of 10: no majority either way
    assert beta.confidence([2, 0, 0], 2) == adaptive.confidence([2, 0, 0], 2)  # two answers: the same test


def test_beta_self_consistency_stops_when_the_posterior_clears_the_threshold():
    task = SimulatedTask(n_problems=20, seed=3, depth=(2, 3), branching=3, p_correct=0.6)
    stopped_early = 0
    for i, p in enumerate(task.problems):
        s = make_strategy("beta_self_consistency", task.policy(), format=FORMAT,
                          sampling=SamplingParams(temperature=1.0), threshold=0.9, round_size=2)
        r = s.solve(p, 32, i)
        votes = {}
        for c in r.candidates:
            votes[c.answer] = votes.get(c.answer, 0) + 1
        n = len(r.candidates)
        lead = max(votes.values())
        conf = majority_confidence(lead, n - lead)
        assert r.extras["samples"] == n and r.extras["confidence"] == pytest.approx(conf)
        if n < 32:
            stopped_early += 1
            assert conf > 0.9
            # one round earlier it had not cleared the threshold
            assert r.extras["rounds"] == n // 2
        else:
            assert conf <= 0.9 or r.extras["rounds"] == 16
    assert stopped_early >= 10


def test_the_prior_is_validated():
    task = SimulatedTask(n_problems=1, seed=0)
    with pytest.raises(ValueError, match="beta_self_consistency.prior"):
        make_strategy("beta_self_consistency", task.policy(), prior=(0, 1))
