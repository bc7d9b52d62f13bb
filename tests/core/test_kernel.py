"""The steppable core (``itscale.core.kernel.SMC``): stepping by hand, the genealogy's
increments, and the options search methods use (groups, tempering, retiring, frontiers,
movers, priorities). Statistical tests follow the suite's doctrine: fixed seeds, |z| < 4,
and a broken variant that must be rejected."""

from __future__ import annotations

import math

import numpy as np
import pytest

from itscale.core import SMC, EntropicAnnealing, EveryStep, best_first, drive, run_smc, run_sync
from itscale.testing import EnumerableModel

from .test_smc_driver import Recorder

Z_LIMIT = 4.0


def fk_model(seed: int = 7) -> EnumerableModel:
    return EnumerableModel.random(np.random.default_rng(seed), n_tokens=3, max_steps=3, eos=2, zero_potentials=3)


def z_hats(model, runs, n, seed, **options):
    rng = np.random.default_rng(seed)
    kernel = SMC(model.propose, EveryStep(model.prm_odds), model.max_steps, **options)
    return np.array([math.exp(run_sync(drive(kernel, [()] * n, rng)).log_z) for _ in range(runs)])


def z_score(samples, truth):
    return (samples.mean() - truth) / (samples.std(ddof=1) / math.sqrt(samples.size))


def test_stepping_by_hand_is_run_smc():
    m = fk_model()
    kernel = SMC(m.propose, EveryStep(m.prm_odds), m.max_steps, resampler="multinomial", schedule="ess:0.5")
    rng = np.random.default_rng(4)
    state = kernel.init([()] * 8)
    seen = [state.t]
    while not state.done:
        state = run_sync(kernel.step(state, rng))
        seen.append(state.t)
    by_hand = kernel.finish(state)
    driven = run_sync(run_smc([()] * 8, m.propose, EveryStep(m.prm_odds), rng=np.random.default_rng(4),
                              max_steps=m.max_steps, resampler="multinomial", schedule="ess:0.5"))
    assert by_hand.states == driven.states and by_hand.log_z == driven.log_z and by_hand.trace == driven.trace
    assert seen == list(range(len(seen))) and state.proposed > 0
    assert run_sync(kernel.step(state, rng)) is state  # a done state does not move


def test_the_old_state_is_not_changed_by_a_step():
    m = fk_model()
    kernel = SMC(m.propose, EveryStep(m.prm_odds), m.max_steps)
    s0 = kernel.init([()] * 4)
    s1 = run_sync(kernel.step(s0, np.random.default_rng(0)))
    assert s0.t == 0 and s0.states == ((),) * 4 and not s0.log_weights.any() and s1.t == 1


def test_genealogy_records_each_increment_and_the_potential_is_their_sum():
    m = fk_model()
    res = run_sync(run_smc([()] * 16, m.propose, EveryStep(m.prm_odds), rng=np.random.default_rng(1),
                           max_steps=m.max_steps, resampler="systematic"))
    for i in range(len(res.states)):
        traj = res.trajectory(i)
        path = traj.final
        direct = sum(math.log(m.step_potential(path[: t + 1])) for t in range(len(path)))
        assert traj.log_potential == pytest.approx(direct, abs=1e-9)
        assert np.count_nonzero(traj.increments[len(path) + 1:]) == 0  # nothing after finishing
    # and with no resampling the weights are exactly the recorded sums
    res = run_sync(run_smc([()] * 16, m.propose, EveryStep(m.prm_odds), rng=np.random.default_rng(1),
                           max_steps=m.max_steps, schedule="never"))
    live = res.log_weights > -np.inf
    sums = np.array([res.trajectory(i).log_potential for i in range(16)])
    np.testing.assert_allclose(sums[live], res.log_weights[live], atol=1e-12)


# -- groups ---------------------------------------------------------------------------------

def test_groups_never_mix_and_their_evidence_is_unbiased(report_statistic):
    m = fk_model()
    rng = np.random.default_rng(2)
    kernel = SMC(m.propose, EveryStep(m.prm_odds), m.max_steps, resampler="multinomial", groups=2)
    # group 0 starts at token-path (), group 1 at (1,): every final particle descends from its own group's root
    res = run_sync(drive(kernel, [(), (), (1,), (1,)], rng))
    roots = [res.trajectory(i).states[0] for i in range(4)]
    assert roots == [(), (), (1,), (1,)] and list(res.genealogy.states[-1]) == res.states
    z = z_score(z_hats(m, 20_000, 4, seed=11, resampler="multinomial", groups=2), m.evidence("fk"))
    report_statistic("correct", "z(mean Ẑ - Z), 2 groups", z, "pass" if abs(z) < Z_LIMIT else "FAIL")
    assert abs(z) < Z_LIMIT


def test_groups_evidence_test_rejects_normalising_by_the_whole_population(monkeypatch, report_statistic):
    """Broken: each group's Ẑ divided by N instead of its own size n_g."""
    monkeypatch.setattr(SMC, "group_size", lambda self, state: len(state.genealogy.states[0]))
    m = fk_model()
    z = z_score(z_hats(m, 20_000, 4, seed=11, resampler="multinomial", groups=2), m.evidence("fk"))
    report_statistic("broken", "z(mean Ẑ - Z), 2 groups", z, "rejected" if abs(z) >= Z_LIMIT else "NOT REJECTED")
    assert abs(z) >= Z_LIMIT


# -- tempering ------------------------------------------------------------------------------

def test_corrected_tempering_keeps_the_evidence_unbiased(report_statistic):
    m = fk_model()
    z = z_score(z_hats(m, 20_000, 4, seed=13, resampler="multinomial", tempering=lambda w, t: 3.0),
                m.evidence("fk"))
    report_statistic("correct", "z(mean Ẑ - Z), T=3 corrected", z, "pass" if abs(z) < Z_LIMIT else "FAIL")
    assert abs(z) < Z_LIMIT


def test_evidence_test_rejects_uncorrected_tempering(report_statistic):
    """its_hub's entropic annealing draws ∝ W^{1/T} and resets ℓ = 0: Ẑ is biased."""
    m = fk_model()
    z = z_score(z_hats(m, 20_000, 4, seed=13, resampler="multinomial", tempering=lambda w, t: 3.0,
                       correct_tempering=False), m.evidence("fk"))
    report_statistic("broken", "z(mean Ẑ - Z), T=3 uncorrected", z, "rejected" if abs(z) >= Z_LIMIT else "NOT REJECTED")
    assert abs(z) >= Z_LIMIT


def test_entropic_annealing_flattens_only_collapsed_early_weights():
    anneal = EntropicAnnealing(max_steps=10, ess_threshold=0.5, early_phase=0.5)
    collapsed = np.array([0.97, 0.01, 0.01, 0.01])
    even = np.full(4, 0.25)
    ess_fraction = 1 / (4 * np.sum(collapsed**2))
    assert anneal(collapsed, 1) == pytest.approx((1 - 0.1) / ess_fraction)
    assert anneal(even, 1) == 1.0 and anneal(collapsed, 5) == 1.0  # healthy weights; late phase
    entropy = EntropicAnnealing(max_steps=10, method="entropy")
    h = -np.sum(collapsed * np.log(collapsed)) / np.log(4)
    assert entropy(collapsed, 2) == pytest.approx(1 / (h + (1 - h) * 0.2))
    with pytest.raises(ValueError, match="method"):
        EntropicAnnealing(10, method="magic")


# -- search options ---------------------------------------------------------------------------

def test_retired_particles_leave_finished_and_the_rest_keep_moving():
    m = fk_model()
    kernel = SMC(m.propose, EveryStep(m.prm_odds, link="log"), m.max_steps, resampler="top_k", expansion=3,
                 accumulate=False, keep_weights=True, retire_finished=True)
    rng = np.random.default_rng(3)
    state = kernel.init([()] * 2)
    while not state.done:
        state = run_sync(kernel.step(state, rng))
        assert not state.finished.any() and state.size <= 2
    res = kernel.finish(state)
    assert res.retired and all(m.is_finished(r.state) for r in res.retired)
    # each retired particle's weight is its latest log-score (accumulate=False), not a running sum
    for r in res.retired:
        s = m.prm_odds([r.state])[0]
        assert r.log_weight == pytest.approx(math.log(s))


def test_best_first_moves_only_the_top_of_a_bounded_frontier():
    m = EnumerableModel.random(np.random.default_rng(5), n_tokens=3, max_steps=4)
    rec = Recorder(m.propose)
    kernel = SMC(rec, EveryStep(m.prm_odds, link="log"), max_steps=6, resampler="top_k", expansion=3,
                 movers=best_first(1), accumulate=False, keep_weights=True, frontier=20)
    rng = np.random.default_rng(0)
    state = kernel.init([()])
    state = run_sync(kernel.step(state, rng))
    for _ in range(4):
        top = state.states[int(np.argmax(np.where(state.movable, state.log_weights, -np.inf)))]
        before = list(state.states)
        state = run_sync(kernel.step(state, rng))
        assert rec.batches[-1] == [top] * 3  # the best movable node, expanded into 3 children
        assert set(before) - {top} <= set(state.states)  # the rest of the frontier waits, unchanged
        assert state.size == len(before) - 1 + 3  # below the cap nothing is dropped
    assert state.proposed == 3 * 5


def test_a_frontier_keeps_its_best_f_nodes():
    m = EnumerableModel.random(np.random.default_rng(5), n_tokens=3, max_steps=4)
    kernel = SMC(m.propose, EveryStep(m.prm_odds, link="log"), max_steps=5, resampler="top_k", expansion=3,
                 movers=best_first(1), accumulate=False, keep_weights=True, frontier=4)
    rng = np.random.default_rng(0)
    state = kernel.init([()])
    sizes = []
    while not state.done:
        previous = state
        state = run_sync(kernel.step(state, rng))
        sizes.append(state.size)
        if state.t > previous.t:
            # the kept nodes are the best 4 of (frontier − mover + children): ℓ = log-score, sorted
            assert list(state.log_weights) == sorted(state.log_weights, reverse=True)
    assert sizes[0] == 3 and max(sizes) == 4


@pytest.mark.parametrize("options, match", [
    ({"keep_weights": True}, "keep_weights is for biased selectors"),
    ({"frontier": 4}, "frontier selection keeps no copies"),
    ({"resampler": "top_k", "frontier": -1}, "frontier must be a non-negative integer"),
    ({"accumulate": False}, "accumulate=False"),
    ({"resampler": "top_k", "tempering": lambda w, t: 2.0}, "tempering wraps an unbiased resampler"),
    ({"groups": 0}, "groups must be a positive integer"),
])
def test_bad_options_are_refused(options, match):
    m = fk_model()
    with pytest.raises(ValueError, match=match):
        SMC(m.propose, EveryStep(m.prm_odds), m.max_steps, **options)


def test_groups_must_split_the_population():
    m = fk_model()
    with pytest.raises(ValueError, match="do not split into 2 equal groups"):
        SMC(m.propose, EveryStep(m.prm_odds), m.max_steps, groups=2).init([()] * 3)


def test_reference_refuses_search_options():
    m = fk_model()
    with pytest.raises(ValueError, match="cannot be combined"):
        SMC(m.propose, EveryStep(m.prm_odds), m.max_steps, groups=2, reference=m.trajectory((0, 0, 0)))
