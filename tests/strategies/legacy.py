"""The implementations of beam search, DVTS, best-of-N and parallel tempering as they were
before they became configurations of the core (copied from commit adcb482, unregistered), so
tests can show the core configurations give the same answers on the same seeds."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from itscale.core import EveryStep
from itscale.core.genealogy import Trajectory
from itscale.core.resampling import top_k
from itscale.strategies.base import Aggregation, Params, PooledStrategy, Strategy
from itscale.strategies.context import RunContext
from itscale.strategies.particle_gibbs import ChainParams, csmc_sweep, next_reference
from itscale.types import Particle, Result


class BeamParams(Params):
    beam_width: int = Field(4, ge=1, description="M: children per beam per step")
    aggregation: Aggregation = "last"
    selection: Literal["argmax", "vote"] = "argmax"


def _rank(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n best scores, best first (ties → lower index).

    Scores in (0, 1] normalised to weights go through the core ``top_k`` selector,
    which never keeps a zero weight: NaN (failed) and zero scores are never kept."""
    w = np.where(np.isfinite(scores) & (scores > 0), scores, 0.0)
    alive = int(np.count_nonzero(w))
    if alive == 0:
        return np.zeros(0, dtype=np.int64)
    return top_k(w / w.sum(), min(n, alive), None)


class _TreeSearch(Strategy):
    Params = BeamParams
    needs_prm = True

    def check_budget(self, budget: int) -> None:
        super().check_budget(budget)
        self.require_divisible(budget, self.params.beam_width, "beam_width")

    async def _expand(self, ctx: RunContext, beams: list[Particle]):
        """M children per beam with one policy call, then their scores with one PRM call."""
        m = self.params.beam_width
        proposed = await ctx.propose([b for b in beams for _ in range(m)])
        children = [c for c in proposed.states if c is not None]
        scores = await ctx.prm_scores(children) if children else np.zeros(0)
        return children, scores


class BeamSearch(_TreeSearch):
    name = "beam_search"

    async def _run(self, ctx: RunContext, budget: int) -> Result:
        n_beams = budget // self.params.beam_width
        active = [Particle(ctx.problem)] * n_beams
        done: list[Particle] = []
        done_scores: list[float] = []
        while active:
            children, scores = await self._expand(ctx, active)
            active = []
            for i in _rank(scores, n_beams):
                if children[i].finished:
                    done.append(children[i])
                    done_scores.append(float(scores[i]))
                else:
                    active.append(children[i])
        return self.result(ctx, budget, done, done_scores, selection=self.params.selection, scores=done_scores)


class DVTS(_TreeSearch):
    name = "dvts"

    async def _run(self, ctx: RunContext, budget: int) -> Result:
        m = self.params.beam_width
        subtrees: list[Particle | None] = [Particle(ctx.problem)] * (budget // m)
        final_scores = [np.nan] * len(subtrees)
        while any(t is not None and not t.finished for t in subtrees):
            live = [i for i, t in enumerate(subtrees) if t is not None and not t.finished]
            proposed = await ctx.propose([subtrees[i] for i in live for _ in range(m)])
            children = list(proposed.states)
            valid = [c for c in children if c is not None]
            scored = iter(await ctx.prm_scores(valid) if valid else [])
            scores = np.array([next(scored) if c is not None else np.nan for c in children])
            for j, i in enumerate(live):
                block = scores[j * m : (j + 1) * m]
                best = _rank(block, 1)
                if best.size == 0:
                    subtrees[i] = None  # every child failed: this subtree dies
                    continue
                subtrees[i] = children[j * m + int(best[0])]
                final_scores[i] = float(block[best[0]])
        weights = [s if t is not None else 0.0 for t, s in zip(subtrees, final_scores)]
        return self.result(ctx, budget, subtrees, weights, selection=self.params.selection, scores=final_scores)


class BestOfNParams(Params):
    aggregation: Aggregation = "last"


class _Scored(PooledStrategy):
    Params = BestOfNParams
    needs_prm = True
    scored = True
    selection = "argmax"

    def select(self, ctx: RunContext, budget: int, particles, scores) -> Result:
        weights = np.where(np.isfinite(scores) & (scores > 0), scores, 0.0)
        return self.result(ctx, budget, particles, weights, selection=self.selection, scores=scores)


class BestOfN(_Scored):
    name = "best_of_n"
    selection = "argmax"


class WeightedBestOfN(_Scored):
    name = "weighted_best_of_n"
    selection = "vote"


class ParallelTemperingParams(ChainParams):
    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0)
    rounds: int = Field(2, ge=1, description="sweeps per chain")

    @field_validator("temperatures")
    @classmethod
    def _positive_increasing(cls, value):
        if len(value) < 2 or any(t <= 0 for t in value) or list(value) != sorted(value):
            raise ValueError("need at least two positive temperatures in increasing order, e.g. (1, 2, 4)")
        return value


def log_odds(s: float, link: str, eps: float = 1e-7) -> float:
    """link(s): log(s/(1−s)) or log s, with the same clipping as EveryStep."""
    if not s > 0:
        return -math.inf
    if link == "odds":
        s = min(s, 1 - eps)
        return math.log(s) - math.log1p(-s)
    return math.log(s)


class ParallelTempering(Strategy):
    name = "parallel_tempering"
    Params = ParallelTemperingParams
    needs_prm = True

    def check_budget(self, budget: int) -> None:
        super().check_budget(budget)
        self.require_divisible(budget, len(self.params.temperatures) * self.params.rounds, "chains × rounds =")

    async def potential(self, ctx: RunContext, refs: list[Trajectory | None]) -> list[float]:
        """L(x) for each reference, scoring every prefix in one PRM call."""
        prefixes, owners = [], []
        for i, ref in enumerate(refs):
            if ref is None:
                continue
            final: Particle = ref.final
            for t in range(1, final.n_steps + 1):
                prefixes.append(Particle(ctx.problem, final.steps[:t]))
                owners.append(i)
        totals = [-math.inf if r is None else 0.0 for r in refs]
        if prefixes:
            for i, s in zip(owners, await ctx.prm_scores(prefixes)):
                totals[i] += log_odds(float(s), self.params.link)
        return totals

    async def _run(self, ctx: RunContext, budget: int) -> Result:
        p = self.params
        temps = p.temperatures
        n = budget // (len(temps) * p.rounds)
        observers = [EveryStep(ctx.prm_scores, link=p.link, temperature=t) for t in temps]
        refs: list[Trajectory | None] = [None] * len(temps)
        states, weights, swaps, accepted = [], [], 0, 0
        for r in range(p.rounds):
            for k, observe in enumerate(observers):
                smc = await csmc_sweep(ctx, n, observe, p.schedule, refs[k])
                refs[k] = next_reference(smc, ctx) or refs[k]
                if k == 0 and smc.ok:
                    states += list(smc.states)
                    weights += list(np.asarray(smc.weights) / p.rounds)
            if r == p.rounds - 1:
                break
            L = await self.potential(ctx, refs)
            for k in range(r % 2, len(temps) - 1, 2):
                if refs[k] is None or refs[k + 1] is None:
                    continue
                swaps += 1
                log_a = (1 / temps[k] - 1 / temps[k + 1]) * (L[k + 1] - L[k])
                if math.log(ctx.rng.random()) < min(0.0, log_a):
                    refs[k], refs[k + 1] = refs[k + 1], refs[k]
                    accepted += 1
        if not states:
            return self.result(ctx, budget, [], [], message="the coldest chain never produced a solution")
        return self.result(ctx, budget, states, weights, selection=p.selection, exact=True,
                           extras={"swaps_proposed": swaps, "swaps_accepted": accepted})
