"""Early rejection with partial rewards (2025): drop weak candidates after a few steps.

N candidates start from the empty solution and advance together. After ``check_step``
steps (τ) the PRM scores every partial candidate; only the K = ⌈keep·N⌉ best survive.
With ``reallocate`` (the default) the budget of the N − K dropped candidates goes to the
survivors: each continues as N/K independent samples (its copies share one request with
k > 1), so N solutions still finish, all from promising prefixes. Without it the K
survivors simply finish, and the dropped candidates' remaining tokens are saved. A
candidate that finishes before τ is scored when it finishes and competes at τ like
the others. The answer is the candidate with the best final PRM score (``selection``).

On the core: ℓ is the latest PRM log-score, set only at τ and on finishing
(:class:`ScoreAt`: Δℓ = log s − log s_prev there, 0 elsewhere), a schedule that
selects once, at τ, and either a truncation selector (top K, each repeated to fill N)
or a frontier of K (top K, no copies).

Budget = N, the candidates started.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field

from ..core import SMC, drive
from ..core.resampling import Resampler
from ..core.sync import resolve
from ..types import Particle, Result
from .base import Aggregation, Params, Strategy, register
from .context import RunContext


class EarlyRejectionParams(Params):
    check_step: int = Field(1, ge=1, description="τ: steps after which the partial candidates are scored")
    keep: float = Field(0.25, gt=0, le=1, description="fraction of candidates kept at τ: K = ceil(keep·N)")
    reallocate: bool = Field(True, description="survivors continue as N/K samples each (else the rest is saved)")
    aggregation: Aggregation = "last"
    selection: Literal["argmax", "vote"] = "argmax"


@dataclass(frozen=True)
class ScoreAt:
    """Observation: score a particle at depth ``depth`` and when it finishes, nowhere else.

    The carry is the last log-score, so ℓ (with selections that keep it) is always the
    latest score: Δℓ = log s − carry where scored, 0 elsewhere."""

    prm: Any
    depth: int

    async def increments(self, states, finished, carry):
        carry = np.asarray(carry, dtype=np.float64)
        incr, new_carry = np.zeros(len(states)), carry.copy()
        due = [i for i, (p, f) in enumerate(zip(states, finished)) if f or p.n_steps == self.depth]
        if due:
            s = np.asarray(await resolve(self.prm([states[i] for i in due])), dtype=np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                log_s = np.where(s > 0, np.log(np.where(s > 0, s, 1.0)), np.where(s == 0, -np.inf, np.nan))
            incr[due] = log_s - carry[due]
            new_carry[due] = log_s
        return incr, new_carry


def truncation(keep: int) -> Resampler:
    """The ``keep`` heaviest particles, each repeated in turn to fill n (deterministic)."""

    def fn(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        order = np.argsort(-weights, kind="stable")[: min(keep, int(np.count_nonzero(weights > 0)))]
        return np.resize(order, n).astype(np.int64)

    return Resampler(f"truncate({keep})", fn, unbiased=False)


@register
class EarlyRejection(Strategy):
    name = "early_rejection"
    Params = EarlyRejectionParams
    needs_prm = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.params.check_step >= self.format.max_steps:
            raise ValueError(f"early_rejection.check_step: {self.params.check_step} steps is not before the format's "
                             f"last step ({self.format.max_steps}); nothing would be left to reject early")

    def survivors(self, budget: int) -> int:
        return max(1, math.ceil(self.params.keep * budget))

    async def _run(self, ctx: RunContext, budget: int) -> Result:
        p = self.params
        k = self.survivors(budget)
        tau = p.check_step
        selection = dict(resampler=truncation(k)) if p.reallocate else dict(resampler="top_k", frontier=k)
        kernel = SMC(ctx.propose, ScoreAt(ctx.prm_scores, tau), max_steps=self.format.max_steps,
                     schedule=lambda t, ess_fraction: t == tau, keep_weights=True, **selection)
        smc = await drive(kernel, [Particle(ctx.problem)] * budget, ctx.rng)
        scores = np.where(smc.log_weights > -np.inf, np.exp(smc.log_weights), 0.0)
        extras = {"survivors": k, "rejected": budget - k, "check_step": tau}
        if not smc.ok:
            return self.result(ctx, budget, [], [], message=smc.message, extras=extras)
        return self.result(ctx, budget, smc.states, scores, selection=p.selection, scores=scores, extras=extras)
