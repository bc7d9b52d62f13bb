"""Best-of-N and weighted best-of-N over N full samples.

Scores are the outcome scorer's when one is given, otherwise the PRM's score of
the whole solution aggregated across steps (``aggregation``).

- best-of-N: the answer of the highest-scoring sample (ties broken by rng);
- weighted best-of-N: the answer whose samples have the largest *sum* of scores.
"""

from __future__ import annotations


import numpy as np

from ..types import Result
from .base import Aggregation, Params, Strategy, register
from .context import RunContext


class BestOfNParams(Params):
    aggregation: Aggregation = "last"


class _Scored(Strategy):
    Params = BestOfNParams
    needs_prm = True
    selection = "argmax"

    async def _run(self, ctx: RunContext, budget: int) -> Result:
        particles = await ctx.sample_full(budget)
        alive = [p for p in particles if p is not None]
        scores = np.full(len(particles), np.nan)
        if alive:
            values = await ctx.outcome_scores(alive)
            scores[[i for i, p in enumerate(particles) if p is not None]] = values
        weights = np.where(np.isfinite(scores) & (scores > 0), scores, 0.0)
        return self.result(ctx, budget, particles, weights, selection=self.selection, scores=scores)


@register
class BestOfN(_Scored):
    name = "best_of_n"
    selection = "argmax"


@register
class WeightedBestOfN(_Scored):
    name = "weighted_best_of_n"
    selection = "vote"
