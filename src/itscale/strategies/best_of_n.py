"""Best-of-N and weighted best-of-N over N full samples.

Scores are the outcome scorer's when one is given, otherwise the PRM's score of
the whole solution aggregated across steps (``aggregation``).

- best-of-N: the answer of the highest-scoring sample (ties broken by rng);
- weighted best-of-N: the answer whose samples have the largest *sum* of scores.
"""

from __future__ import annotations

import numpy as np

from ..types import Result
from .base import Aggregation, Params, PooledStrategy, register
from .context import RunContext


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


@register
class BestOfN(_Scored):
    name = "best_of_n"
    selection = "argmax"


@register
class WeightedBestOfN(_Scored):
    name = "weighted_best_of_n"
    selection = "vote"
