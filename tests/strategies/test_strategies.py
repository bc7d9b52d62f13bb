"""Every strategy on the simulated task: semantics, call counts, errors, reproducibility."""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import pytest

from itscale.strategies import STRATEGIES, make_strategy, run_many
from itscale.types import StepFormat
from itscale.tasks.answers import answer_key, extract_answer
from itscale.testing import SimulatedTask
from itscale.types import Capabilities, SamplingParams, ScoreRequest, StepScores

FORMAT = StepFormat(delimiter="\n\n", max_steps=12)
SAMPLING = SamplingParams(temperature=1.0)


@pytest.fixture(scope="module")
def task():
    return SimulatedTask(n_problems=12, seed=3, depth=(2, 3), branching=3, p_correct=0.6)


def strategy(name, task, prm_noise=0.5, policy=None, **params):
    return make_strategy(name, policy or task.policy(), task.prm(noise=prm_noise, seed=1),
                         format=FORMAT, sampling=SAMPLING, **params)


def prm_last_scores(task, problem, texts, noise=0.5):
    prm = task.prm(noise=noise, seed=1)
    out = asyncio.run(prm.score_steps([ScoreRequest(problem, tuple(t)) for t in texts]))
    return [s.scores[-1] for s in out]


# -- registry and validation ------------------------------------------------------------

def test_every_method_of_design_5_is_registered():
    assert set(STRATEGIES) == {
        "greedy", "self_consistency", "adaptive_self_consistency", "best_of_n", "weighted_best_of_n",
        "beam_search", "dvts", "particle_filtering", "twisted_smc", "particle_gibbs", "parallel_tempering",
        # issue 18: the search methods of the seed papers
        "a_star", "early_rejection", "first_finish", "mcts", "entropic_particle_filtering",
        # issue 19: confidence and consistency
        "beta_self_consistency", "rpc", "deepconf", "deepconf_online", "self_certainty",
        # issue 19: compute-optimal allocation
        "compute_optimal",
    }


@pytest.mark.parametrize("name, params, match", [
    ("nope", {}, "unknown method 'nope'; choose one of: a_star, adaptive_self_consistency"),
    ("particle_filtering", {"temperature": -1.0}, "particle_filtering.temperature"),
    ("particle_filtering", {"temprature": 1.0}, "particle_filtering.temprature"),
    ("particle_filtering", {"resampler": "magic"}, "particle_filtering.resampler.*magic"),
    ("particle_filtering", {"schedule": "sometimes"}, "particle_filtering.schedule"),
    ("beam_search", {"beam_width": 0}, "beam_search.beam_width"),
    ("parallel_tempering", {"temperatures": (2.0, 1.0)}, "parallel_tempering.temperatures"),
    ("adaptive_self_consistency", {"threshold": 0.3}, "adaptive_self_consistency.threshold"),
])
def test_bad_parameters_name_the_field(task, name, params, match):
    with pytest.raises(ValueError, match=match):
        strategy(name, task, **params)


@pytest.mark.parametrize("name, budget, match", [
    ("particle_filtering", 0, "budget must be a positive integer"),
    ("best_of_n", -3, "budget must be a positive integer"),
    ("beam_search", 6, "not divisible by beam_width 4"),
    ("dvts", 10, "not divisible by beam_width 4"),
    ("particle_gibbs", 5, "not divisible by sweeps 2"),
])
def test_bad_budgets_are_rejected(task, name, budget, match):
    with pytest.raises(ValueError, match=match):
        strategy(name, task).solve(task.problems[0], budget, seed=0)


def test_methods_that_need_a_reward_model_say_so(task):
    with pytest.raises(ValueError, match="needs a reward model"):
        make_strategy("particle_filtering", task.policy())


def test_solve_refuses_to_run_inside_an_event_loop(task):
    s = strategy("greedy", task)

    async def inside():
        s.solve(task.problems[0], 1)

    with pytest.raises(RuntimeError, match="await strategy.run"):
        asyncio.run(inside())


# -- semantics against direct computation -------------------------------------------------

def test_greedy_is_one_temperature_zero_sample(task):
    policy = task.policy()
    r = strategy("greedy", task, policy=policy).solve(task.problems[0], 8, seed=0)
    assert policy.calls == 1 and policy.continuations == 1 and r.cost.prm_calls == 0
    # temperature 0 follows the most probable child at every node
    texts, node = [], []
    while True:
        children = task.children(task.problems[0], node)
        if not children:
            break
        best = max(children, key=lambda c: c[1])
        node.append(best[0])
        texts.append(best[0])
    assert r.solution == "".join(texts)


def test_self_consistency_is_a_majority_vote(task):
    policy = task.policy()
    r = strategy("self_consistency", task, policy=policy).solve(task.problems[1], 16, seed=4)
    assert policy.calls == 1 and policy.continuations == 16
    votes = Counter(answer_key(c.answer) for c in r.candidates)
    top = max(votes.values())
    assert votes[answer_key(r.answer)] == top
    assert all(c.weight == pytest.approx(1 / 16) for c in r.candidates)
    assert r.log_z is None and not r.exact


@pytest.mark.parametrize("name", ["best_of_n", "weighted_best_of_n"])
def test_best_of_n_family_matches_direct_computation(task, name):
    problem = task.problems[2]
    r = strategy(name, task).solve(problem, 16, seed=5)
    assert r.cost.policy_calls == 1 and r.cost.prm_calls == 1
    texts = [c.particle.step_texts for c in r.candidates]
    scores = prm_last_scores(task, problem, texts)
    assert [c.score for c in r.candidates] == pytest.approx(scores)
    if name == "best_of_n":
        assert r.solution == r.candidates[int(np.argmax(scores))].text
    else:
        totals = Counter()
        for c, s in zip(r.candidates, scores):
            totals[answer_key(c.answer)] += s
        assert answer_key(r.answer) == max(totals, key=totals.get)


def test_adaptive_self_consistency_stops_early_and_never_exceeds_budget(task):
    easy = SimulatedTask(n_problems=4, seed=1, depth=(1, 1), branching=2, p_correct=0.97)
    s = make_strategy("adaptive_self_consistency", easy.policy(), format=FORMAT, sampling=SAMPLING,
                      threshold=0.9, round_size=2)
    results = [s.solve(p, 32, seed=i) for i, p in enumerate(easy.problems)]
    assert all(r.extras["samples"] <= 32 for r in results)
    assert min(r.extras["samples"] for r in results) < 32
    hard = make_strategy("adaptive_self_consistency", task.policy(), format=FORMAT, sampling=SAMPLING)
    r = hard.solve(task.problems[0], 5, seed=0)
    assert r.extras["samples"] <= 5 and len(r.candidates) <= 5


def brute_force_beam(task, problem, n_beams, noise):
    """Beam search over the full tree: every child of every beam, top n by PRM score."""
    active, done = [()], []
    active = [()] * n_beams
    while active:
        children = [b + (c[0],) for b in active for c in task.children(problem, list(b))]
        scores = prm_last_scores(task, problem, children, noise)
        order = sorted(range(len(children)), key=lambda i: (-scores[i], i))[:n_beams]
        active = []
        for i in order:
            finished = "\\boxed{" in children[i][-1]
            (done if finished else active).append((children[i], scores[i]))
        active = [c for c, _ in active]
    return sorted(done)


@pytest.mark.parametrize("budget", [3, 6, 9])
def test_beam_search_equals_brute_force_on_a_tiny_tree(task, budget):
    problem = task.problems[3]
    s = strategy("beam_search", task, policy=task.policy(distinct=True), beam_width=3)
    r = s.solve(problem, budget, seed=0)
    got = sorted((c.particle.step_texts, c.score) for c in r.candidates)
    want = brute_force_beam(task, problem, budget // 3, 0.5)
    assert [g[0] for g in got] == [w[0] for w in want]
    assert r.solution == max(r.candidates, key=lambda c: c.score).text


def test_dvts_equals_brute_force_greedy_subtrees(task):
    problem = task.problems[4]
    s = strategy("dvts", task, policy=task.policy(distinct=True), beam_width=3)
    r = s.solve(problem, 6, seed=0)
    # each subtree expands all 3 children and keeps the best: both subtrees follow the same greedy path
    path = ()
    while not path or "\\boxed{" not in path[-1]:
        children = [path + (c[0],) for c in task.children(problem, list(path))]
        scores = prm_last_scores(task, problem, children)
        path = children[int(np.argmax(scores))]
    assert [c.particle.step_texts for c in r.candidates] == [path, path]


def test_particle_filtering_makes_one_policy_and_one_prm_call_per_step(task):
    policy = task.policy()
    r = strategy("particle_filtering", task, policy=policy).solve(task.problems[5], 16, seed=2)
    steps = len(r.ess)
    assert policy.calls == steps == r.cost.policy_calls and r.cost.prm_calls == steps
    assert all(n <= 16 for n in policy.requests_log)
    assert r.cost.generated_tokens > 0 and r.cost.flops > 0
    assert r.log_z is not None and r.exact and r.ok
    assert sum(c.weight for c in r.candidates) == pytest.approx(1.0)


def test_particle_filtering_with_a_perfect_prm_finds_correct_solutions(task):
    pf = strategy("particle_filtering", task, prm_noise=0.0)
    hits = [task.is_correct(p, pf.solve(p, 4, seed=i).solution) for i, p in enumerate(task.problems)]
    base = np.mean([task.accuracy(p) for p in task.problems])
    assert np.mean(hits) >= 0.9 > base


@pytest.mark.parametrize("name, params", [
    ("particle_filtering", {"schedule": "ess:0.5", "selection": "vote"}),
    ("twisted_smc", {}),
    ("particle_gibbs", {"sweeps": 2}),
    ("parallel_tempering", {"temperatures": (1.0, 2.0), "rounds": 2}),
    ("beam_search", {"beam_width": 2}),
    ("dvts", {"beam_width": 2}),
    ("self_consistency", {}),
    ("best_of_n", {"aggregation": "min"}),
])
def test_results_are_reproducible_from_a_seed(task, name, params):
    s = strategy(name, task, **params)
    a, b = (s.solve(task.problems[6], 8, seed=11) for _ in range(2))
    assert a.solution == b.solution and a.cost.generated_tokens == b.cost.generated_tokens
    assert [c.text for c in a.candidates] == [c.text for c in b.candidates]
    others = {s.solve(task.problems[6], 8, seed=k).cost.generated_tokens for k in range(12, 16)}
    assert len(others | {a.cost.generated_tokens}) > 1


def test_twisted_smc_with_a_verifier_targets_correct_solutions(task):
    s = make_strategy("twisted_smc", task.policy(), task.prm(noise=0.5, seed=1), outcome=task.verifier(),
                      format=FORMAT, sampling=SAMPLING, beta=5.0)
    r = s.solve(task.problems[7], 16, seed=0)
    correct_mass = sum(c.weight for c in r.candidates if task.is_correct(task.problems[7], c.text))
    assert r.ok and correct_mass > 0.9


def test_parallel_tempering_reports_swaps(task):
    r = strategy("parallel_tempering", task, temperatures=(1.0, 3.0, 9.0), rounds=3).solve(task.problems[8], 18, seed=1)
    assert r.ok and r.extras["swaps_proposed"] == 2  # after rounds 1 and 2: pair (0,1), then (1,2)
    assert 0 <= r.extras["swaps_accepted"] <= 2


class ZeroPRM:
    """Scores every step NaN: each particle loses its weight (no backend failure)."""

    capabilities = Capabilities()

    async def score_steps(self, requests):
        return [StepScores(tuple(float("nan") for _ in r.steps), 0) for r in requests]


def test_failed_backend_calls_kill_particles_not_the_run(task):
    policy = task.policy(fail_rate=0.3)
    r = strategy("particle_filtering", task, policy=policy).solve(task.problems[9], 16, seed=0)
    assert r.ok and r.answer is not None
    doomed = make_strategy("particle_filtering", task.policy(fail_rate=1.0), task.prm(), format=FORMAT)
    dead = doomed.solve(task.problems[9], 4, seed=0)
    # a backend that fails every call is an error carrying its reason, not a wrong answer
    assert dead.status == "error" and dead.answer is None and "simulated failure" in dead.message
    # particles that die for want of weight (no backend failure) are still all_dead
    none_right = make_strategy("particle_filtering", task.policy(), ZeroPRM(), format=FORMAT)
    assert none_right.solve(task.problems[9], 4, seed=0).status == "all_dead"


# -- population batching -------------------------------------------------------------------

def test_concurrent_problems_share_each_round_of_backend_calls(task, report_statistic):
    policy, prm = task.policy(), task.prm(noise=0.5, seed=1)
    pf = make_strategy("particle_filtering", policy, prm, format=FORMAT, sampling=SAMPLING)
    problems = task.problems[:8]
    results = asyncio.run(run_many(pf, problems, budget=16, seed=0))
    steps = max(len(r.ess) for r in results)
    report_statistic("8x16 PF", "policy calls", policy.calls, f"max steps {steps}")
    report_statistic("8x16 PF", "prm calls", prm.calls, f"unbatched would be {sum(len(r.ess) for r in results)}")
    assert all(r.ok for r in results)
    assert policy.calls <= steps + 1 and prm.calls <= steps + 1
    assert max(policy.requests_log) > 16  # requests of several problems in one call
    # the same problem gives the same result alone and in a batch (per-problem seeds)
    alone = asyncio.run(run_many(pf, problems[:1], budget=16, seed=0))[0]
    assert alone.solution == results[0].solution


def test_one_failing_problem_does_not_end_the_batch(task):
    """A backend that answers one problem's requests wrongly fails that problem only."""
    inner = task.policy()

    class Malformed:
        capabilities = inner.capabilities

        async def generate_steps(self, requests):
            out = await inner.generate_steps(requests)
            return [o[:-1] if r.problem.id == task.problems[0].id else o for r, o in zip(requests, out)]

    s = make_strategy("best_of_n", Malformed(), task.prm(), format=FORMAT)
    results = asyncio.run(run_many(s, task.problems[:3], budget=4, seed=0))
    assert results[0].status == "error" and "different number of continuations" in results[0].message
    assert all(r.ok for r in results[1:])


def test_answers_are_extracted_from_solutions(task):
    r = strategy("self_consistency", task).solve(task.problems[0], 4, seed=0)
    assert all(c.answer == extract_answer(c.text) for c in r.candidates)


class KCounter:
    """Wraps a policy and records the continuations asked for in each call."""

    def __init__(self, inner):
        self.inner, self.capabilities, self.per_call, self.tokens = inner, inner.capabilities, [], 0

    async def generate_steps(self, requests):
        self.per_call.append(sum(r.k for r in requests))
        out = await self.inner.generate_steps(requests)
        self.tokens += sum(s.tokens for steps in out for s in steps)
        return out


@pytest.mark.parametrize("name, params", [
    ("greedy", {}),
    ("self_consistency", {}),
    ("best_of_n", {}),
    ("weighted_best_of_n", {}),
    ("adaptive_self_consistency", {"round_size": 4}),
    ("beam_search", {"beam_width": 4}),
    ("dvts", {"beam_width": 4}),
    ("particle_filtering", {}),
    ("twisted_smc", {}),
    ("particle_gibbs", {"sweeps": 2}),
    ("parallel_tempering", {"temperatures": (1.0, 2.0), "rounds": 2}),
])
def test_budget_bounds_every_round_and_cost_counts_every_call(task, name, params):
    """No round generates more continuations than its share of the budget, and Cost
    counts every policy call and every generated token."""
    budget = 8
    policy = KCounter(task.policy())
    r = strategy(name, task, policy=policy, **params).solve(task.problems[10], budget, seed=3)
    assert r.ok and r.cost.policy_calls == len(policy.per_call)
    assert r.cost.generated_tokens == policy.tokens > 0
    per_round_cap = {"particle_gibbs": budget // 2, "parallel_tempering": budget // 4, "greedy": 1}.get(name, budget)
    assert max(policy.per_call) <= per_round_cap
    if name in ("self_consistency", "best_of_n", "weighted_best_of_n"):
        assert policy.per_call == [budget] and len(r.candidates) == budget
    if name == "adaptive_self_consistency":
        assert sum(policy.per_call) == r.extras["samples"] <= budget


def test_particle_filtering_answers_with_the_heaviest_solution_not_the_heaviest_copy():
    """π̂(x) = Σ_i W_i·1[x_i = x]: three copies of one solution (weight 0.2 each) outweigh a
    single particle of weight 0.4, though each copy alone weighs less."""
    from itscale.strategies.particle_filtering import merge_copies
    from itscale.types import Particle, Problem, Step

    problem = Problem("p", "Start at 1. Apply in order: +1.")
    a = Particle(problem).extend(Step("Answer: 2"), True)
    b = Particle(problem).extend(Step("Answer: 3"), True)
    particles, weights = merge_copies([a, b, a, None, a], [0.2, 0.4, 0.2, 0.0, 0.2])
    assert [p.text for p in particles] == [a.text, b.text] and weights == pytest.approx([0.6, 0.4])
    from itscale.strategies.base import candidates, choose

    rng = np.random.default_rng(0)
    assert choose(candidates(particles, weights), "argmax", str, rng).text == a.text
    # the broken variant (copies compared one by one) picks the single heavier particle
    assert choose(candidates([a, b, a, a], [0.2, 0.4, 0.2, 0.2]), "argmax", str, rng).text == b.text
