"""The SMC core as an explicit state and a step function.

``kernel = SMC(propose, observe, …)`` is the configuration; ``state = kernel.init(initial)``
the population at step 0; ``state = await kernel.step(state, rng)`` moves it one step (a
new state; the old one is not changed, except that both share the append-only
genealogy); ``kernel.finish(state)`` is the :class:`~itscale.core.records.SMCResult`. A driver
that runs to the end is three lines (:func:`~itscale.core.smc.run_smc`); a method that
stops early (A*, first-finish), streams or pauses writes its own loop over ``step``.

One step t:

1. choose the movers: every live, unfinished particle, or those ``movers(state)`` picks
   (best-first search moves only the top of its frontier);
2. (optional) expand every mover into k children; with an unbiased resampler each child
   has log-weight ℓ − log k, so the total mass is unchanged;
3. propose one step for every mover (one batched call); ``log_correction`` =
   log p(x_t | x_{<t}) − log q(x_t | x_{<t}) when the proposal q is not the model p;
4. ℓ += log_correction + Δℓ, the increment of the observation model; the genealogy
   records Δℓ per particle. With ``accumulate=False`` ℓ = log_correction + Δℓ instead:
   the observation's value *is* the mover's log-priority (search methods rank partial
   solutions by their latest score, e.g. ``EveryStep(prm, link="log")`` gives ℓ = log s_t);
5. select, per group (``groups`` contiguous blocks that never mix: DVTS subtrees, or
   independent SMC runs), when the schedule says so (always with k > 1):

   - an unbiased resampler accumulates log Ẑ_g += logsumexp(ℓ_g) − log n_g, draws n_g
     ancestors and resets ℓ = 0 — or, with ``tempering``, draws them ∝ W^{1/T} and
     sets ℓ = log W_a − log W_a^{1/T}/ΣW^{1/T} (importance-corrected, still unbiased)
     or 0 (uncorrected: its_hub's entropic annealing);
   - a biased selector (top-k, argmax, tempered) keeps n_g and ``keep_weights`` says
     whether ℓ is kept (search methods whose ℓ is a priority) or reset to 0;
   - ``frontier=F`` keeps at most F of the live particles, best ℓ first, without
     copies (a bounded frontier: it starts from one root and grows as nodes expand);

6. with ``retire_finished`` the selected particles that are finished leave the
   population for ``state.retired`` (beam search's completed list), so it shrinks.

At the end log Ẑ_g += logsumexp(ℓ_g) − log n_g and log Ẑ = log mean_g Ẑ_g. With an
unbiased resampler E[Ẑ] = Z = Σ_x p(x)·Π_t G_t(x); a biased selector gives
``log_z = None`` and ``exact = False``.

Finished particles stay in the population with increment 0, may be duplicated by
resampling, and never move again. The step limit T counts as finishing. A particle
whose proposal or score failed gets ℓ = −∞ (dead): never selected, never stepped.
If every particle dies the run ends with ``status="all_dead"`` and ``log_z = −∞``.

Conditional SMC: given a reference trajectory, slot ``ref_slot`` is not proposed; it
takes the reference's state at each step, is weighted by the same increment formula
as everyone else, and keeps its lineage through ``conditional_ancestors``. With an
ancestor-sampling hook (PGAS) the reference's ancestor is instead drawn
∝ W_i·exp(hook.log_weights(…)_i) at each resampling step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

from .genealogy import Genealogy, Trajectory
from .observation import ObservationModel
from .resampling import Resampler, conditional_ancestors, get_resampler
from .schedules import Schedule, get_schedule
from .records import STATUS_ALL_DEAD, STATUS_OK, AncestorSampling, Propose, Proposed, SMCResult, StepTrace
from .sync import resolve
from .weights import NEG_INF, as_log_weights, ess, logsumexp, normalize

Movers = Callable[["SMCState"], np.ndarray]
Tempering = Callable[[np.ndarray, int], float]


@dataclass(frozen=True)
class Retired:
    """A particle that left the population finished (``retire_finished``), with its
    log-weight and the step it left at."""

    state: Any
    log_weight: float
    step: int


@dataclass(frozen=True)
class SMCState:
    """The population after step ``t`` (t = 0: the initial one).

    ``groups[i]`` is particle i's group; ``log_z[g]`` the log evidence accumulated by
    group g's selections so far; ``proposed`` counts particles proposed so far (step
    expansions, what a search budget counts); ``done`` is set when nothing can move."""

    t: int
    states: tuple
    log_weights: np.ndarray
    finished: np.ndarray
    carry: np.ndarray
    groups: np.ndarray
    log_z: np.ndarray
    genealogy: Genealogy = field(repr=False)
    trace: tuple[StepTrace, ...] = ()
    retired: tuple[Retired, ...] = ()
    proposed: int = 0
    status: str = STATUS_OK
    message: str = ""
    done: bool = False

    @property
    def size(self) -> int:
        return len(self.states)

    @property
    def movable(self) -> np.ndarray:
        """Live, unfinished particles."""
        return (self.log_weights > NEG_INF) & ~self.finished


def best_first(count: int = 1) -> Movers:
    """Movers for best-first search: the ``count`` movable particles of largest ℓ
    (lowest index on ties)."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"best_first count must be a positive integer, got {count!r}")

    def movers(state: SMCState) -> np.ndarray:
        idx = np.flatnonzero(state.movable)
        order = np.argsort(-state.log_weights[idx], kind="stable")
        return np.sort(idx[order[:count]])

    return movers


@dataclass(frozen=True)
class SMC:
    """One configuration of the core (see the module docstring for the step)."""

    propose: Propose
    observe: ObservationModel
    max_steps: int
    resampler: "str | Resampler" = "systematic"
    schedule: "str | Schedule" = "always"
    expansion: int = 1
    groups: int = 1
    movers: Movers | None = None
    retire_finished: bool = False
    accumulate: bool = True
    keep_weights: bool = False
    frontier: int = 0
    tempering: Tempering | None = None
    correct_tempering: bool = True
    reference: Trajectory | None = None
    ref_slot: int = 0
    ancestor_sampling: AncestorSampling | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "resampler", get_resampler(self.resampler))
        object.__setattr__(self, "schedule", get_schedule(self.schedule))
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, got {self.max_steps!r}")
        if not isinstance(self.expansion, int) or self.expansion < 1:
            raise ValueError(f"expansion must be a positive integer, got {self.expansion!r}")
        if not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"groups must be a positive integer, got {self.groups!r}")
        unbiased = self.resampler.unbiased
        if not self.accumulate and unbiased:
            raise ValueError("accumulate=False makes ℓ a priority, not an importance weight: use a biased selector")
        if self.keep_weights and unbiased:
            raise ValueError("keep_weights is for biased selectors: an unbiased resampler must reset ℓ to 0")
        if not isinstance(self.frontier, int) or self.frontier < 0:
            raise ValueError(f"frontier must be a non-negative integer (0: off), got {self.frontier!r}")
        if self.frontier and unbiased:
            raise ValueError("frontier selection keeps no copies, so it needs a biased selector such as 'top_k'")
        if self.tempering is not None and not unbiased:
            raise ValueError("tempering wraps an unbiased resampler; a selector has no weights to temper")
        if self.reference is not None:
            if self.expansion != 1 or self.groups != 1 or self.movers or self.retire_finished or self.tempering:
                raise ValueError("reference (conditional SMC) cannot be combined with expansion, groups, movers, "
                                 "retire_finished or tempering")
            if not unbiased:
                raise ValueError(f"reference (conditional SMC) needs an unbiased resampler, got {self.resampler.name!r}")
            if self.reference.n_steps < self.max_steps and not self.reference.finished[-1]:
                raise ValueError(
                    f"reference has {self.reference.n_steps} steps, is unfinished, and max_steps is {self.max_steps}: "
                    "a reference must cover the whole run"
                )

    # -- init ------------------------------------------------------------------------
    def init(self, initial: Sequence[Any]) -> SMCState:
        n = len(initial)
        if n < 1:
            raise ValueError("initial: need at least one particle")
        if n % self.groups:
            raise ValueError(f"initial: {n} particles do not split into {self.groups} equal groups")
        if self.reference is not None and not 0 <= self.ref_slot < n:
            raise ValueError(f"ref_slot must be in 0..{n - 1}, got {self.ref_slot!r}")
        return SMCState(
            t=0,
            states=tuple(initial),
            log_weights=np.zeros(n),
            finished=np.zeros(n, dtype=bool),
            carry=np.zeros(n),
            groups=np.repeat(np.arange(self.groups), n // self.groups),
            log_z=np.zeros(self.groups),
            genealogy=Genealogy(initial),
        )

    def group_size(self, state: SMCState) -> int:
        """n_g: how many particles a group selects (its size at step 0)."""
        return len(state.genealogy.states[0]) // self.groups

    # -- step ------------------------------------------------------------------------
    async def step(self, state: SMCState, rng: np.random.Generator) -> SMCState:
        """Move ``state`` one step; a state that is ``done`` comes back unchanged."""
        if not isinstance(rng, np.random.Generator):
            raise TypeError("rng must be a numpy.random.Generator (no global random state)")
        if state.done:
            return state
        movable = state.movable
        if self.movers is not None:
            chosen = np.zeros_like(movable)
            chosen[np.asarray(self.movers(state), dtype=np.int64)] = True
            movable &= chosen
        if not movable.any():
            return replace(state, done=True)
        t = state.t + 1
        last_step = t == self.max_steps
        logw = state.log_weights

        # 1–2. movers, expanded into k children; the others kept once, the dead dropped
        if self.expansion > 1:
            copies = np.where(movable, self.expansion, np.where(logw > NEG_INF, 1, 0))
            parent = np.repeat(np.arange(state.size), copies)
            shift = math.log(self.expansion) if self.resampler.unbiased else 0.0
            lw = logw[parent] - np.where(movable[parent], shift, 0.0)
        else:
            parent = np.arange(state.size)
            lw = logw.copy()
        c_states = [state.states[p] for p in parent]
        c_finished = state.finished[parent].copy()
        c_carry = state.carry[parent].copy()
        c_groups = state.groups[parent]
        stepping = np.flatnonzero(movable[parent])
        correction = np.zeros(len(parent))
        increments = np.zeros(len(parent))

        # 3. propose (the reference slot of conditional SMC is not proposed)
        ref = self.reference
        ref_moves = ref is not None and movable[self.ref_slot]
        to_propose = stepping[stepping != self.ref_slot] if ref_moves else stepping
        proposed = await resolve(self.propose([c_states[i] for i in to_propose], rng))
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
            if self.ancestor_sampling is not None:
                new_states[self.ref_slot] = self.ancestor_sampling.splice(c_states[self.ref_slot], ref, t)
            else:
                new_states[self.ref_slot] = ref.states[t]
            step_fin[self.ref_slot] = ref.finished[t]
            step_corr[self.ref_slot] = ref.log_correction[t]
        failed = np.array([new_states[i] is None for i in stepping], dtype=bool)
        lw[stepping[failed]] = NEG_INF
        increments[stepping[failed]] = NEG_INF
        stepping = stepping[~failed]
        if last_step:
            step_fin[stepping] = True

        # 4. weight the particles that moved
        if stepping.size:
            moved = [new_states[i] for i in stepping]
            incr, new_carry = await self.observe.increments(moved, step_fin[stepping], c_carry[stepping])
            incr = np.asarray(incr, dtype=np.float64)
            if incr.shape != (stepping.size,):
                raise ValueError(f"observation model returned {incr.shape} increments for {stepping.size} particles")
            base = lw[stepping] if self.accumulate else 0.0
            lw[stepping] = as_log_weights(base + step_corr[stepping] + incr)
            increments[stepping] = np.where(np.isnan(incr), NEG_INF, incr)
            c_carry[stepping] = new_carry
            correction[stepping] = step_corr[stepping]
            for i in stepping:
                c_states[i] = new_states[i]
            c_finished[stepping] = step_fin[stepping]
        n_proposed = state.proposed + len(to_propose)

        alive_now = lw > NEG_INF
        ess_now = ess(lw)
        if not alive_now.any():
            state.genealogy.record(c_states, parent, c_finished, correction, increments)
            trace = StepTrace(t, len(lw), 0, int(c_finished.sum()), 0.0, 0.0, False, 0)
            return replace(state, t=t, states=tuple(c_states), log_weights=lw, finished=c_finished, carry=c_carry,
                           groups=c_groups, log_z=np.full(self.groups, NEG_INF), trace=state.trace + (trace,),
                           proposed=n_proposed, status=STATUS_ALL_DEAD, message=f"every particle died by step {t}",
                           done=True)

        # 5. select, group by group
        done = last_step or not (alive_now & ~c_finished).any()
        log_z = state.log_z.copy()
        picks, new_lw, resampled_any = [], [], False
        n_g = self.group_size(state)
        for g in range(self.groups):
            members = np.flatnonzero(c_groups == g)
            if members.size == 0:
                continue
            lw_g = lw[members]
            if not (lw_g > NEG_INF).any():
                picks.append(members)
                new_lw.append(lw_g)
                continue
            if not (self.expansion > 1 or (not done and self.schedule(t, ess(lw_g) / len(lw_g)))):
                picks.append(members)
                new_lw.append(lw_g)
                continue
            resampled_any = True
            chosen, kept_lw = await self._select(state, lw_g, members, c_states, n_g, t, done, rng)
            if self.resampler.unbiased:
                log_z[g] += logsumexp(lw_g) - math.log(n_g)  # children carry ℓ − log k: mass of n_g
            picks.append(members[chosen])
            new_lw.append(kept_lw)
        index = np.concatenate(picks)
        logw_next = np.concatenate(new_lw)
        states_next = [c_states[i] for i in index]
        finished_next, carry_next, groups_next = c_finished[index], c_carry[index], c_groups[index]
        state.genealogy.record(states_next, parent[index], finished_next, correction[index], increments[index])
        unique = int(np.unique(index).size)
        trace = StepTrace(t, len(lw), int(alive_now.sum()), int(c_finished.sum()), ess_now, ess_now / len(lw),
                          resampled_any, unique if resampled_any else len(lw))

        # 6. retire the finished
        retired = state.retired
        if self.retire_finished:
            out = finished_next & (logw_next > NEG_INF)
            retired += tuple(Retired(states_next[i], float(logw_next[i]), t) for i in np.flatnonzero(out))
            stay = np.flatnonzero(~out & (logw_next > NEG_INF))
            states_next = [states_next[i] for i in stay]
            logw_next, finished_next = logw_next[stay], finished_next[stay]
            carry_next, groups_next = carry_next[stay], groups_next[stay]
            done = done or not stay.size
        return replace(state, t=t, states=tuple(states_next), log_weights=logw_next, finished=finished_next,
                       carry=carry_next, groups=groups_next, log_z=log_z, trace=state.trace + (trace,),
                       retired=retired, proposed=n_proposed, done=done)

    async def _select(self, state, lw_g, members, c_states, n_g, t, done, rng):
        """Ancestors (indices into the group) and their log-weights after selection."""
        weights = normalize(lw_g)
        if self.reference is not None:
            ref = self.reference
            ref_ancestor = self.ref_slot
            # A finished reference has no future to graft onto another prefix.
            if self.ancestor_sampling is not None and not done and t < ref.n_steps and not ref.finished[t]:
                ref_ancestor = await _sample_ref_ancestor(self.ancestor_sampling, c_states, lw_g, ref, t, rng)
            return conditional_ancestors(weights, self.ref_slot, ref_ancestor, rng), np.zeros(len(lw_g))
        if self.tempering is not None:
            temperature = float(self.tempering(weights, t))
            if not (math.isfinite(temperature) and temperature > 0):
                raise ValueError(f"tempering returned temperature {temperature!r}; it must be finite and > 0")
            tempered = normalize(np.where(lw_g > NEG_INF, lw_g / temperature, NEG_INF))
            chosen = self.resampler(tempered, n_g, rng)
            if not self.correct_tempering:
                return chosen, np.zeros(n_g)
            return chosen, np.log(weights[chosen]) - np.log(tempered[chosen])
        size = n_g
        if self.frontier:
            size = min(self.frontier, int(np.count_nonzero(lw_g > NEG_INF)))
        chosen = self.resampler(weights, size, rng)
        return chosen, (lw_g[chosen] if self.keep_weights else np.zeros(size))

    # -- finish ----------------------------------------------------------------------
    def finish(self, state: SMCState) -> SMCResult:
        """The result: final population, normalised weights and log Ẑ = log mean_g Ẑ_g."""
        log_z = state.log_z.copy()
        n_g = self.group_size(state)
        if state.status == STATUS_OK:
            for g in range(self.groups):
                lw_g = state.log_weights[state.groups == g]
                log_z[g] += logsumexp(lw_g) - math.log(n_g) if lw_g.size else NEG_INF
        total = logsumexp(log_z) - math.log(self.groups)
        exact = self.resampler.unbiased and state.status == STATUS_OK
        return SMCResult(
            states=list(state.states),
            log_weights=state.log_weights,
            weights=normalize(state.log_weights) if state.size else np.zeros(0),
            finished=state.finished,
            log_z=total if self.resampler.unbiased else None,
            exact=exact,
            status=state.status,
            message=state.message,
            trace=state.trace,
            genealogy=state.genealogy,
            retired=state.retired,
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
