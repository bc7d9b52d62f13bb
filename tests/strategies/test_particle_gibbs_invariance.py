"""Particle Gibbs through the strategy layer leaves the exact posterior invariant.

On a tiny simulated tree the EveryStep target is enumerable:
γ(x) = p(x) · Π_t odds(s_t(x))^{1/T}, with p the policy at temperature 1 and s_t
the PRM score of the prefix x_{1:t}. Draw x* ~ π, run one conditional SMC sweep of
the particle Gibbs strategy from it, draw the output ∝ weight: the output must be
distributed as π again (chi-square). A variant that weights the reference by its
final score instead of its partial score at each step must be rejected.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from scipy import stats

from itscale.core import EveryStep, Trajectory
from itscale.strategies import make_strategy
from itscale.types import StepFormat
from itscale.strategies.particle_gibbs import csmc_sweep
from itscale.testing import SimulatedTask
from itscale.types import Particle, SamplingParams, ScoreRequest, Step

pytestmark = pytest.mark.slow
TEMPERATURE = 0.7


def enumerate_paths(task, problem):
    paths = []

    def walk(prefix, logp):
        children = task.children(problem, list(prefix))
        if not children:
            paths.append((prefix, logp))
            return
        for text, prob, _ in children:
            walk(prefix + (text,), logp + math.log(prob))

    walk((), 0.0)
    return paths


def exact_posterior(task, problem, prm):
    paths = enumerate_paths(task, problem)
    scored = asyncio.run(prm.score_steps([ScoreRequest(problem, p) for p, _ in paths]))
    log_gamma = []
    for (path, logp), s in zip(paths, scored):
        odds = sum(math.log(x) - math.log1p(-x) for x in s.scores)
        log_gamma.append(logp + odds / TEMPERATURE)
    g = np.exp(np.array(log_gamma) - max(log_gamma))
    return [p for p, _ in paths], g / g.sum()


def reference(problem, texts, fmt):
    states = [Particle(problem)]
    for i, t in enumerate(texts):
        step = Step(t, finish_reason="eos" if i == len(texts) - 1 else "stop")
        states.append(states[-1].extend(step, fmt.is_final(step, i + 1)))
    return Trajectory(tuple(states), tuple(s.finished for s in states), np.zeros(len(states)))


class FinalScoreReference:
    """The known bug: weight the reference by its *final* score at every step."""

    def __init__(self, inner, ref):
        self.inner, self.ref = inner, ref

    async def increments(self, states, finished, carry):
        ref_ids = {id(s) for s in self.ref.states}
        states = [self.ref.final if id(s) in ref_ids else s for s in states]
        return await self.inner.increments(states, finished, carry)


def kernel_histogram(n_particles, runs, seed, broken=False):
    # depth 3, branching 2: 8 paths; this tree's posterior is spread enough for the bug to show
    task = SimulatedTask(n_problems=1, seed=7, depth=(3, 3), branching=2, p_correct=0.6)
    problem = task.problems[0]
    prm = task.prm(noise=1.0, seed=2, sharpness=0.5)
    fmt = StepFormat(max_steps=8)
    pg = make_strategy("particle_gibbs", task.policy(), prm, format=fmt, sampling=SamplingParams(temperature=1.0),
                       temperature=TEMPERATURE)
    paths, probs = exact_posterior(task, problem, prm)
    index = {p: i for i, p in enumerate(paths)}
    rng = np.random.default_rng(seed)
    counts = np.zeros(len(paths))

    async def sweeps():
        ctx = pg.context(problem, rng)
        observe = EveryStep(ctx.prm_scores, temperature=TEMPERATURE)
        for i in rng.choice(len(paths), size=runs, p=probs):
            ref = reference(problem, paths[i], fmt)
            smc = await csmc_sweep(ctx, n_particles, FinalScoreReference(observe, ref) if broken else observe,
                                   "always", ref)
            out = smc.trajectory(smc.sample_index(rng)).final
            counts[index[out.step_texts]] += 1

    asyncio.run(sweeps())
    return pooled_chisquare(counts, probs * runs)


def pooled_chisquare(observed, expected, min_expected=5.0):
    """Chi-square p-value with the categories expected fewer than 5 times pooled into one."""
    rare = expected < min_expected
    obs = np.append(observed[~rare], observed[rare].sum())
    exp = np.append(expected[~rare], expected[rare].sum())
    keep = exp > 0
    return stats.chisquare(obs[keep], exp[keep]).pvalue


@pytest.mark.parametrize("n", [2, 4])
def test_particle_gibbs_kernel_leaves_posterior_invariant(n, report_statistic):
    p = kernel_histogram(n, 4000, seed=n)
    report_statistic("correct", "chi2 p-value", p, "pass" if p > 1e-3 else "FAIL")
    assert p > 1e-3


def test_particle_gibbs_invariance_rejects_final_score_reference(report_statistic):
    p = kernel_histogram(2, 4000, seed=2, broken=True)
    report_statistic("broken", "chi2 p-value", p, "rejected" if p < 1e-3 else "NOT REJECTED")
    assert p < 1e-3
