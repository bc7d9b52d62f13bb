"""Beam search and diverse verifier tree search (DVTS) over PRM scores.

Both are deterministic selections (``log_z = None``, ``exact = False``) built on the
core's ``top_k`` selector.

Beam search (budget N, width M): keep B = N/M beams. Each round every active beam
is expanded into M sampled one-step children (one request with k = M), children
are scored by the aggregated PRM score of the whole partial solution, and the top
B of all children are kept; kept children that are finished leave the pool for
the completed list, so the pool shrinks as beams finish. The answer is the
highest-scoring completed solution.

DVTS (budget N, width M): N/M independent subtrees; each keeps only the best of
its M sampled next steps (a beam of one), so the subtrees stay diverse. The
answer is the highest-scoring of the N/M final solutions.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from ..core.resampling import top_k
from ..types import Particle, Result
from .base import Aggregation, Params, Strategy, register
from .context import RunContext


class BeamParams(Params):
    beam_width: int = Field(4, ge=1, description="M: children per beam per step")
    aggregation: Aggregation = "last"
    selection: Literal["argmax", "vote"] = "argmax"


def _rank(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n best scores, best first (ties → lower index).

    Scores in (0, 1] normalised to weights go through the core ``top_k`` selector,
    which never keeps a zero weight: NaN (failed) and zero scores are never kept."""
    w = np.where(np.isfinite(scores) & (scores > 0), scores, 0.0)
    alive = int(np.count_nonzero(w))
    if alive == 0:
        return np.zeros(0, dtype=np.int64)
    return top_k(w / w.sum(), min(n, alive), None)


class _TreeSearch(Strategy):
    Params = BeamParams
    needs_prm = True

    def check_budget(self, budget: int) -> None:
        super().check_budget(budget)
        self.require_divisible(budget, self.params.beam_width, "beam_width")

    async def _expand(self, ctx: RunContext, beams: list[Particle]):
        """M children per beam with one policy call, then their scores with one PRM call."""
        m = self.params.beam_width
        proposed = await ctx.propose([b for b in beams for _ in range(m)])
        children = [c for c in proposed.states if c is not None]
        scores = await ctx.prm_scores(children) if children else np.zeros(0)
        return children, scores


@register
class BeamSearch(_TreeSearch):
    name = "beam_search"

    async def _run(self, ctx: RunContext, budget: int) -> Result:
        n_beams = budget // self.params.beam_width
        active = [Particle(ctx.problem)] * n_beams
        done: list[Particle] = []
        done_scores: list[float] = []
        while active:
            children, scores = await self._expand(ctx, active)
            active = []
            for i in _rank(scores, n_beams):
                if children[i].finished:
                    done.append(children[i])
                    done_scores.append(float(scores[i]))
                else:
                    active.append(children[i])
        return self.result(ctx, budget, done, done_scores, selection=self.params.selection, scores=done_scores)


@register
class DVTS(_TreeSearch):
    name = "dvts"

    async def _run(self, ctx: RunContext, budget: int) -> Result:
        m = self.params.beam_width
        subtrees: list[Particle | None] = [Particle(ctx.problem)] * (budget // m)
        final_scores = [np.nan] * len(subtrees)
        while any(t is not None and not t.finished for t in subtrees):
            live = [i for i, t in enumerate(subtrees) if t is not None and not t.finished]
            proposed = await ctx.propose([subtrees[i] for i in live for _ in range(m)])
            children = list(proposed.states)
            valid = [c for c in children if c is not None]
            scored = iter(await ctx.prm_scores(valid) if valid else [])
            scores = np.array([next(scored) if c is not None else np.nan for c in children])
            for j, i in enumerate(live):
                block = scores[j * m : (j + 1) * m]
                best = _rank(block, 1)
                if best.size == 0:
                    subtrees[i] = None  # every child failed: this subtree dies
                    continue
                subtrees[i] = children[j * m + int(best[0])]
                final_scores[i] = float(block[best[0]])
        weights = [s if t is not None else 0.0 for t, s in zip(subtrees, final_scores)]
        return self.result(ctx, budget, subtrees, weights, selection=self.params.selection, scores=final_scores)
