r"""Self-certainty best-of-N and Borda voting (Kang et al. 2025, "Scalable Best-of-N Selection
for Large Language Models via Self-Certainty").

Each of N whole samples x is scored by the policy's own certainty, the mean over its tokens
of KL(U ‖ p_i) (how far each next-token distribution is from uniform; the confidence PRM,
``prm: {kind: confidence, measure: self-certainty}``, computes it exactly from every logit
and reports σ(m − log V), a monotone map of it).

- ``selection="argmax"``: the sample of highest self-certainty (best-of-N with the model as
  its own verifier, no reward model).
- ``selection="borda"``: rank the samples by self-certainty (r = 1 the most certain) and give
  the sample at rank r the vote v(r) = (N − r + 1)^p; the answer with the most votes wins.
  p = 0 is majority vote, p → ∞ best-of-N; the paper finds a small p best (``power``).

Budget = N samples (a pooled method). Needs a self-certainty scorer as the PRM.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from ..types import Result
from .base import Params, PooledStrategy, register
from .context import RunContext


class SelfCertaintyParams(Params):
    selection: Literal["argmax", "borda"] = "borda"
    power: float = Field(0.5, ge=0, description="p in the Borda vote v(r) = (N − r + 1)^p")


def innermost(backend: Any) -> Any:
    """The backend under its wrappers (each keeps what it wraps as ``inner``)."""
    for _ in range(8):
        if not hasattr(backend, "inner"):
            break
        backend = backend.inner
    return backend


def borda_votes(scores: np.ndarray, power: float) -> np.ndarray:
    """v(r) = (N − r + 1)^p for the sample at rank r of ``scores`` (largest first; NaN: no vote);
    tied scores share the mean of their ranks' votes."""
    ok = np.flatnonzero(np.isfinite(scores))
    votes = np.zeros(len(scores))
    n = ok.size
    order = ok[np.argsort(-scores[ok], kind="stable")]
    per_rank = (n - np.arange(n)) ** float(power)  # rank r = index + 1: (N − r + 1)^p
    i = 0
    while i < n:
        j = i
        while j + 1 < n and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        votes[order[i:j + 1]] = per_rank[i:j + 1].mean()
        i = j + 1
    return votes


@register
class SelfCertainty(PooledStrategy):
    name = "self_certainty"
    Params = SelfCertaintyParams
    needs_prm = True
    prm_kind = "confidence"
    scored = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        measure = getattr(innermost(self.prm), "measure", None) if self.prm is not None else None
        if measure != "self-certainty":
            raise ValueError("self_certainty: the PRM must be the policy's self-certainty "
                             "(prm: {kind: confidence, measure: self-certainty}, or --prm-kind confidence); "
                             f"got {type(innermost(self.prm)).__name__}")

    def select(self, ctx: RunContext, budget: int, particles, scores) -> Result:
        s = np.asarray(scores, dtype=np.float64)
        if self.params.selection == "argmax":
            weights = np.where(np.isfinite(s), s, 0.0)
            return self.result(ctx, budget, particles, weights, selection="argmax", scores=s)
        votes = borda_votes(s, self.params.power)
        return self.result(ctx, budget, particles, votes, selection="vote", scores=s)
