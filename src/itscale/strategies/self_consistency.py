"""Self-consistency (majority vote) and its adaptive variant.

Self-consistency: N full samples; the answer is the most frequent graded-equivalent
final answer (grouped by ``answer_key``); ties are broken by the run's rng.

Adaptive self-consistency (Aggarwal et al. 2023): draw ``round_size`` samples at a
time and stop once the leader's probability of being the true majority exceeds
``threshold``, under a Beta posterior over the top two answers' shares: with
counts v₁ ≥ v₂, θ ~ Beta(v₁+1, v₂+1) and

    P(θ > ½) = P(Binomial(v₁+v₂+1, ½) ≤ v₁) = 2^{−n} Σ_{j≤v₁} C(n, j),  n = v₁+v₂+1.

Beta self-consistency: the same rounds, but the test is on the leader's share of *all*
samples, not only against the runner-up: with v votes for the leading answer among n
samples (a sample with no answer votes for none), θ ~ Beta(a + v, b + n − v) under a
Beta(a, b) prior, and the run stops once P(θ > ½) exceeds ``threshold`` — the leader is
then, with that confidence, the answer of a majority of the policy's distribution. With
integer a, b this is ``majority_confidence(v + a − 1, n − v + b − 1)``. It asks for more
evidence than the adaptive test when the runners-up split the rest (votes 6-1-1-1-1:
adaptive is 96.5% sure, Beta 72.6%), and the same when only two answers compete.

The budget is the maximum number of samples.
"""

from __future__ import annotations

import math
from collections import Counter

from pydantic import Field, field_validator

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


class BetaParams(AdaptiveParams):
    prior: tuple[int, int] = Field((1, 1), description="(a, b): the Beta prior on the leader's share")

    @field_validator("prior")
    @classmethod
    def _positive(cls, value):
        if any(x < 1 for x in value):
            raise ValueError("the prior's a and b must be integers >= 1 (Beta(1, 1) is uniform)")
        return value


@register
class AdaptiveSelfConsistency(Strategy):
    name = "adaptive_self_consistency"
    Params = AdaptiveParams

    def confidence(self, ranked: list[int], n: int) -> float:
        """P(the leader is the majority) from vote counts, largest first (padded with zeros),
        and the number of samples drawn that did not fail."""
        return majority_confidence(ranked[0], ranked[1])

    async def _run(self, ctx: RunContext, budget: int) -> Result:
        particles: list = []
        rounds = 0
        confidence = 0.0
        while len(particles) < budget:
            n = min(self.params.round_size, budget - len(particles))
            particles += await ctx.sample_full(n)
            rounds += 1
            drawn = candidates(particles, [1.0] * len(particles))  # failed samples are not votes
            votes = Counter(self.answer_key(c.answer) for c in drawn)
            votes.pop(None, None)
            ranked = sorted(votes.values(), reverse=True) + [0, 0]
            confidence = self.confidence(ranked, len(drawn))
            if ranked[0] > 0 and confidence > self.params.threshold:
                break
        return self.result(ctx, budget, particles, [1.0] * len(particles), selection="vote",
                           extras={"samples": len(particles), "rounds": rounds, "confidence": confidence})



@register
class BetaSelfConsistency(AdaptiveSelfConsistency):
    name = "beta_self_consistency"
    Params = BetaParams

    def confidence(self, ranked: list[int], n: int) -> float:
        a, b = self.params.prior
        return majority_confidence(ranked[0] + a - 1, n - ranked[0] + b - 1)
