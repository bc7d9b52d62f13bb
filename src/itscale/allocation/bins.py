"""Difficulty bins: quantile edges learnt on the training split, and the bin of a score.

Snell et al. (2024) bin problems into 5 quantiles of (model-predicted) difficulty. A score may
take few values (``agreement`` over k samples takes at most k + 1), and all problems with the
same score must fall in the same bin, so the edges are chosen among the observed values:

    u_1 < … < u_m      the distinct training scores,   F_i = #{training scores ≤ u_i}
    e_j = u_{i*},      i* = argmin_{i < m} |F_i − j·N/B|      (j = 1..B−1; ties → the smaller i)

with repeated edges dropped, so fewer than B bins may come out (a note says so). Without ties
F_i = i and e_j is the ⌊j·N/B⌉-th smallest score: the empirical quantile. With ties the bins are
as close to equal counts as the ties allow. The bin of a score d with edges e_1 < … < e_{B'−1}:

    bin(d) = #{ j : e_j < d }          (0 = easiest; a score equal to an edge goes in the bin it ends)

so bin b holds the scores in (e_b, e_{b+1}], bin 0 everything ≤ e_1.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np


def quantile_edges(scores: Sequence[float], bins: int) -> list[float]:
    """The bin edges of ``scores`` for ``bins`` quantile bins (see the module docstring)."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins!r}")
    values = np.asarray(scores, dtype=float)
    if values.size == 0:
        raise ValueError("no difficulty scores to learn bin edges from (the training split is empty)")
    distinct, counts = np.unique(values, return_counts=True)
    below = np.cumsum(counts)[:-1]  # F_i for i < m: the top value is never an edge (its bin would be empty)
    if below.size == 0:
        return []
    edges = set()
    for j in range(1, bins):
        target = j * values.size / bins
        edges.add(float(distinct[int(np.argmin(np.abs(below - target)))]))  # argmin: the first of ties
    return sorted(edges)


def bin_of(score: float, edges: Sequence[float]) -> int:
    """The bin of ``score``: the number of edges strictly below it."""
    return bisect.bisect_left(list(edges), float(score))
