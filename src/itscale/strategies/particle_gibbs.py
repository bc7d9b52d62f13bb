"""Particle Gibbs: repeated conditional SMC sweeps.

Budget = particles × sweeps. Sweep 1 is plain particle filtering; after each sweep
a reference trajectory is drawn ∝ final weight, and the next sweep is conditional
SMC: the reference keeps one slot, is weighted at every step by the same
``EveryStep`` increment as everyone else (its *partial* score at that step), and
the other N−1 ancestors are i.i.d. draws from all N weights. This kernel leaves the
``EveryStep`` target invariant (tested on enumerable models in ``tests/core``).

The candidates are the final particles of every sweep, each sweep carrying equal
total weight 1/S (an average of S properly weighted populations).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from ..core import EveryStep, run_smc
from ..core.genealogy import Trajectory
from ..types import Particle, Result
from .base import Aggregation, Params, Selection, Strategy, register
from .context import RunContext


class ChainParams(Params):
    """What every conditional-SMC chain shares (particle Gibbs, parallel tempering)."""

    link: Literal["odds", "log"] = "odds"
    schedule: str = "always"
    aggregation: Aggregation = "last"
    selection: Selection = "argmax"


class ParticleGibbsParams(ChainParams):
    sweeps: int = Field(2, ge=1, description="S: conditional SMC sweeps; particles per sweep = budget / S")
    temperature: float = Field(1.0, gt=0)


async def csmc_sweep(ctx: RunContext, n: int, observe, schedule: str, reference: Trajectory | None):
    """One (conditional) SMC sweep with multinomial resampling; returns the core result."""
    return await run_smc([Particle(ctx.problem)] * n, ctx.propose, observe, rng=ctx.rng,
                         max_steps=ctx.format.max_steps, resampler="multinomial", schedule=schedule,
                         reference=reference)


def next_reference(smc, ctx: RunContext) -> Trajectory | None:
    return smc.trajectory(smc.sample_index(ctx.rng)) if smc.ok else None


@register
class ParticleGibbs(Strategy):
    name = "particle_gibbs"
    Params = ParticleGibbsParams
    needs_prm = True

    def check_budget(self, budget: int) -> None:
        super().check_budget(budget)
        self.require_divisible(budget, self.params.sweeps, "sweeps")

    async def _run(self, ctx: RunContext, budget: int) -> Result:
        p = self.params
        n = budget // p.sweeps
        observe = EveryStep(ctx.prm_scores, link=p.link, temperature=p.temperature)
        reference = None
        states, weights, ess, resampled = [], [], [], []
        last = None
        for _ in range(p.sweeps):
            smc = await csmc_sweep(ctx, n, observe, p.schedule, reference)
            last = smc
            ess += [t.ess for t in smc.trace]
            resampled += [t.resampled for t in smc.trace]
            if smc.ok:
                states += list(smc.states)
                weights += list(np.asarray(smc.weights) / p.sweeps)
                reference = next_reference(smc, ctx)
        if not states:
            return self.result(ctx, budget, [], [], message=last.message if last else "no sweep ran")
        return self.result(ctx, budget, states, weights, selection=p.selection, exact=True,
                           ess=tuple(ess), resampled=tuple(resampled), genealogy=last.genealogy)
