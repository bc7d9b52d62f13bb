"""The SMC driver: one loop that every particle method in itscale configures.

Per step t = 1..T:

1. (optional) expand every live, unfinished particle into k children, each with
   log-weight ℓ − log k, so the total mass is unchanged;
2. propose one step for every live, unfinished particle (one batched call);
   ``log_correction`` = log p(x_t | x_{<t}) − log q(x_t | x_{<t}) when the proposal q
   is not the model p itself;
3. ℓ += log_correction + increment from the observation model;
4. if the schedule says so (always, with k > 1), accumulate
   log Ẑ += logsumexp(ℓ) − log N, draw N ancestors, and reset ℓ = 0;
5. record ESS, ancestors and flags.

At the end log Ẑ += logsumexp(ℓ) − log N. With an unbiased resampler
E[Ẑ] = Z = Σ_x p(x)·Π_t G_t(x); a biased selector (top-k, argmax, tempered)
makes ``log_z = None`` and ``exact = False``.

Finished particles stay in the population with increment 0, may be duplicated by
resampling, and never move again. The step limit T counts as finishing. A particle
whose proposal or score failed gets ℓ = −∞ (dead): never selected, never stepped.
If every particle dies the run ends with ``status="all_dead"`` and ``log_z = −∞``
(an estimate of Z that is exactly 0, which unbiasedness requires) — never NaN.

Conditional SMC: given a reference trajectory, slot ``ref_slot`` is not proposed;
it takes the reference's state at each step, is weighted by the *same* increment
formula as everyone else at that step, and keeps its lineage through
``conditional_ancestors`` (the other N−1 ancestors are i.i.d. draws from all N
weights). With an ancestor-sampling hook (PGAS) the reference's ancestor is instead
drawn ∝ W_i·exp(hook.log_weights(…)_i) at each resampling step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol, Sequence

import numpy as np

from .genealogy import Genealogy, Trajectory
from .observation import ObservationModel
from .resampling import Resampler, conditional_ancestors, get_resampler
from .schedules import Schedule, get_schedule
from .sync import resolve
from .weights import NEG_INF, as_log_weights, ess, logsumexp, normalize

STATUS_OK = "ok"
STATUS_ALL_DEAD = "all_dead"


@dataclass(frozen=True)
class Proposed:
    """What a proposal returns for the particles it was given, in order.

    ``states[i] is None`` marks a failed proposal: that particle dies.
    ``log_correction`` is log p/q per particle; ``None`` means q = p (all zeros).
    """

    states: Sequence[Any]
    finished: Sequence[bool]
    log_correction: Sequence[float] | None = None


Propose = Callable[[Sequence[Any], np.random.Generator], "Proposed | Awaitable[Proposed]"]


class AncestorSampling(Protocol):
    """Hook for particle Gibbs with ancestor sampling (PGAS).

    ``log_weights(states, reference, step)`` returns, for each candidate ancestor
    state at ``step``, log γ(x_{1:step}, x*_{step+1:T}) − log γ(x_{1:step}) up to a
    constant: the teacher-forced score of continuing that prefix with the
    reference's remaining steps. ``splice(state, reference, step)`` returns the
    reference slot's state at ``step`` given its (new) state at ``step − 1``.
    """

    def log_weights(self, states: Sequence[Any], reference: Trajectory, step: int): ...

    def splice(self, previous_state: Any, reference: Trajectory, step: int) -> Any: ...


@dataclass(frozen=True)
class StepTrace:
    step: int
    population: int  # particles weighted this step (N·k with expansion)
    n_alive: int
    n_finished: int
    ess: float  # before resampling
    ess_fraction: float
    resampled: bool
    n_unique_parents: int  # distinct ancestors kept by resampling (N if not resampled)


@dataclass(frozen=True)
class SMCResult:
    states: list  # final population
    log_weights: np.ndarray  # final unnormalised log-weights
    weights: np.ndarray  # normalised (all zero if every particle died)
    finished: np.ndarray
    log_z: float | None  # log Ẑ; None when a biased selector was used
    exact: bool  # every selection was an unbiased resampling of a valid run
    status: str  # "ok" or "all_dead"
    message: str
    trace: tuple[StepTrace, ...]
    genealogy: Genealogy

    @property
    def n_steps(self) -> int:
        return len(self.genealogy) - 1

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def trajectory(self, index: int) -> Trajectory:
        return self.genealogy.trajectory(index)

    def sample_index(self, rng: np.random.Generator) -> int:
        """One particle index drawn ∝ final weight (how particle Gibbs picks its next reference)."""
        if not self.ok:
            raise RuntimeError(f"cannot sample from a run that ended with status {self.status!r}: {self.message}")
        return int(rng.choice(len(self.weights), p=self.weights))


def _validate(n, max_steps, expansion, resampler, reference, ref_slot) -> None:
    if n < 1:
        raise ValueError("initial: need at least one particle")
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
    if not isinstance(expansion, int) or expansion < 1:
        raise ValueError(f"expansion must be a positive integer, got {expansion!r}")
    if reference is not None:
        if expansion != 1:
            raise ValueError("reference (conditional SMC) cannot be combined with expansion > 1")
        if not resampler.unbiased:
            raise ValueError(f"reference (conditional SMC) needs an unbiased resampler, got {resampler.name!r}")
        if not 0 <= ref_slot < n:
            raise ValueError(f"ref_slot must be in 0..{n - 1}, got {ref_slot!r}")
        if reference.n_steps < max_steps and not reference.finished[-1]:
            raise ValueError(
                f"reference has {reference.n_steps} steps, is unfinished, and max_steps is {max_steps}: "
                "a reference must cover the whole run"
            )


async def run_smc(
    initial: Sequence[Any],
    propose: Propose,
    observe: ObservationModel,
    *,
    rng: np.random.Generator,
    max_steps: int,
    resampler: "str | Resampler" = "systematic",
    schedule: "str | Schedule" = "always",
    expansion: int = 1,
    reference: Trajectory | None = None,
    ref_slot: int = 0,
    ancestor_sampling: AncestorSampling | None = None,
) -> SMCResult:
    """Run sequential Monte Carlo from ``initial`` (N states) for at most ``max_steps`` steps.

    ``propose(states, rng)`` moves each given state one step and returns
    :class:`Proposed`; ``observe`` is an observation model (``EveryStep``,
    ``Twisted``, ``Outcome`` or your own). ``resampler`` is a name or a
    :class:`Resampler` (unbiased scheme or biased selector); ``schedule`` a name such
    as ``"ess:0.5"`` or a schedule object. ``expansion=k`` proposes k children per
    particle and selects N of the N·k children at every step (beam-search style).
    """
    resampler = get_resampler(resampler)
    schedule = get_schedule(schedule)
    n = len(initial)
    _validate(n, max_steps, expansion, resampler, reference, ref_slot)
    if not isinstance(rng, np.random.Generator):
        raise TypeError("rng must be a numpy.random.Generator (no global random state)")

    states: list[Any] = list(initial)
    logw = np.zeros(n)
    finished = np.zeros(n, dtype=bool)
    carry = np.zeros(n)
    genealogy = Genealogy(states)
    trace: list[StepTrace] = []
    log_z = 0.0
    status, message = STATUS_OK, ""
    log_k = math.log(expansion)

    for t in range(1, max_steps + 1):
        movable = (logw > NEG_INF) & ~finished
        if not movable.any():
            break

        # 1. expansion: k children per movable particle, finished particles kept once, dead dropped
        if expansion > 1:
            copies = np.where(movable, expansion, np.where(logw > NEG_INF, 1, 0))
            parent = np.repeat(np.arange(n), copies)
            lw = logw[parent] - np.where(movable[parent], log_k, 0.0)
        else:
            parent = np.arange(n)
            lw = logw.copy()
        c_states = [states[p] for p in parent]
        c_finished = finished[parent].copy()
        c_carry = carry[parent].copy()
        stepping = np.flatnonzero(movable[parent])
        correction = np.zeros(len(parent))
        last_step = t == max_steps

        # 2. propose (the reference slot of conditional SMC is not proposed)
        ref_moves = reference is not None and movable[ref_slot]
        to_propose = stepping[stepping != ref_slot] if ref_moves else stepping
        proposed = await resolve(propose([c_states[i] for i in to_propose], rng))
        _check_proposed(proposed, len(to_propose))
        new_states = list(c_states)
        step_corr = np.zeros(len(parent))
        for j, i in enumerate(to_propose):
            new_states[i] = proposed.states[j]
        step_fin = c_finished.copy()
        step_fin[to_propose] = np.asarray(proposed.finished, dtype=bool)
        if proposed.log_correction is not None:
            step_corr[to_propose] = np.asarray(proposed.log_correction, dtype=np.float64)
        if ref_moves:
            if ancestor_sampling is not None:
                new_states[ref_slot] = ancestor_sampling.splice(c_states[ref_slot], reference, t)
            else:
                new_states[ref_slot] = reference.states[t]
            step_fin[ref_slot] = reference.finished[t]
            step_corr[ref_slot] = reference.log_correction[t]
        failed = np.array([new_states[i] is None for i in stepping], dtype=bool)
        lw[stepping[failed]] = NEG_INF
        stepping = stepping[~failed]
        if last_step:
            step_fin[stepping] = True

        # 3. weight the particles that moved
        if stepping.size:
            moved = [new_states[i] for i in stepping]
            incr, new_carry = await observe.increments(moved, step_fin[stepping], c_carry[stepping])
            incr = np.asarray(incr, dtype=np.float64)
            if incr.shape != (stepping.size,):
                raise ValueError(f"observation model returned {incr.shape} increments for {stepping.size} particles")
            lw[stepping] = as_log_weights(lw[stepping] + step_corr[stepping] + incr)
            c_carry[stepping] = new_carry
            correction[stepping] = step_corr[stepping]
            for i in stepping:
                c_states[i] = new_states[i]
            c_finished[stepping] = step_fin[stepping]

        alive_now = lw > NEG_INF
        ess_now = ess(lw)
        if not alive_now.any():
            status, message = STATUS_ALL_DEAD, f"every particle died by step {t}"
            log_z = NEG_INF
            states, logw, finished, carry = c_states, lw, c_finished, c_carry
            genealogy.record(c_states, parent, c_finished, correction)
            trace.append(StepTrace(t, len(lw), 0, int(c_finished.sum()), 0.0, 0.0, False, 0))
            break

        # 4. resample
        done = last_step or not (alive_now & ~c_finished).any()
        resample = expansion > 1 or (not done and schedule(t, ess_now / len(lw)))
        if resample:
            weights = normalize(lw)
            log_z += logsumexp(lw) - math.log(n)
            if reference is not None:
                ref_ancestor = ref_slot
                # A finished reference has no future to graft onto another prefix.
                if ancestor_sampling is not None and not done and t < reference.n_steps and not reference.finished[t]:
                    ref_ancestor = await _sample_ref_ancestor(ancestor_sampling, c_states, lw, reference, t, rng)
                chosen = conditional_ancestors(weights, ref_slot, ref_ancestor, rng)
            else:
                chosen = resampler(weights, n, rng)
            states = [c_states[a] for a in chosen]
            finished, carry, logw = c_finished[chosen], c_carry[chosen], np.zeros(n)
            ancestors = parent[chosen]
            record_corr = correction[chosen]
            unique = int(np.unique(chosen).size)
        else:
            states, finished, carry, logw = c_states, c_finished, c_carry, lw
            ancestors, record_corr, unique = parent, correction, len(lw)
        genealogy.record(states, ancestors, finished, record_corr)
        trace.append(
            StepTrace(t, len(lw), int(alive_now.sum()), int(c_finished.sum()), ess_now, ess_now / len(lw), resample, unique)
        )
        if done:
            break

    if status == STATUS_OK:
        log_z += logsumexp(logw) - math.log(n)
    exact = resampler.unbiased and status == STATUS_OK
    return SMCResult(
        states=states,
        log_weights=logw,
        weights=normalize(logw),
        finished=finished,
        log_z=log_z if resampler.unbiased else None,
        exact=exact,
        status=status,
        message=message,
        trace=tuple(trace),
        genealogy=genealogy,
    )


def _check_proposed(proposed: Any, expected: int) -> None:
    if not isinstance(proposed, Proposed):
        raise TypeError(f"propose must return a Proposed record, got {type(proposed).__name__}")
    if len(proposed.states) != expected or len(proposed.finished) != expected:
        raise ValueError(
            f"propose returned {len(proposed.states)} states and {len(proposed.finished)} finished flags "
            f"for {expected} particles"
        )
    if proposed.log_correction is not None and len(proposed.log_correction) != expected:
        raise ValueError(f"propose returned {len(proposed.log_correction)} log corrections for {expected} particles")


async def _sample_ref_ancestor(hook, states, lw, reference, step, rng) -> int:
    """PGAS: draw the reference's ancestor ∝ W_i · exp(extra_i)."""
    extra = np.asarray(await resolve(hook.log_weights(states, reference, step)), dtype=np.float64)
    if extra.shape != lw.shape:
        raise ValueError(f"ancestor_sampling.log_weights returned {extra.shape}, expected {lw.shape}")
    probs = normalize(lw + extra)
    if not probs.any():
        raise RuntimeError("ancestor sampling: no particle can continue into the reference (all weights zero)")
    return int(rng.choice(len(probs), p=probs))
