"""Log-weight arithmetic in float64.

Particles carry unnormalised log-weights ℓ_n. A dead particle has ℓ_n = −∞: its
normalised weight is exactly 0, it is never selected and never stepped.

    W_n   = exp(ℓ_n − logsumexp(ℓ))                     (softmax)
    ESS   = 1 / Σ W_n²  = exp(2·logsumexp(ℓ) − logsumexp(2ℓ))

Every function here is total: an all-dead vector gives logsumexp = −∞, weights of
all zeros and ESS 0 — never NaN. NaN inputs are treated as dead (−∞), because a
NaN score means a failed computation, and a failed particle is a dead particle.
"""

from __future__ import annotations

import numpy as np

NEG_INF = -np.inf


def as_log_weights(log_weights) -> np.ndarray:
    """A float64 copy of ``log_weights`` with NaN mapped to −∞ (dead).

    +∞ is rejected: it would make every other weight zero and the normaliser
    infinite, which is always a bug upstream (a score of exactly 1 fed to a logit).
    """
    lw = np.array(log_weights, dtype=np.float64, copy=True).reshape(-1)
    lw[np.isnan(lw)] = NEG_INF
    if np.any(lw == np.inf):
        raise ValueError("log_weights contains +inf; clip scores into (0, 1) before taking logs/logits")
    return lw


def logsumexp(log_weights) -> float:
    """log Σ exp(ℓ_n), stable; −∞ for an empty or all-dead vector."""
    lw = as_log_weights(log_weights)
    if lw.size == 0:
        return NEG_INF
    m = lw.max()
    if m == NEG_INF:
        return NEG_INF
    return float(m + np.log(np.exp(lw - m).sum()))


def normalize(log_weights) -> np.ndarray:
    """Normalised weights W = softmax(ℓ) in float64; all zeros if every particle is dead."""
    lw = as_log_weights(log_weights)
    if lw.size == 0:
        return lw
    m = lw.max()
    if m == NEG_INF:
        return np.zeros_like(lw)
    w = np.exp(lw - m)
    return w / w.sum()


def log_normalize(log_weights) -> np.ndarray:
    """log W = ℓ − logsumexp(ℓ); all −∞ if every particle is dead."""
    lw = as_log_weights(log_weights)
    total = logsumexp(lw)
    if total == NEG_INF:
        return np.full_like(lw, NEG_INF)
    return lw - total


def ess(log_weights) -> float:
    """Effective sample size 1/ΣW², computed in log space; 0 when all are dead."""
    lw = as_log_weights(log_weights)
    total = logsumexp(lw)
    if total == NEG_INF:
        return 0.0
    return float(np.exp(2.0 * total - logsumexp(2.0 * lw)))


def ess_fraction(log_weights) -> float:
    """ESS / N in [0, 1] (1/N ≤ ESS/N ≤ 1 while anyone is alive)."""
    lw = as_log_weights(log_weights)
    return ess(lw) / lw.size if lw.size else 0.0


def alive(log_weights) -> np.ndarray:
    """Boolean mask of particles with positive weight (ℓ > −∞)."""
    return as_log_weights(log_weights) > NEG_INF


def check_weights(weights) -> np.ndarray:
    """Validate normalised weights given to a resampler and return them as float64.

    They must be finite, non-negative and sum to 1 within 1e-8; otherwise a
    ``ValueError`` names the problem (use :func:`normalize` on log-weights first).
    """
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size == 0:
        raise ValueError("weights is empty: resampling needs at least one particle")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and non-negative; pass normalize(log_weights)")
    total = w.sum()
    if abs(total - 1.0) > 1e-8:
        raise ValueError(f"weights must sum to 1 (got {total!r}); pass normalize(log_weights)")
    return w
