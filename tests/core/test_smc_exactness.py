"""Statistical exactness of the SMC driver on enumerable models.

Every test checks the correct code against an exact answer, and runs once more
against a deliberately broken variant that it must reject. Seeds are fixed; the
thresholds (|z| < 4, p > 1e-3) leave the correct code a wide margin.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from itscale.core import (
    RESAMPLERS,
    EveryStep,
    Outcome,
    Resampler,
    Twisted,
    run_smc,
    run_sync,
)
from itscale.core import kernel as smc_module  # where the step calls conditional_ancestors
from itscale.core.resampling import multinomial, systematic
from itscale.testing import EnumerableModel, path_index

pytestmark = pytest.mark.slow

Z_LIMIT = 4.0
P_LIMIT = 1e-3


def fk_model(seed: int = 7) -> EnumerableModel:
    """3 tokens, token 2 ends a path, 3 steps, three zero potentials (dead particles)."""
    return EnumerableModel.random(np.random.default_rng(seed), n_tokens=3, max_steps=3, eos=2, zero_potentials=3)


def z_hat_samples(model, runs, n, resampler, schedule, seed, observe=None, propose=None, target="fk"):
    rng = np.random.default_rng(seed)
    observe = observe or EveryStep(model.prm_odds)
    propose = propose or model.propose
    out = np.empty(runs)
    for r in range(runs):
        res = run_sync(run_smc([()] * n, propose, observe, rng=rng, max_steps=model.max_steps,
                               resampler=resampler, schedule=schedule))
        out[r] = math.exp(res.log_z)
    return out


def z_score(samples, truth):
    return (samples.mean() - truth) / (samples.std(ddof=1) / math.sqrt(samples.size))


# -- unbiasedness of Ẑ ---------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["always", "ess:0.5"])
@pytest.mark.parametrize("scheme", sorted(RESAMPLERS))
def test_evidence_is_unbiased(scheme, schedule, report_statistic):
    model = fk_model()
    truth = model.evidence("fk")
    z_hats = z_hat_samples(model, 20_000, 4, scheme, schedule, seed=11)
    z = z_score(z_hats, truth)
    mean_log = np.mean(np.log(z_hats[z_hats > 0])) if np.all(z_hats > 0) else -np.inf
    report_statistic("correct", "z(mean Ẑ - Z)", z, "pass" if abs(z) < Z_LIMIT else "FAIL")
    assert abs(z) < Z_LIMIT, f"E[Ẑ] != Z: z = {z:.2f}"
    assert mean_log < math.log(truth), "Jensen: E[log Ẑ] must be below log Z"


def test_evidence_test_rejects_biased_resampler(report_statistic):
    """A resampler whose offspring mean is N·W² (not N·W), mislabelled unbiased."""

    def squared(weights, n, rng):
        w2 = weights**2
        return multinomial(w2 / w2.sum(), n, rng)

    broken = Resampler("squared", squared, unbiased=True)
    model = fk_model()
    z = z_score(z_hat_samples(model, 20_000, 4, broken, "always", seed=11), model.evidence("fk"))
    report_statistic("broken", "z(mean Ẑ - Z)", z, "rejected" if abs(z) >= Z_LIMIT else "NOT REJECTED")
    assert abs(z) >= Z_LIMIT


# -- zero variance with the locally optimal proposal --------------------------------

@pytest.mark.parametrize("n", [1, 4])
def test_optimal_proposal_and_twist_have_zero_variance(n, report_statistic):
    model = fk_model(seed=3)
    log_z = math.log(model.evidence("tilted"))
    observe = Twisted(reward=model.rewards, twist=model.optimal_twist())
    rng = np.random.default_rng(5)
    worst = 0.0
    for _ in range(200):
        res = run_sync(run_smc([()] * n, model.propose_optimal(), observe, rng=rng,
                               max_steps=model.max_steps, resampler="multinomial", schedule="ess:0.5"))
        worst = max(worst, abs(res.log_z - log_z), float(np.max(np.abs(res.log_weights - res.log_weights[0]))))
    report_statistic("correct", "max |log w - c|", worst, "pass" if worst < 1e-9 else "FAIL")
    assert worst < 1e-9


def test_zero_variance_test_rejects_prior_proposal(report_statistic):
    """The same twist with the model's own proposal (no correction) is not zero-variance."""
    model = fk_model(seed=3)
    log_z = math.log(model.evidence("tilted"))
    observe = Twisted(reward=model.rewards, twist=model.optimal_twist())
    rng = np.random.default_rng(5)
    res = [run_sync(run_smc([()] * 4, model.propose, observe, rng=rng, max_steps=3, resampler="multinomial"))
           for _ in range(50)]
    worst = max(abs(r.log_z - log_z) for r in res)
    report_statistic("broken", "max |log Ẑ - log Z|", worst, "rejected" if worst > 1e-9 else "NOT REJECTED")
    assert worst > 1e-6


# -- twist invariance -----------------------------------------------------------------

TWIST_SEED = 39  # every one of its 15 paths has prior mass ≥ 0.014, so each is seen often

def _twists(model):
    rng = np.random.default_rng(99)
    table = {}

    def random_twist(states):
        return np.array([table.setdefault(x, float(np.exp(rng.standard_normal()))) for x in states])

    return {
        "none(Outcome)": None,
        "random": random_twist,
        "optimal": model.optimal_twist(),
    }


def _tilted_posterior_check(model, observe, runs, seed):
    """Unbiased estimates of Z and of γ(x) = Z·π(x) from Ẑ·Σ_i W_i 1{x_i = x}."""
    index = path_index(model)
    rng = np.random.default_rng(seed)
    z_hats = np.empty(runs)
    gamma_hats = np.zeros((runs, len(index)))
    for r in range(runs):
        # resampling every step, so that the twist actually shapes the population
        res = run_sync(run_smc([()] * 4, model.propose, observe, rng=rng, max_steps=model.max_steps,
                               resampler="systematic", schedule="always"))
        z_hats[r] = math.exp(res.log_z)
        for x, w in zip(res.states, res.weights):
            gamma_hats[r, index[x]] += z_hats[r] * w
    truth = model.evidence("tilted")
    gamma = np.array([model.tilted_weight(x) for x in model.paths()])
    z_gamma = (gamma_hats.mean(0) - gamma) / (gamma_hats.std(0, ddof=1) / math.sqrt(runs))
    return z_score(z_hats, truth), float(np.max(np.abs(z_gamma)))


@pytest.mark.parametrize("twist_name", ["none(Outcome)", "random", "optimal"])
def test_twist_leaves_evidence_and_posterior_unchanged(twist_name, report_statistic):
    model = fk_model(seed=TWIST_SEED)
    twist = _twists(model)[twist_name]
    observe = Outcome(model.rewards) if twist is None else Twisted(model.rewards, twist)
    z, z_post = _tilted_posterior_check(model, observe, 8_000, seed=4)
    # 15 paths: Bonferroni margin for the per-path z-scores
    report_statistic("correct", "z(Ẑ)", z, "pass" if abs(z) < Z_LIMIT else "FAIL")
    report_statistic("correct", "max z(γ̂(x))", z_post, "pass" if z_post < 4.5 else "FAIL")
    assert abs(z) < Z_LIMIT
    assert z_post < 4.5


def test_twist_test_rejects_untelescoped_twist(report_statistic):
    """Adding β·log ψ_t without subtracting log ψ_{t−1} changes the target."""

    class Untelescoped(Twisted):
        async def increments(self, states, finished, carry):
            incr, new_carry = await super().increments(states, finished, carry)
            return incr + self.beta * np.asarray(carry), new_carry

    model = fk_model(seed=TWIST_SEED)
    observe = Untelescoped(model.rewards, _twists(model)["random"])
    z, z_post = _tilted_posterior_check(model, observe, 8_000, seed=4)
    worst = max(abs(z), z_post)
    report_statistic("broken", "max(|z|)", worst, "rejected" if worst >= Z_LIMIT else "NOT REJECTED")
    assert worst >= Z_LIMIT


# -- conditional SMC invariance -------------------------------------------------------

def csmc_model() -> EnumerableModel:
    """Uneven potentials (spread 2), so that a wrong conditional resampler shows."""
    return EnumerableModel.random(np.random.default_rng(13), n_tokens=3, max_steps=3, eos=2,
                                  zero_potentials=3, potential_spread=2.0)


def _csmc_chi_square(model, n, schedule, runs, seed, ancestor_sampling=False):
    """Draw x* ~ π, apply one conditional SMC kernel step, histogram the output path."""
    index = path_index(model)
    post = model.posterior("fk")
    probs = np.array([post[x] for x in model.paths()])
    rng = np.random.default_rng(seed)
    observe = EveryStep(model.prm_odds)
    hook = model.ancestor_sampling() if ancestor_sampling else None
    counts = np.zeros(len(index))
    for x_star in model.sample_posterior(rng, size=runs):
        ref = model.trajectory(x_star)
        res = run_sync(run_smc([()] * n, model.propose, observe, rng=rng, max_steps=model.max_steps,
                               resampler="multinomial", schedule=schedule, reference=ref,
                               ancestor_sampling=hook))
        out = res.trajectory(res.sample_index(rng)).final
        counts[index[out]] += 1
    keep = probs > 0
    assert counts[~keep].sum() == 0, "conditional SMC produced a path with zero posterior mass"
    return stats.chisquare(counts[keep], probs[keep] * runs).pvalue


@pytest.mark.parametrize("schedule", ["always", "ess:0.5"])
@pytest.mark.parametrize("n", [2, 3, 8])
def test_conditional_smc_leaves_posterior_invariant(n, schedule, report_statistic):
    p = _csmc_chi_square(csmc_model(), n, schedule, 6_000, seed=n)
    report_statistic("correct", "chi2 p-value", p, "pass" if p > P_LIMIT else "FAIL")
    assert p > P_LIMIT


def test_ancestor_sampling_leaves_posterior_invariant(report_statistic):
    p = _csmc_chi_square(csmc_model(), 3, "always", 6_000, seed=1, ancestor_sampling=True)
    report_statistic("correct", "chi2 p-value", p, "pass" if p > P_LIMIT else "FAIL")
    assert p > P_LIMIT


def test_invariance_test_rejects_overwrite_slot_csmc(monkeypatch, report_statistic):
    """The published bug: draw N sorted (systematic) ancestors, then overwrite the reference slot."""

    def overwrite_slot(weights, ref_slot, ref_ancestor, rng):
        ancestors = systematic(weights, weights.size, rng)
        ancestors[ref_slot] = ref_ancestor
        return ancestors

    monkeypatch.setattr(smc_module, "conditional_ancestors", overwrite_slot)
    p = _csmc_chi_square(csmc_model(), 3, "always", 6_000, seed=2)
    report_statistic("broken", "chi2 p-value", p, "rejected" if p < P_LIMIT else "NOT REJECTED")
    assert p < P_LIMIT


def test_evidence_is_unbiased_with_expansion(report_statistic):
    """k children per particle at log-weight ℓ − log k, then N of the N·k kept: E[Ẑ] = Z still."""
    model = fk_model()
    rng = np.random.default_rng(17)
    observe = EveryStep(model.prm_odds)
    z_hats = np.array([
        math.exp(run_sync(run_smc([()] * 2, model.propose, observe, rng=rng, max_steps=3,
                                  resampler="systematic", expansion=3)).log_z)
        for _ in range(10_000)
    ])
    z = z_score(z_hats, model.evidence("fk"))
    report_statistic("correct", "z(mean Ẑ - Z)", z, "pass" if abs(z) < Z_LIMIT else "FAIL")
    assert abs(z) < Z_LIMIT
