"""The difficulty scores, the probe on the simulated task, bins and the split."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from itscale.allocation import (
    agreement_difficulty,
    bin_of,
    in_train,
    prm_difficulty,
    quantile_edges,
    run_probe,
    vote,
)
from itscale.allocation.split import unit_hash
from itscale.strategies import RunContext
from itscale.testing import SimulatedTask
from itscale.types import SamplingParams, StepFormat

FORMAT = StepFormat(delimiter="\n\n", max_steps=32)


def test_agreement_is_one_minus_the_modal_share():
    assert agreement_difficulty(["12", "12", "12", "12"]) == 0.0
    assert agreement_difficulty(["12", "12.0", "7", None]) == 0.5  # answers grouped by answer_key
    assert agreement_difficulty(["1", "2", "3", "4"]) == 0.75
    assert agreement_difficulty([None, None]) == 1.0


def test_prm_difficulty_is_one_minus_the_mean_score_failures_counting_zero():
    assert prm_difficulty([0.9, 0.7]) == pytest.approx(0.2)
    assert prm_difficulty([1.0, math.nan]) == pytest.approx(0.5)


def test_the_vote_is_the_largest_group_then_the_higher_score_then_the_first():
    assert vote(["3", "4", "4", None]) == 1
    assert vote(["3", "4"]) == 0
    assert vote(["3", "4"], scores=[0.2, 0.9]) == 1
    assert vote([None, None]) is None


def probes(task, score, seed=0, samples=4):
    policy, prm = task.policy(), task.prm(noise=1.0, seed=1)

    async def main():
        out = []
        for i, problem in enumerate(task.problems):
            rng = np.random.default_rng([seed, i])
            ctx = RunContext(problem, policy, prm, None, FORMAT, SamplingParams(temperature=1.0), rng, "last")
            out.append(await run_probe(ctx, samples, score))
        return out

    return asyncio.run(main())


@pytest.mark.parametrize("score", ["agreement", "prm"])
def test_easy_problems_get_lower_difficulty_on_the_simulated_task(score, report_statistic):
    """Problems from 1 to 8 steps deep, p_correct 0.85 per step and 20 wrong answers, so the correct
    answer is the modal one where the policy is often right: accuracy from about 0.2 to 0.9. (On a
    task where one wrong answer dominates, agreement says little about accuracy; prm still does.)"""
    task = SimulatedTask(n_problems=100, seed=2, depth=(1, 8), p_correct=0.85, n_wrong_answers=20)
    out = probes(task, score)
    difficulty = np.array([o.difficulty for o in out])
    accuracy = np.array([task.accuracy(p) for p in task.problems])
    r = float(np.corrcoef(difficulty, accuracy)[0, 1])
    report_statistic(score, "corr(d, accuracy)", r, "< -0.3")
    assert r < -0.3
    easy = accuracy >= np.median(accuracy)
    assert difficulty[easy].mean() < difficulty[~easy].mean()
    # what the probe spent: k whole samples (and, for prm, the PRM's reading of them)
    assert all(o.generated_tokens > 0 and len(o.particles) == 4 for o in out)
    assert all((o.prm_tokens > 0) == (score == "prm") for o in out)


def test_the_probe_draws_its_samples_from_the_runs_stream():
    task = SimulatedTask(n_problems=3, seed=2)
    a, b, c = (probes(task, "agreement", seed=s) for s in (5, 5, 6))
    assert [o.answers for o in a] == [o.answers for o in b]
    assert [o.answers for o in a] != [o.answers for o in c]


def test_quantile_edges_keep_ties_together_and_balance_the_bins():
    scores = [0.0] * 10 + [0.25] * 19 + [0.5] * 27 + [0.75]
    edges = quantile_edges(scores, 5)
    assert edges == [0.0, 0.25, 0.5]
    counts = np.bincount([bin_of(s, edges) for s in scores])
    assert counts.tolist() == [10, 19, 27, 1]
    ranks = np.arange(100.0)
    edges = quantile_edges(ranks, 5)  # no ties: the empirical quintiles, 20 per bin
    assert np.bincount([bin_of(s, edges) for s in ranks]).tolist() == [20] * 5
    assert quantile_edges([1.0, 1.0], 5) == [] and quantile_edges(ranks, 1) == []


def test_the_split_is_a_hash_of_the_id():
    ids = [f"p{i}" for i in range(2000)]
    train = [i for i in ids if in_train(i, 0.3)]
    assert 0.27 < len(train) / len(ids) < 0.33
    assert train == [i for i in reversed(ids) if in_train(i, 0.3)][::-1]  # order does not matter
    assert all(0.0 <= unit_hash(i) < 1.0 for i in ids[:10])
    with pytest.raises(ValueError, match="train_fraction"):
        in_train("p", 1.0)
