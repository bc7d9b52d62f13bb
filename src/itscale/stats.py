"""Small statistics shared by the model card and the bench.

* ``pass_at_k``: the unbiased coverage estimator 1 − C(n−c, k)/C(n, k) (Chen et al. 2021);
* ``auroc``: area under the ROC curve by the Mann–Whitney statistic;
* ``wilson``: the Wilson score interval for a proportion p observed over n trials.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k: 1 − C(n−c, k) / C(n, k) (Chen et al. 2021)."""
    if k > n:
        raise ValueError(f"need k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def auroc(labels: Sequence[bool], scores: Sequence[float]) -> float:
    """Area under the ROC curve (Mann–Whitney, ties counted half); NaN with one class only."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=float)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=float)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks of ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (default 95%) for a proportion ``p`` over ``n`` trials; NaNs for n = 0."""
    if n == 0:
        return (float("nan"), float("nan"))
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    # exact bounds are 0 at p = 0 and 1 at p = 1; rounding can land just outside ("-0.0")
    return (max(0.0, c - h), min(1.0, c + h))
