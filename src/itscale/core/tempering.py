"""Entropic annealing: how much to flatten the resampling weights when they collapse.

Entropic particle filtering (as in its_hub) resamples from W_i^{1/T} / Σ_j W_j^{1/T}
instead of W when the weights have collapsed early in the run, so that more distinct
partial solutions survive the first, least informed PRM scores. With progress
p = t / T_max, ESS fraction e = 1/(N·Σ W_i²) and normalised entropy
H = −Σ W_i log W_i / log N:

    T = 1                                   unless e < ``ess_threshold`` and p < ``early_phase``;
    T = max(1, (1 − p) / e)                 ``method="ess"``;
    T = max(1, 1 / (H + (1 − H)·p))         ``method="entropy"``.

The kernel (``SMC(tempering=…)``) either importance-corrects the draw, so each
offspring of particle i carries ℓ = log W_i − log W̃_i and Ẑ stays unbiased, or not
(``correct_tempering=False``, its_hub's choice: a biased, flatter population).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

METHODS = ("ess", "entropy")


@dataclass(frozen=True)
class EntropicAnnealing:
    max_steps: int
    ess_threshold: float = 0.5
    early_phase: float = 0.5
    method: str = "ess"

    def __post_init__(self) -> None:
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"EntropicAnnealing.max_steps must be a positive integer, got {self.max_steps!r}")
        if not 0 < self.ess_threshold <= 1:
            raise ValueError(f"EntropicAnnealing.ess_threshold must be in (0, 1], got {self.ess_threshold!r}")
        if not 0 <= self.early_phase <= 1:
            raise ValueError(f"EntropicAnnealing.early_phase must be in [0, 1], got {self.early_phase!r}")
        if self.method not in METHODS:
            raise ValueError(f"EntropicAnnealing.method must be one of {METHODS}, got {self.method!r}")

    def __call__(self, weights: np.ndarray, step: int) -> float:
        """T ≥ 1 for normalised ``weights`` at ``step`` (1-based)."""
        w = np.asarray(weights, dtype=np.float64)
        n = w.size
        if n <= 1:
            return 1.0
        progress = step / self.max_steps
        ess_fraction = 1.0 / (n * float(np.sum(w**2)))
        if ess_fraction >= self.ess_threshold or progress >= self.early_phase:
            return 1.0
        if self.method == "ess":
            return max(1.0, (1.0 - progress) / ess_fraction)
        positive = w[w > 0]
        entropy = float(-np.sum(positive * np.log(positive))) / math.log(n)
        return max(1.0, 1.0 / (entropy + (1.0 - entropy) * progress))
