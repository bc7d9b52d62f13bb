"""Behaviour of the SMC driver: bookkeeping, failures, selectors, validation."""

from __future__ import annotations

import asyncio
import math
import warnings

import numpy as np
import pytest

from itscale.core import EveryStep, Outcome, Proposed, run_smc, run_sync
from itscale.testing import EnumerableModel


def model(seed=1, **kw):
    kw.setdefault("eos", 2)
    return EnumerableModel.random(np.random.default_rng(seed), n_tokens=3, max_steps=4, **kw)


def run(m, n=8, seed=0, propose=None, observe=None, **kw):
    kw.setdefault("max_steps", m.max_steps)
    return run_sync(run_smc([()] * n, propose or m.propose, observe or EveryStep(m.prm_odds),
                            rng=np.random.default_rng(seed), **kw))


class Recorder:
    """Wraps a proposal and remembers every batch of states it was asked to move."""

    def __init__(self, propose):
        self.propose, self.batches = propose, []

    def __call__(self, states, rng):
        self.batches.append(list(states))
        return self.propose(states, rng)


def test_finished_particles_are_never_stepped_and_keep_their_state():
    m = model()
    rec = Recorder(m.propose)
    res = run(m, n=16, propose=rec, schedule="never")
    for batch in rec.batches:
        assert not any(m.is_finished(x) for x in batch if x)
    assert all(m.is_finished(x) for x in res.states)
    assert res.finished.all()
    # genealogy agrees with the final states and paths grow one token per step until finished
    for i, x in enumerate(res.states):
        traj = res.trajectory(i)
        assert traj.final == x
        assert all(b[: len(a)] == a for a, b in zip(traj.states, traj.states[1:]))


def test_one_batched_proposal_call_per_step():
    m = model(eos=None)
    rec = Recorder(m.propose)
    res = run(m, n=32, propose=rec)
    assert len(rec.batches) == res.n_steps == m.max_steps
    assert [len(b) for b in rec.batches] == [32] * m.max_steps


def test_failed_proposal_kills_one_particle_not_the_run():
    m = model(eos=None)
    calls = []

    def flaky(states, rng):  # the first particle's first call fails
        out = m.propose(states, rng)
        calls.append(len(states))
        if len(calls) == 1:
            return Proposed([None] + list(out.states[1:]), out.finished)
        return out

    res = run(m, n=4, propose=flaky, schedule="never")
    assert res.ok and res.n_steps == m.max_steps
    assert calls == [4, 3, 3, 3]  # the dead particle is never stepped again
    assert np.isneginf(res.log_weights).tolist() == [True, False, False, False]
    assert res.trace[0].n_alive == 3 and res.states[0] == ()


def test_nan_score_kills_a_particle():
    m = model(eos=None)

    def prm(states):
        s = m.prm_odds(states)
        s[0] = np.nan
        return s

    res = run(m, n=4, observe=EveryStep(prm), schedule="never", max_steps=1)
    assert np.isneginf(res.log_weights[0]) and res.weights[0] == 0.0
    assert np.all(np.isfinite(res.log_weights[1:]))


def test_all_dead_ends_cleanly_without_nan():
    m = model(eos=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = run(m, n=5, observe=EveryStep(lambda s: np.zeros(len(s))))
    assert res.status == "all_dead" and not res.ok
    assert res.log_z == -np.inf and "died" in res.message
    assert np.all(res.weights == 0) and not np.any(np.isnan(res.weights))
    assert res.n_steps == 1
    with pytest.raises(RuntimeError, match="all_dead"):
        res.sample_index(np.random.default_rng(0))


def test_resampling_follows_the_schedule_and_records_ess():
    m = model(eos=None)
    always = run(m, schedule="always")
    never = run(m, schedule="never")
    every2 = run(m, schedule="every:2")
    # no resampling after the last step: the final weights carry the information
    assert [t.resampled for t in always.trace] == [True, True, True, False]
    assert not any(t.resampled for t in never.trace)
    assert [t.resampled for t in every2.trace] == [False, True, False, False]
    for t in never.trace:
        assert 1.0 <= t.ess <= 8.0 and t.ess_fraction == pytest.approx(t.ess / 8)
    assert math.isfinite(always.log_z) and always.exact


def test_same_seed_same_result_and_different_seed_differs():
    m = model()
    a, b, c = run(m, seed=3), run(m, seed=3), run(m, seed=4)
    assert a.states == b.states and a.log_z == b.log_z
    assert a.states != c.states or a.log_z != c.log_z


def test_biased_selector_reports_no_evidence():
    m = model()
    for name in ("top_k", "argmax", "tempered:0.5"):
        res = run(m, resampler=name)
        assert res.log_z is None and res.exact is False


def test_expansion_proposes_k_children_and_selects_back_to_n():
    m = model(eos=None)
    rec = Recorder(m.propose)
    res = run(m, n=4, propose=rec, expansion=3, resampler="systematic")
    assert [len(b) for b in rec.batches] == [12] * m.max_steps
    assert len(res.states) == 4 and all(t.population == 12 and t.resampled for t in res.trace)
    assert math.isfinite(res.log_z)


def enumerate_children(m):
    """A deterministic proposal: the j-th copy of a parent gets token j mod K."""

    def propose(states, rng):
        new, seen = [], {}
        for x in states:
            j = seen.get(x, 0)
            seen[x] = j + 1
            new.append(x + (j % m.n_tokens,))
        return Proposed(new, [m.is_finished(x) for x in new])

    return propose


@pytest.mark.parametrize("beams", [1, 2, 3])
def test_beam_search_with_top_k_equals_brute_force(beams):
    """Expansion by every token + top-k by the partial score is exactly beam search.

    The population starts as ``beams`` copies of the root, so the brute force does too.
    """
    m = model(seed=5, eos=None)

    def score(x):  # s(x_{1:t}) in (0, 1): the score of the whole partial path
        return 1.0 / (1.0 + math.exp(-sum(math.log(m.step_potential(x[: i + 1])) for i in range(len(x)))))

    res = run(m, n=beams, propose=enumerate_children(m), resampler="top_k", expansion=m.n_tokens,
              observe=EveryStep(lambda states: np.array([score(x) for x in states]), link="log"))
    pool = [()] * beams
    for _ in range(m.max_steps):
        children = [x + (tok,) for x in pool for tok in range(m.n_tokens)]
        pool = sorted(children, key=lambda x: -score(x))[:beams]
    assert sorted(res.states) == sorted(pool)


def test_async_proposal_runs_under_an_event_loop_and_run_sync_refuses_it():
    m = model()

    async def slow_propose(states, rng):
        await asyncio.sleep(0)
        return m.propose(states, rng)

    res = asyncio.run(run_smc([()] * 4, slow_propose, Outcome(m.rewards), rng=np.random.default_rng(0),
                              max_steps=m.max_steps))
    assert res.ok and res.finished.all()
    with pytest.raises(RuntimeError, match="await it from an event loop"):
        run(m, n=4, propose=slow_propose)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_steps=0), "max_steps"),
    (dict(expansion=0), "expansion"),
    (dict(resampler="nope"), "nope"),
    (dict(schedule="sometimes"), "unknown schedule"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(model(), **kwargs)


def test_reference_arguments_are_validated():
    m = model(eos=None)
    ref = m.trajectory((0, 1, 0, 1))
    with pytest.raises(ValueError, match="expansion"):
        run(m, reference=ref, expansion=2)
    with pytest.raises(ValueError, match="unbiased"):
        run(m, reference=ref, resampler="top_k")
    with pytest.raises(ValueError, match="ref_slot"):
        run(m, reference=ref, ref_slot=99)
    with pytest.raises(ValueError, match="cover the whole run"):
        run(m, reference=m.trajectory((0, 1)))


def test_conditional_smc_keeps_the_reference_in_its_slot():
    m = model(eos=None)
    path = (0, 1, 0, 1)
    rec = Recorder(m.propose)
    res = run(m, n=4, propose=rec, reference=m.trajectory(path), ref_slot=2, resampler="multinomial")
    assert all(len(b) == 3 for b in rec.batches)  # the reference is never proposed
    assert res.trajectory(2).final == path and res.genealogy.lineage(2).tolist() == [2] * 5


def test_bad_rng_and_bad_proposals_are_rejected():
    m = model()
    with pytest.raises(TypeError, match="Generator"):
        run_sync(run_smc([()], m.propose, Outcome(m.rewards), rng=np.random.RandomState(0), max_steps=2))
    with pytest.raises(ValueError, match="for 4 particles"):
        run(m, n=4, propose=lambda states, rng: Proposed(states[:1], [False]))
    with pytest.raises(TypeError, match="Proposed"):
        run(m, n=4, propose=lambda states, rng: list(states))
