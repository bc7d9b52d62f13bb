"""Learning an allocation from per-problem outcomes, and the policy file it writes."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from itscale.allocation import (
    PROBE_OPTION,
    AllocationError,
    AllocationPolicy,
    Observations,
    Option,
    ProbeSettings,
    bin_of,
    in_train,
    learn,
    load_allocation,
    save_allocation,
)

PROBE = ProbeSettings(score="agreement", samples=4)


def observations(seed: int, n: int = 160, options: int = 5) -> Observations:
    """Problems whose difficulty predicts which options succeed: option j costs ~ 2^j samples and
    solves a problem of difficulty d with probability that grows with j and falls with d."""
    rng = np.random.default_rng(seed)
    d = rng.choice([0.0, 0.25, 0.5, 0.75], size=n)
    opts = [Option("self_consistency", "sc", 2 ** j) for j in range(options)] + [PROBE_OPTION]
    p = np.clip(1.1 - d[:, None] * (2.2 - 0.35 * np.arange(options)[None, :]), 0.02, 0.98)
    p = np.column_stack([p, p[:, min(2, options - 1)]])  # the probe's vote: as good as 4 samples
    scores = (rng.random((n, options + 1)) < p).astype(float)
    costs = np.array([10.0 * 2 ** j for j in range(options)] + [0.0])[None, :] * rng.uniform(0.8, 1.2, (n, 1))
    return Observations(tuple(f"q{i}" for i in range(n)), d, rng.uniform(35, 45, n), np.zeros(n), tuple(opts),
                        scores, costs)


@pytest.mark.parametrize("seed", range(3))
def test_on_the_training_split_no_uniform_option_that_fits_beats_the_allocation(seed):
    """Every uniform option run after the probe is one per-bin choice, so the knapsack optimum is at
    least as accurate as each that fits the cap (on the data it was learnt on)."""
    obs = observations(seed)
    result = learn(obs, probe=PROBE, bins=5, train_fraction=0.5, budgets=[4, 6, 8, 16, 32, 64])
    train = np.array([in_train(i, 0.5) for i in obs.ids])
    after_probe = obs.allocation_costs()[train]
    assert any(lv.feasible for lv in result.levels)
    for lv in result.levels:
        if not lv.feasible:
            assert after_probe.mean(axis=0).min() > lv.cap  # not even the cheapest option fits
            continue
        assert lv.train.cost <= lv.cap * (1 + 1e-9)
        for j in range(len(obs.options)):
            if after_probe[:, j].mean() <= lv.cap:
                assert lv.train.accuracy >= obs.scores[train, j].mean() - 1e-12


def test_each_level_is_the_best_per_bin_choice_by_enumeration():
    obs = observations(11, n=90, options=3)
    result = learn(obs, probe=PROBE, bins=3, train_fraction=0.6, budgets=[4, 5, 8, 12, 20])
    train = np.flatnonzero([in_train(i, 0.6) for i in obs.ids])
    bins = np.array([bin_of(d, result.edges) for d in obs.difficulty])
    costs = obs.allocation_costs()
    for lv in result.levels:
        best = -1.0
        for choice in itertools.product(range(len(obs.options)), repeat=len(result.edges) + 1):
            picked = np.array([choice[bins[p]] for p in train])
            if costs[train, picked].mean() <= lv.cap * (1 + 1e-9):
                best = max(best, obs.scores[train, picked].mean())
        if best < 0:
            assert not lv.feasible
        else:
            assert lv.feasible and lv.train.accuracy == pytest.approx(best)


def test_the_evaluation_on_the_test_split_is_what_the_choices_give_there():
    obs = observations(5)
    result = learn(obs, probe=PROBE, bins=4, train_fraction=0.5, budgets=[8, 16])
    test = np.flatnonzero([not in_train(i, 0.5) for i in obs.ids])
    bins = np.array([bin_of(d, result.edges) for d in obs.difficulty])
    for lv in result.levels:
        picked = np.array([lv.choices[bins[p]] for p in test])
        assert lv.allocation.accuracy == pytest.approx(obs.scores[test, picked].mean())
        assert lv.allocation.cost == pytest.approx(obs.allocation_costs()[test, picked].mean())
        # a uniform option pays no probe; the probe's vote costs the probe
        uniform = np.column_stack([obs.costs[:, :-1], obs.probe_generated + obs.probe_prm])[test].mean(axis=0)
        fits = [j for j in range(len(obs.options)) if uniform[j] <= lv.allocation.cost]
        best = max(fits, key=lambda j: (obs.scores[test, j].mean(), -uniform[j]))
        assert lv.uniform_test.accuracy == pytest.approx(obs.scores[test, best].mean())
        assert lv.uniform_test.cost == pytest.approx(uniform[best])
        assert lv.uniform_test.label == obs.options[best].name
        assert lv.oracle.accuracy >= lv.allocation.accuracy - 1e-12 or lv.allocation.cost > lv.cap


def test_a_level_the_probe_alone_exceeds_is_infeasible_and_left_out_of_the_policy():
    obs = observations(1)
    result = learn(obs, probe=PROBE, bins=5, train_fraction=0.5, budgets=[1, 2, 8])
    assert [lv.feasible for lv in result.levels] == [False, False, True]
    assert "no allocation fits at budget(s) 1, 2" in result.notes[-1]
    assert result.policy().budgets == [8]


def test_the_policy_file_round_trips_and_answers_budget_and_bin(tmp_path):
    obs = observations(2)
    result = learn(obs, probe=PROBE, bins=5, train_fraction=0.5, budgets=[4, 8, 16])
    policy = result.policy({"note": "test"})
    path = save_allocation(policy, tmp_path / "allocation.json")
    again = load_allocation(tmp_path)  # a folder holding allocation.json works too
    assert again == policy and again.learnt_with == {"note": "test"}
    assert again.level_for(3) is None and again.level_for(11).budget == 8 and again.level_for(99).budget == 16
    assert again.bin_of(-1.0) == 0 and again.bin_of(2.0) == again.bins - 1
    assert json.loads(path.read_text())["probe"] == {"score": "agreement", "samples": 4, "aggregation": "last"}


def _policy(**change) -> dict:
    base = {"probe": {"score": "agreement", "samples": 4}, "edges": [0.25], "sample_cost": 10.0,
            "levels": [{"budget": 4, "cap": 40.0, "choices": [
                {"method": "probe", "budget": 0}, {"method": "best_of_n", "label": "bon", "budget": 4}]}]}
    return {**base, **change}


@pytest.mark.parametrize("data, words", [
    (_policy(edges=[0.5, 0.25]), "edges: edges must be strictly increasing"),
    (_policy(edges=[0.1, 0.2]), "levels[0].choices: 2 choices for 3 bins"),
    (_policy(levels=[{"budget": 4, "cap": 1, "choices": [{"method": "probe", "budget": 2}] * 2}]),
     "levels[0].choices[0]: the probe's choice spends nothing more"),
    (_policy(sample_cost=0), "sample_cost: Input should be greater than 0"),
    (_policy(probe={"score": "vibes"}), "probe.score: Input should be 'agreement' or 'prm'"),
    (_policy(extra=1), "extra: Extra inputs are not permitted"),
])
def test_a_bad_policy_file_names_the_field(tmp_path, data, words):
    path = tmp_path / "allocation.json"
    path.write_text(json.dumps(data))
    with pytest.raises(AllocationError, match=f"^{path}: ") as err:
        load_allocation(path)
    assert words in str(err.value)


def test_a_missing_or_broken_file_says_what_to_give(tmp_path):
    with pytest.raises(AllocationError, match="does not exist; give the allocation.json"):
        load_allocation(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(AllocationError, match="not valid JSON"):
        load_allocation(tmp_path / "bad.json")
    assert isinstance(AllocationPolicy.model_validate(_policy()), AllocationPolicy)
