"""Score aggregation across steps: an explicit, named choice.

Given per-step probabilities p_1..p_t of a partial solution:

    last  p_t                  (the PRM's view of the newest prefix)
    min   min_i p_i            (a chain is as good as its weakest step)
    prod  Π_i p_i              (probability that every step is right, if independent)
    mean  (1/t) Σ_i p_i
    model the PRM scores the whole partial answer as one step; the caller sends
          the joined text as a single step and takes that one score (== last)
"""

from __future__ import annotations

import math
from typing import Sequence

AGGREGATIONS = ("last", "min", "prod", "mean", "model")


def check_aggregation(how: str) -> str:
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {how!r}")
    return how


def aggregate(scores: Sequence[float], how: str) -> float:
    """Aggregate one solution's per-step scores; NaN for an empty list (a dead particle)."""
    check_aggregation(how)
    if len(scores) == 0:
        return math.nan
    if how in ("last", "model"):
        return float(scores[-1])
    if how == "min":
        return float(min(scores))
    if how == "prod":
        return float(math.prod(scores))
    return float(sum(scores) / len(scores))


def aggregate_prefixes(scores: Sequence[float], how: str) -> list[float]:
    """The aggregated score of every prefix: [agg(p_1), agg(p_1, p_2), …]."""
    return [aggregate(scores[: i + 1], how) for i in range(len(scores))]


def score_request_steps(step_texts: Sequence[str], how: str) -> tuple[str, ...]:
    """What to send the PRM: the steps, or for ``model`` the joined text as one step."""
    check_aggregation(how)
    return ("".join(step_texts),) if how == "model" else tuple(step_texts)
