"""Beam search and diverse verifier tree search (DVTS) as configurations of the core.

Both are deterministic selections (``log_z = None``, ``exact = False``): the core's
``top_k`` selector over ℓ = log s, where s is the aggregated PRM score of the whole
partial solution (``EveryStep(prm, link="log")`` with ``accumulate=False``: ℓ is the
latest score, and selection keeps it, ``keep_weights``).

Beam search (budget N, width M): keep B = N/M beams. Each round every active beam
is expanded into M sampled one-step children (``expansion=M``: one request with
k = M), and the top B of all children are kept; kept children that are finished leave
the population for the completed list (``retire_finished``), so fewer beams expand
as beams finish, while each round still keeps the best B children. The answer is the
highest-scoring completed solution.

DVTS (budget N, width M): N/M independent subtrees (``groups=N/M`` of one particle
each); each keeps only the best of its M sampled next steps (a beam of one), so the
subtrees stay diverse. The answer is the highest-scoring of the N/M final solutions.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from ..core import SMC, EveryStep, drive
from ..types import Particle, Result
from .base import Aggregation, Params, Strategy, register
from .context import RunContext


class BeamParams(Params):
    beam_width: int = Field(4, ge=1, description="M: children per beam per step")
    aggregation: Aggregation = "last"
    selection: Literal["argmax", "vote"] = "argmax"


def latest_score(ctx: RunContext) -> EveryStep:
    """The observation that makes ℓ = log s_t (with ``accumulate=False``): s_t the aggregated
    PRM score of the whole partial solution; 0 or a failed score kills the particle."""
    return EveryStep(ctx.prm_scores, link="log")


class _TreeSearch(Strategy):
    Params = BeamParams
    needs_prm = True

    def check_budget(self, budget: int) -> None:
        super().check_budget(budget)
        self.require_divisible(budget, self.params.beam_width, "beam_width")

    def kernel(self, ctx: RunContext, budget: int) -> SMC:
        raise NotImplementedError

    async def _run(self, ctx: RunContext, budget: int) -> Result:
        kernel = self.kernel(ctx, budget)
        smc = await drive(kernel, [Particle(ctx.problem)] * (budget // self.params.beam_width), ctx.rng)
        return self.answer(ctx, budget, smc)


@register
class BeamSearch(_TreeSearch):
    name = "beam_search"

    def kernel(self, ctx: RunContext, budget: int) -> SMC:
        return SMC(ctx.propose, latest_score(ctx), max_steps=self.format.max_steps, resampler="top_k",
                   expansion=self.params.beam_width, accumulate=False, keep_weights=True, retire_finished=True)

    def answer(self, ctx: RunContext, budget: int, smc) -> Result:
        done = [r.state for r in smc.retired]
        scores = [float(np.exp(r.log_weight)) for r in smc.retired]
        return self.result(ctx, budget, done, scores, selection=self.params.selection, scores=scores)


@register
class DVTS(_TreeSearch):
    name = "dvts"

    def kernel(self, ctx: RunContext, budget: int) -> SMC:
        return SMC(ctx.propose, latest_score(ctx), max_steps=self.format.max_steps, resampler="top_k",
                   expansion=self.params.beam_width, accumulate=False, keep_weights=True,
                   groups=budget // self.params.beam_width)

    def answer(self, ctx: RunContext, budget: int, smc) -> Result:
        scores = np.exp(smc.log_weights)
        return self.result(ctx, budget, smc.states, scores, selection=self.params.selection, scores=scores)
