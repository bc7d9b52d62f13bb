"""DeepConf offline and online on the simulated task, whose tokens carry top-k log-probabilities
that fall with the step's probability (``SimulatedPolicy``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from itscale.lm import confidence as conf
from itscale.strategies import make_strategy
from itscale.strategies.deepconf import trace_confidence
from itscale.tasks.answers import answer_key
from itscale.testing import SimulatedTask
from itscale.types import Capabilities, SamplingParams, StepFormat

FORMAT = StepFormat(delimiter="\n\n", max_steps=12)
SAMPLING = SamplingParams(temperature=1.0)


@pytest.fixture(scope="module")
def task():
    return SimulatedTask(n_problems=40, seed=3, depth=(2, 3), branching=3, p_correct=0.6)


def build(task, name, policy=None, **params):
    return make_strategy(name, policy or task.policy(), format=FORMAT, sampling=SAMPLING, **params)


def accuracy(task, strategy, budget):
    return np.mean([task.is_correct(p, strategy.solve(p, budget, i).solution or "") for i, p in enumerate(task.problems)])


def weighted_winner(pairs):
    totals = {}
    for particle, c in pairs:
        key = answer_key(particle.text.split("\\boxed{")[-1].split("}")[0]) if "\\boxed{" in particle.text else None
        totals[key] = totals.get(key, 0.0) + c
    totals.pop(None, None)
    return max(totals, key=totals.get)


def test_offline_keeps_the_most_confident_share_and_votes_by_confidence(task):
    for i, problem in enumerate(task.problems[:12]):
        s = build(task, "deepconf", window=4, keep=0.25)
        ctx = s.context(problem, np.random.default_rng(i))
        particles, _ = __import__("asyncio").run(s.sample_pool(ctx, 16))
        c = [trace_confidence(x, "lowest_group", 4) for x in particles]
        r = s.select(ctx, 16, particles, None)
        kept = sorted(range(16), key=lambda j: -c[j])[:4]
        assert r.extras["kept"] == 4
        assert {cand.text for cand in r.candidates} == {particles[j].text for j in kept}
        assert answer_key(r.answer) == weighted_winner([(particles[j], c[j]) for j in kept])


def test_lowest_group_confidence_is_read_from_the_tokens(task):
    s = build(task, "deepconf", window=3)
    ctx = s.context(task.problems[0], np.random.default_rng(0))
    (x,) = __import__("asyncio").run(ctx.sample_full(1))
    tops = [t for step in x.steps for t in (step.top_logprobs or ())]
    assert len(tops) == sum(step.tokens for step in x.steps) and all(len(t) == 20 for t in tops)
    c = [-sum(t) / 20 for t in tops]
    windows = [sum(c[i:i + 3]) / 3 for i in range(len(c) - 2)] or [sum(c) / len(c)]
    assert trace_confidence(x, "lowest_group", 3) == pytest.approx(min(windows))
    assert trace_confidence(x, "average", 3) == pytest.approx(sum(c) / len(c))


def test_filtering_by_confidence_beats_the_plain_vote_here(task):
    """Measured on these 40 problems at budget 16: majority vote 15%, confidence-weighted vote
    (keep=1) 27.5%, DeepConf@low (keep=0.1) 45%."""
    vote = accuracy(task, build(task, "self_consistency"), 16)
    weighted = accuracy(task, build(task, "deepconf", window=4, keep=1.0), 16)
    low = accuracy(task, build(task, "deepconf", window=4, keep=0.1), 16)
    assert weighted > vote + 0.05 and low > weighted + 0.05, (vote, weighted, low)


def test_online_threshold_stops_and_drops_unconfident_traces(task):
    stopped = 0
    for i, problem in enumerate(task.problems):
        s = build(task, "deepconf_online", window=4, warmup=8, keep=0.9, round_size=4, consensus=0.99)
        r = s.solve(problem, 24, i)
        e = r.extras
        assert 8 <= e["traces"] <= 24 and e["voters"] + e["stopped_early"] <= e["traces"]
        # every voter's lowest window is at or above the threshold (a stopped trace never votes)
        assert all(trace_confidence(c.particle, "lowest_group", 4) >= e["threshold"] - 1e-9 for c in r.candidates)
        assert all(c.particle.steps[-1].finish_reason != "low_confidence" for c in r.candidates)
        if e["traces"] < 24:
            assert e["share"] >= 0.99  # consensus reached
        stopped += e["stopped_early"]
    assert stopped > 0


def test_online_threshold_is_the_warmup_percentile(task):
    s = build(task, "deepconf_online", window=4, warmup=8, keep=0.1)
    problem = task.problems[3]
    r = s.solve(problem, 8, 0)  # budget = warm-up: no online trace
    ctx = s.context(problem, np.random.default_rng(0))
    warm = __import__("asyncio").run(ctx.sample_full(8))
    lowest = [trace_confidence(x, "lowest_group", 4) for x in warm]
    assert r.extras["threshold"] == pytest.approx(conf.online_threshold(lowest, 10))
    assert r.extras["threshold"] == pytest.approx(np.percentile(lowest, 90))
    assert r.extras["voters"] == sum(v >= r.extras["threshold"] for v in lowest)


def test_online_spends_fewer_tokens_than_offline_at_the_same_budget(task):
    online = [build(task, "deepconf_online", window=4, warmup=4, keep=0.5).solve(p, 32, i) for i, p in
              enumerate(task.problems)]
    offline = [build(task, "deepconf", window=4, keep=0.5).solve(p, 32, i) for i, p in enumerate(task.problems)]
    assert sum(r.cost.generated_tokens for r in online) < 0.7 * sum(r.cost.generated_tokens for r in offline)


class NoTop:
    def __init__(self, policy):
        self.policy = policy
        self.capabilities = Capabilities(logprobs=True)

    async def generate_steps(self, requests):
        out = await self.policy.generate_steps(requests)
        from dataclasses import replace
        return [[replace(s, top_logprobs=None) for s in steps] for steps in out]


def test_a_backend_without_top_logprobs_is_named(task):
    with pytest.raises(ValueError, match="top-k log-probabilities"):
        build(task, "deepconf", policy=NoTop(task.policy())).solve(task.problems[0], 4, 0)
    with pytest.raises(ValueError, match="top_logprobs"):
        trace_confidence(build(task, "greedy", policy=NoTop(task.policy())).solve(task.problems[0], 1, 0)
                         .candidates[0].particle, "lowest_group", 4)


@pytest.mark.parametrize("params, match", [({"keep": 0}, "deepconf.keep"), ({"top_k": 21}, "deepconf.top_k"),
                                           ({"measure": "max"}, "deepconf.measure"), ({"window": 0}, "deepconf.window")])
def test_bad_parameters_name_the_field(task, params, match):
    with pytest.raises(ValueError, match=match):
        build(task, "deepconf", **params)
    assert math.isfinite(1.0)
