"""Parallel tempering over particle Gibbs chains.

Chain m targets π_m(x) ∝ p(x)·exp(L(x)/T_m) with L(x) = Σ_t link(s_t(x)) the
summed ``EveryStep`` log-potential of a complete solution at temperature 1, so
T_1 = 1 is the particle-filtering target and hotter chains explore. Every round,
each chain runs one conditional SMC sweep from its reference; then neighbours
(k, k+1), alternating even and odd pairs, swap references with probability

    min(1, exp((β_k − β_{k+1})·(L(x_{k+1}) − L(x_k)))),   β = 1/T,

which keeps the product of the chain targets invariant. L needs no PRM call: the
genealogy records each particle's increments, chain k's are link(s_t)/T_k, so a
reference drawn from chain k has L = T_k · Σ_t Δℓ_t (``Trajectory.log_potential``), and
L travels with the reference when it is swapped. Budget = chains ×
particles × rounds. The answer comes from the coldest chain (the first
temperature), whose sweeps give the candidates with equal weight per round.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import Field, field_validator

from ..core import EveryStep
from ..core.genealogy import Trajectory
from ..types import Result
from .base import Strategy, register
from .context import RunContext
from .particle_gibbs import ChainParams, csmc_sweep, next_reference


class ParallelTemperingParams(ChainParams):
    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0)
    rounds: int = Field(2, ge=1, description="sweeps per chain")

    @field_validator("temperatures")
    @classmethod
    def _positive_increasing(cls, value):
        if len(value) < 2 or any(t <= 0 for t in value) or list(value) != sorted(value):
            raise ValueError("need at least two positive temperatures in increasing order, e.g. (1, 2, 4)")
        return value


@register
class ParallelTempering(Strategy):
    name = "parallel_tempering"
    Params = ParallelTemperingParams
    needs_prm = True

    def check_budget(self, budget: int) -> None:
        super().check_budget(budget)
        self.require_divisible(budget, len(self.params.temperatures) * self.params.rounds, "chains × rounds =")

    async def _run(self, ctx: RunContext, budget: int) -> Result:
        p = self.params
        temps = p.temperatures
        n = budget // (len(temps) * p.rounds)
        observers = [EveryStep(ctx.prm_scores, link=p.link, temperature=t) for t in temps]
        refs: list[Trajectory | None] = [None] * len(temps)
        L = [-math.inf] * len(temps)  # L(x) of each chain's reference
        states, weights, swaps, accepted = [], [], 0, 0
        for r in range(p.rounds):
            for k, observe in enumerate(observers):
                smc = await csmc_sweep(ctx, n, observe, p.schedule, refs[k])
                drawn = next_reference(smc, ctx)
                if drawn is not None:
                    refs[k], L[k] = drawn, temps[k] * drawn.log_potential
                if k == 0 and smc.ok:
                    states += list(smc.states)
                    weights += list(np.asarray(smc.weights) / p.rounds)
            if r == p.rounds - 1:
                break
            for k in range(r % 2, len(temps) - 1, 2):
                if refs[k] is None or refs[k + 1] is None:
                    continue
                swaps += 1
                log_a = (1 / temps[k] - 1 / temps[k + 1]) * (L[k + 1] - L[k])
                if math.log(ctx.rng.random()) < min(0.0, log_a):
                    refs[k], refs[k + 1] = refs[k + 1], refs[k]
                    L[k], L[k + 1] = L[k + 1], L[k]
                    accepted += 1
        if not states:
            return self.result(ctx, budget, [], [], message="the coldest chain never produced a solution")
        return self.result(ctx, budget, states, weights, selection=p.selection, exact=True,
                           extras={"swaps_proposed": swaps, "swaps_accepted": accepted})
