"""Self-consistency (majority vote) and its adaptive variant.

Self-consistency: N full samples; the answer is the most frequent graded-equivalent
final answer (grouped by ``answer_key``); ties are broken by the run's rng.

Adaptive self-consistency (Aggarwal et al. 2023): draw ``round_size`` samples at a
time and stop once the leader's probability of being the true majority exceeds
``threshold``, under a Beta posterior over the top two answers' shares: with
counts v₁ ≥ v₂, θ ~ Beta(v₁+1, v₂+1) and

    P(θ > ½) = P(Binomial(v₁+v₂+1, ½) ≤ v₁) = 2^{−n} Σ_{j≤v₁} C(n, j),  n = v₁+v₂+1.

The budget is the maximum number of samples.
"""

from __future__ import annotations

import math
from collections import Counter

from pydantic import Field

from ..types import Result
from .base import Params, PooledStrategy, Strategy, candidates, register
from .context import RunContext


def majority_confidence(top: int, second: int) -> float:
    """P(leader is the majority) under the Beta posterior above."""
    n = top + second + 1
    return math.fsum(math.comb(n, j) for j in range(top + 1)) / 2.0**n


@register
class SelfConsistency(PooledStrategy):
    name = "self_consistency"

    def select(self, ctx: RunContext, budget: int, particles, scores) -> Result:
        return self.result(ctx, budget, particles, [1.0] * len(particles), selection="vote")


class AdaptiveParams(Params):
    threshold: float = Field(0.95, gt=0.5, lt=1.0, description="stop when P(leader is majority) exceeds this")
    round_size: int = Field(2, ge=1, description="samples drawn per round")


@register
class AdaptiveSelfConsistency(Strategy):
    name = "adaptive_self_consistency"
    Params = AdaptiveParams

    async def _run(self, ctx: RunContext, budget: int) -> Result:
        particles: list = []
        rounds = 0
        confidence = 0.0
        while len(particles) < budget:
            n = min(self.params.round_size, budget - len(particles))
            particles += await ctx.sample_full(n)
            rounds += 1
            votes = Counter(self.answer_key(c.answer) for c in candidates(particles, [1.0] * len(particles)))
            votes.pop(None, None)
            ranked = sorted(votes.values(), reverse=True) + [0, 0]
            confidence = majority_confidence(ranked[0], ranked[1])
            if ranked[0] > 0 and confidence > self.params.threshold:
                break
        return self.result(ctx, budget, particles, [1.0] * len(particles), selection="vote",
                           extras={"samples": len(particles), "rounds": rounds, "confidence": confidence})

