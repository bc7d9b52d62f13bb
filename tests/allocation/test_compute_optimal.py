"""The compute_optimal method on the simulated task: probe, bin, the chosen method, its cost."""

from __future__ import annotations

import numpy as np
import pytest

from itscale.allocation import AllocationPolicy, Choice, Level, save_allocation, vote
from itscale.strategies import STRATEGIES, make_strategy
from itscale.testing import SimulatedTask
from itscale.types import SamplingParams, StepFormat

from .policies import PROBE, agreement_only, choice, three_bins

FORMAT = StepFormat(delimiter="\n\n", max_steps=32)
SAMPLING = SamplingParams(temperature=1.0)
TASK = SimulatedTask(n_problems=30, seed=2, depth=(1, 8), p_correct=0.85, n_wrong_answers=20)


def strategy(allocation, prm=True, **params):
    return make_strategy("compute_optimal", TASK.policy(), TASK.prm(noise=1.0, seed=1) if prm else None,
                         format=FORMAT, sampling=SAMPLING, allocation=allocation, **params)


def test_it_probes_bins_and_runs_the_choice_of_its_level():
    policy = three_bins()
    s = strategy(policy)
    seen = set()
    for i, problem in enumerate(TASK.problems):
        result = s.solve(problem, budget=11, seed=i)  # 8 ≤ 11 < 16: the level of budget 8
        x = result.extras
        assert (result.method, result.budget, x["level"], x["bins"]) == ("compute_optimal", 11, 8, 3)
        assert x["bin"] == policy.bin_of(x["difficulty"])
        picked = policy.level(8).choices[x["bin"]]
        assert x["choice"] == {"method": picked.method, "label": picked.label, "params": {}, "budget": picked.budget}
        probe = x["probe"]
        assert probe["samples"] == 4 and len(probe["answers"]) == 4 and probe["prm_tokens"] == 0
        cost = result.cost
        if picked.is_probe:  # the probe's own vote, nothing more spent
            assert result.answer == probe["answers"][vote(probe["answers"])]
            assert len(result.candidates) == 4 and cost.generated_tokens == probe["generated_tokens"]
            assert cost.prm_tokens == 0 and cost.policy_calls == 1
        else:  # the probe's tokens plus the method's
            assert cost.generated_tokens > probe["generated_tokens"] and cost.policy_calls > 1
            assert (cost.prm_tokens > 0) == (picked.method == "particle_filtering")
        assert cost.policy_flops == pytest.approx(2 * 1_000_000 * (cost.generated_tokens + cost.prompt_tokens))
        seen.add(x["bin"])
    assert seen == {0, 1, 2}


def test_the_same_seed_gives_the_same_run_and_a_level_can_be_named():
    s = strategy(three_bins())
    a, b = (s.solve(TASK.problems[3], budget=8, seed=4) for _ in range(2))
    assert a.answer == b.answer and a.extras == b.extras and a.cost.generated_tokens == b.cost.generated_tokens
    named = strategy(three_bins(), level=16).solve(TASK.problems[3], budget=1, seed=4)
    assert named.extras["level"] == 16 and named.budget == 1


def test_a_prm_probe_reads_the_samples_with_the_prm():
    result = strategy(three_bins(score="prm")).solve(TASK.problems[0], budget=4, seed=0)
    assert result.extras["probe"]["prm_tokens"] > 0 and result.cost.prm_tokens >= result.extras["probe"]["prm_tokens"]
    assert 0.0 <= result.extras["difficulty"] <= 1.0


def test_the_policy_can_be_a_file(tmp_path):
    path = save_allocation(three_bins(), tmp_path / "allocation.json")
    assert strategy(str(path)).params.allocation == three_bins()


def test_budgets_below_every_level_are_refused_and_budgets_above_use_the_top_level():
    s = strategy(three_bins())
    assert not s.fits(3) and s.fits(4) and s.budgets_up_to(6) == [4, 5, 6]
    with pytest.raises(ValueError, match=r"budget 3 is below the smallest learnt cost level \(budget 4: 4 whole "):
        s.solve(TASK.problems[0], budget=3)
    assert s.level_for(1000).budget == 16
    assert strategy(three_bins(), level=8).fits(1)  # a named level takes any budget


@pytest.mark.parametrize("allocation, prm, params, match", [
    (three_bins(), False, {}, r"compute_optimal.allocation: the allocation policy needs a reward model \(it runs "
                              r"best_of_n, which needs one\)"),
    (three_bins(score="prm"), False, {}, r"needs a reward model \(its probe scores difficulty with the PRM"),
    (three_bins(), True, {"level": 5}, r"compute_optimal.level: .*no cost level at budget 5; the policy's levels are "
                                       r"at budgets 4, 8, 16"),
    ("/nonexistent/allocation.json", True, {}, r"compute_optimal.allocation: .*does not exist"),
])
def test_bad_settings_name_the_field(allocation, prm, params, match):
    with pytest.raises(ValueError, match=match):
        strategy(allocation, prm=prm, **params)


@pytest.mark.parametrize("bad, match", [
    (choice("nope", 4), r"levels\[0\].choices\[1\] \(budget 8, bin 1\): 'nope' is not a method a bin can run"),
    (choice("compute_optimal", 4), r"'compute_optimal' is not a method a bin can run"),
    (choice("beam_search", 6, beam_width=4), r"levels\[0\].choices\[1\] .*not divisible by beam_width 4"),
    (choice("particle_filtering", 4, temprature=1), r"particle_filtering.temprature"),
])
def test_a_choice_a_bin_cannot_run_is_refused(bad, match):
    level = Level(budget=8, cap=320.0, choices=(PROBE, bad))
    policy = AllocationPolicy(edges=(0.25,), sample_cost=40.0, levels=(level,))
    with pytest.raises(ValueError, match=match):
        strategy(policy)


def test_it_is_registered_and_needs_a_prm_only_when_its_policy_does():
    assert "compute_optimal" in STRATEGIES and not STRATEGIES["compute_optimal"].needs_prm
    assert strategy(three_bins()).uses_prm and not strategy(agreement_only(), prm=False).uses_prm
    result = strategy(agreement_only(), prm=False).solve(TASK.problems[5], budget=8, seed=1)
    assert result.ok and result.cost.prm_tokens == 0


def test_answers_follow_the_choice_statistically():
    """Over the problems, the bins run what the level says: at budget 16 every bin spends more
    than at budget 4 (the probe alone), and answers at least as well on average."""
    low, high = strategy(three_bins()), strategy(three_bins())
    cheap = [low.solve(p, budget=4, seed=i) for i, p in enumerate(TASK.problems)]
    rich = [high.solve(p, budget=16, seed=i) for i, p in enumerate(TASK.problems)]
    assert all(c.extras["choice"]["method"] == "probe" for c in cheap)
    assert np.mean([r.cost.generated_tokens for r in rich]) > np.mean([c.cost.generated_tokens for c in cheap])
    correct = lambda rs: np.mean([TASK.is_correct(r.problem, r.solution or "") for r in rs])
    assert correct(rich) >= correct(cheap)
    assert isinstance(PROBE, Choice)
