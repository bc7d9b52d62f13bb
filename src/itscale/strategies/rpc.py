r"""RPC: reasoning-pruning perplexity consistency (Zhou et al. 2025).

N whole samples x_i with answers a_i. The model's own probability of each path, read as
its inverse perplexity (the default; ``probability="sequence"`` uses the whole path's
probability instead),

    p_i = exp( log p(x_i | question) / |x_i| ),

enters self-consistency in two ways:

1. **Reasoning pruning.** The p_i are fitted by maximum likelihood with a mixture of two
   Weibull densities, w·W(k₁, λ₁) + (1 − w)·W(k₂, λ₂), w ∈ [0.2, 0.8] (the paper's
   bounds and starting point), the first component being the one of larger mean
   λΓ(1 + 1/k). A path is pruned when it belongs more to the low component than to the
   high one *and* p_i is below the mean of the p. Fewer than ``min_prune`` paths are not
   pruned (a mixture of two needs data), and a pruning that would leave nothing is skipped.
2. **Perplexity consistency.** Each answer scores the sum of the probabilities of its
   *distinct* surviving paths (a path sampled twice counts once),

       P̂(a) = Σ_{x ∈ distinct(survivors), a(x) = a} p(x),

   and the answer is argmax_a P̂(a) (ties broken by the run's rng).

The candidates carry these weights (each distinct path once, pruned paths 0), so the
result's weights are the normalised P̂. Needs the policy's log-probabilities
(``Step.logprob``); no PRM. Budget = N samples (a pooled method: the bench subsamples one
pool).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field
from scipy.optimize import minimize
from scipy.special import gamma

from ..types import Particle, Result
from .base import Params, PooledStrategy, register
from .context import RunContext

_START = (0.5, 1.0, 1.0, 1.5, 2.0)  # w, k1, λ1, k2, λ2: the paper's fixed initialisation
_BOUNDS = ((0.2, 0.8), (0.01, None), (0.01, None), (0.01, None), (0.01, None))


class RPCParams(Params):
    prune: bool = Field(True, description="reasoning pruning (off: perplexity consistency alone)")
    probability: Literal["mean", "sequence"] = Field("mean", description="p = exp(mean token log-prob) or exp(total)")
    min_prune: int = Field(4, ge=2, description="prune only pools of at least this many paths")


def path_probability(particle: Particle, how: str = "mean") -> float:
    """p(x) from the steps' log-probabilities: exp(Σ logprob / tokens) or exp(Σ logprob)."""
    logprobs = [s.logprob for s in particle.steps if s.logprob is not None]
    if len(logprobs) != sum(1 for s in particle.steps if s.tokens):
        raise ValueError("rpc needs the policy's log-probabilities (Step.logprob), and this backend returned none; "
                         "use a backend with Capabilities.logprobs")
    total = math.fsum(logprobs)
    if how == "sequence":
        return math.exp(total)
    tokens = sum(s.tokens for s in particle.steps)
    return math.exp(total / tokens) if tokens else 0.0


def _weibull(x: np.ndarray, k: float, lam: float) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):  # the optimiser probes extreme shapes
        return np.nan_to_num((k / lam) * (x / lam) ** (k - 1) * np.exp(-((x / lam) ** k)))


def low_component(p: np.ndarray) -> np.ndarray:
    """For each p_i, whether the fitted two-Weibull mixture puts it more in the low-mean
    component than in the high one."""
    x = np.clip(np.asarray(p, dtype=np.float64), 1e-12, None)

    def nll(theta):
        w, k1, l1, k2, l2 = theta
        dens = w * _weibull(x, k1, l1) + (1 - w) * _weibull(x, k2, l2)
        return -np.sum(np.log(np.clip(dens, 1e-300, None)))

    w, k1, l1, k2, l2 = minimize(nll, _START, bounds=_BOUNDS).x
    if l1 * gamma(1 + 1 / k1) < l2 * gamma(1 + 1 / k2):  # component 1 is the high-mean one
        w, k1, l1, k2, l2 = 1 - w, k2, l2, k1, l1
    return w * _weibull(x, k1, l1) < (1 - w) * _weibull(x, k2, l2)


def rpc_weights(particles: list[Particle | None], probability: str = "mean", prune: bool = True,
                min_prune: int = 4) -> tuple[np.ndarray, int]:
    """Each path's weight in the perplexity-consistency vote (0 for failed, pruned and
    repeated paths) and how many paths were pruned."""
    alive = [i for i, x in enumerate(particles) if x is not None]
    p = np.zeros(len(particles))
    p[alive] = [path_probability(particles[i], probability) for i in alive]
    keep = np.zeros(len(particles), dtype=bool)
    keep[alive] = True
    pruned = 0
    if prune and len(alive) >= min_prune:
        drop = low_component(p[alive]) & (p[alive] < p[alive].mean())
        if not drop.all():
            keep[np.asarray(alive)[drop]] = False
            pruned = int(drop.sum())
    weights = np.zeros(len(particles))
    seen: set[str] = set()
    for i in np.flatnonzero(keep):
        if particles[i].text not in seen:
            seen.add(particles[i].text)
            weights[i] = p[i]
    return weights, pruned


@register
class RPC(PooledStrategy):
    name = "rpc"
    Params = RPCParams

    def select(self, ctx: RunContext, budget: int, particles, scores) -> Result:
        p = self.params
        weights, pruned = rpc_weights(list(particles), p.probability, p.prune, p.min_prune)
        return self.result(ctx, budget, particles, weights, selection="vote",
                           extras={"pruned": pruned, "paths": sum(x is not None for x in particles)})
