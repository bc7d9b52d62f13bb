"""First-finish search (2025): N samples in flight, the first to finish is the answer.

For reasoning models shorter traces are more often correct, and decoding N samples in
parallel makes the first to finish the shortest one. The other N − 1 are stopped when
it finishes, so the run costs about N × (length of the shortest) tokens instead of the
sum of all N lengths.

- A policy that can race (``itscale.protocols.Racer``: the Hugging Face generator stops
  its lock-step batch at the first finished row; the OpenAI-compatible client cancels
  the other streaming requests) runs it as one macro-step of the core: N particles, one
  ``race`` proposal that finishes the winner and kills the cancelled (ℓ = −∞).
- Any other policy runs the N samples step by step in lock-step on the core and stops
  at the first step after which some sample has finished; among those that finished
  then, the one with the fewest tokens wins (the lowest index on ties). Steps are the
  unit of cancellation there.

``extras`` reports the mode, the tokens spent and, on a racing backend, how many samples
were cancelled. Budget = N, the samples in flight.
"""

from __future__ import annotations

import numpy as np

from ..core import SMC, Proposed, Unweighted, drive
from ..protocols import Racer
from ..types import Particle, Result
from .base import Strategy, register
from .context import RunContext


@register
class FirstFinish(Strategy):
    name = "first_finish"

    async def _run(self, ctx: RunContext, budget: int) -> Result:
        if isinstance(ctx.policy, Racer):
            return await self._race(ctx, budget)
        return await self._lock_step(ctx, budget)

    async def _race(self, ctx: RunContext, budget: int) -> Result:
        outcomes = []

        async def race(particles, rng) -> Proposed:
            winner, outcome = await ctx.race(len(particles))
            outcomes.append(outcome)
            states = [None] * len(particles)
            states[outcome.index] = winner
            return Proposed(states, [True] * len(particles))

        smc = await drive(SMC(race, Unweighted(), max_steps=1, schedule="never"),
                          [Particle(ctx.problem)] * budget, ctx.rng)
        (outcome,) = outcomes
        extras = {"mode": "race", "spent_tokens": outcome.spent_tokens, "cancelled": outcome.cancelled,
                  "winner_tokens": outcome.winner.tokens}
        alive = smc.log_weights > -np.inf
        if not alive.any():
            return self.result(ctx, budget, [], [], message=outcome.winner.error or "every sample failed",
                               extras=extras)
        return self.result(ctx, budget, [s for s, a in zip(smc.states, alive) if a], [1.0] * int(alive.sum()),
                           extras=extras)

    async def _lock_step(self, ctx: RunContext, budget: int) -> Result:
        kernel = SMC(ctx.propose, Unweighted(), max_steps=self.format.max_steps, schedule="never")
        state = kernel.init([Particle(ctx.problem)] * budget)
        while not state.done and not (state.finished & (state.log_weights > -np.inf)).any():
            state = await kernel.step(state, ctx.rng)
        done = np.flatnonzero(state.finished & (state.log_weights > -np.inf))
        extras = {"mode": "steps", "spent_tokens": ctx.cost.generated_tokens, "steps": state.t}
        if not done.size:
            return self.result(ctx, budget, [], [], message=state.message or "every sample failed", extras=extras)
        tokens = [sum(s.tokens for s in state.states[i].steps) for i in done]
        winner = state.states[int(done[int(np.argmin(tokens))])]
        return self.result(ctx, budget, [winner], [1.0], extras=extras)
