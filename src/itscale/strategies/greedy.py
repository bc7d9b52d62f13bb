"""Greedy decoding: one solution at temperature 0 (the budget is validated, then ignored)."""

from __future__ import annotations

from ..types import Result
from .base import Strategy, register
from .context import RunContext


@register
class Greedy(Strategy):
    name = "greedy"

    async def _run(self, ctx: RunContext, budget: int) -> Result:
        (particle,) = await ctx.sample_full(1, temperature=0.0)
        return self.result(ctx, budget, [particle], [1.0])
