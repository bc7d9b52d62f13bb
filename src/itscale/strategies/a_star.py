"""A*-decoding (Chatziveroglou 2025): best-first search over partial solutions.

A state is a partial solution s; the goal states are finished solutions. Its priority is
the PRM's estimate that s leads to a correct solution,

    f(s) = log PRM(s)   (the aggregated score of the whole partial solution),

which plays A*'s g + h at once: the PRM scores the steps taken (g) and, trained on
outcomes, how promising the prefix is (h). The search keeps a frontier of at most F
nodes. Each iteration pops the node of highest f; if it is finished the search ends
there (A*'s goal test on expansion, not on generation); otherwise it samples k next
steps for it (one request with k = ``children``), scores them (one PRM call) and pushes
them, dropping the lowest-f nodes beyond F.

On the core: one root particle, ``movers=best_first(1)``, ``expansion=k``, ℓ = f
(``EveryStep(prm, link="log")`` with ``accumulate=False``, kept by the ``top_k``
selector), ``frontier=F``; the driver pops by checking whether the best node is
finished before each step.

Budget = node expansions: at most ``budget`` policy calls of k samples each. If the
budget ends before a finished node reaches the top, the answer is the best finished
node found; if none finished at all, the best partial solution is completed with one
whole-solution sample (one more policy call, reported in ``extras``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from ..core import SMC, EveryStep, best_first
from ..types import Particle, Result
from .base import Aggregation, Params, Strategy, register
from .context import RunContext


class AStarParams(Params):
    children: int = Field(4, ge=1, description="k: next steps sampled per expansion")
    frontier: int = Field(16, ge=1, description="F: most nodes kept on the frontier (the lowest f dropped)")
    aggregation: Aggregation = "last"
    selection: Literal["argmax", "vote"] = "argmax"


@register
class AStar(Strategy):
    name = "a_star"
    Params = AStarParams
    needs_prm = True

    async def _run(self, ctx: RunContext, budget: int) -> Result:
        p = self.params
        kernel = SMC(ctx.propose, EveryStep(ctx.prm_scores, link="log"), max_steps=budget + 1, resampler="top_k",
                     expansion=p.children, movers=best_first(1), accumulate=False, keep_weights=True,
                     frontier=p.frontier)
        state = kernel.init([Particle(ctx.problem)])
        while not state.done and state.t < budget and not _top_is_finished(state):
            state = await kernel.step(state, ctx.rng)
        done = [i for i in range(state.size) if state.finished[i] and state.log_weights[i] > -np.inf]
        extras = {"expansions": state.t, "frontier": state.size, "goal_reached": _top_is_finished(state)}
        if done:
            particles = [state.states[i] for i in done]
            scores = np.exp(state.log_weights[done])
            return self.result(ctx, budget, particles, scores, selection=p.selection, scores=scores, extras=extras)
        live = np.flatnonzero(state.log_weights > -np.inf)
        if not live.size:
            return self.result(ctx, budget, [], [], message=state.message or "every expansion failed", extras=extras)
        best = state.states[int(live[np.argmax(state.log_weights[live])])]
        (completed,) = await ctx.complete([best])
        extras["completed_partial"] = True
        return self.result(ctx, budget, [completed], [1.0], extras=extras)


def _top_is_finished(state) -> bool:
    """Whether the frontier's best node (highest f, lowest index on ties) is a solution."""
    live = np.flatnonzero(state.log_weights > -np.inf)
    return bool(live.size) and bool(state.finished[live[np.argmax(state.log_weights[live])]])
