r"""DeepConf (Fu et al. 2025, "Deep Think with Confidence"): votes weighted, filtered and cut
short by the model's own token confidence.

Every trace is sampled whole with the top-k log-probabilities of each token (k =
``top_k``, the paper's 20) and read through :mod:`itscale.lm.confidence`:
C_i = −(1/k) Σ_j log P_i(j) per token, the group confidence of each window of ``window``
tokens, and the trace's confidence c(t) by ``measure``: the lowest group confidence (the
paper's default), the mean of the bottom 10% of groups, the tail (the last ``window``
tokens) or the average over all tokens.

**Offline** (``deepconf``; a pooled method): of the N traces keep the ⌈η·N⌉ of highest c
(η = ``keep``: 0.1 is DeepConf@low, 0.9 DeepConf@high) and answer by the vote weighted by
confidence, argmax_a Σ_{kept t, a(t) = a} c(t). With ``keep=1`` this is plain
confidence-weighted voting.

**Online** (``deepconf_online``): a warm-up of N_init = ``warmup`` traces sets the stopping
threshold s = Percentile_{100−100η}({c_least(t)}) of their lowest group confidences; the
warm-up traces at or above s vote. Later traces are generated in rounds of ``round_size``
with the backend stopping each one as soon as the group confidence of its last ``window``
tokens falls below s (:class:`~itscale.types.ConfidenceStop`, ``finish_reason=
"low_confidence"``: the tokens after it are never generated); a stopped trace has no answer
and does not vote. After each round the run stops once the leading answer's share of the
confidence-weighted vote reaches ``consensus`` (the paper's τ = 0.95) or ``budget`` traces
were drawn. ``extras`` reports the threshold, the traces drawn and those stopped early.

Budget = traces (at most, online). Needs a backend with ``Capabilities.top_logprobs``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

import numpy as np
from pydantic import Field

from ..lm import confidence as conf
from ..types import ConfidenceStop, Particle, Problem, Result
from .base import Params, PooledStrategy, Strategy, candidates, register, vote_totals
from .context import RunContext

Measure = Literal["lowest_group", "bottom_group", "tail", "average"]


class DeepConfParams(Params):
    measure: Measure = "lowest_group"
    window: int = Field(2048, ge=1, description="tokens per group window (the paper's 2048)")
    top_k: int = Field(20, ge=1, le=20, description="top-k log-probabilities per token read for C_i")
    keep: float = Field(0.1, gt=0, le=1, description="η: the share of traces kept (0.1: DeepConf@low, 1: all)")


class DeepConfOnlineParams(DeepConfParams):
    warmup: int = Field(16, ge=1, description="N_init: warm-up traces that set the stopping threshold")
    round_size: int = Field(4, ge=1, description="traces generated between consensus checks")
    consensus: float = Field(0.95, gt=0.5, le=1, description="τ: stop once the leader's weighted share reaches it")


def trace_confidence(particle: Particle, measure: str, window: int) -> float:
    """c(t) of a whole trace from its steps' top-k log-probabilities."""
    tops = [top for step in particle.steps for top in (step.top_logprobs or ())]
    if not tops:
        raise ValueError("deepconf needs the policy's top-k log-probabilities (Step.top_logprobs); this backend "
                         "returned none: use one with Capabilities.top_logprobs")
    c = conf.token_confidences(tops)
    if measure == "lowest_group":
        return conf.lowest_group_confidence(c, window)
    if measure == "bottom_group":
        return conf.bottom_group_confidence(c, window)
    if measure == "tail":
        return conf.tail_confidence(c, window)
    return conf.average_confidence(c)


def with_top_logprobs(strategy: Strategy, ctx: RunContext) -> RunContext:
    ctx.sampling = replace(ctx.sampling, top_logprobs=strategy.params.top_k)
    return ctx


@register
class DeepConf(PooledStrategy):
    name = "deepconf"
    Params = DeepConfParams

    @classmethod
    def pool_key(cls, params: dict) -> str:
        return f"top_logprobs={params.get('top_k', DeepConfParams.model_fields['top_k'].default)}"

    def context(self, problem: Problem, rng: np.random.Generator) -> RunContext:
        return with_top_logprobs(self, super().context(problem, rng))

    def select(self, ctx: RunContext, budget: int, particles, scores) -> Result:
        p = self.params
        c = np.array([trace_confidence(x, p.measure, p.window) if x is not None else np.nan for x in particles])
        alive = np.flatnonzero(np.isfinite(c))
        kept = alive[np.argsort(-c[alive], kind="stable")[: math.ceil(p.keep * alive.size)]]
        weights = np.zeros(len(particles))
        weights[kept] = np.maximum(c[kept], 1e-12)  # C ≥ 0; a zero-confidence trace still votes a little
        return self.result(ctx, budget, particles, weights, selection="vote", scores=c,
                           extras={"kept": int(kept.size)})


@register
class DeepConfOnline(Strategy):
    name = "deepconf_online"
    Params = DeepConfOnlineParams

    def context(self, problem: Problem, rng: np.random.Generator) -> RunContext:
        return with_top_logprobs(self, super().context(problem, rng))

    async def _run(self, ctx: RunContext, budget: int) -> Result:
        p = self.params
        warm = [x for x in await ctx.sample_full(min(p.warmup, budget)) if x is not None]
        drawn = min(p.warmup, budget)
        if not warm:
            return self.result(ctx, budget, [], [], message="every warm-up trace failed")
        lowest = [trace_confidence(x, "lowest_group", p.window) for x in warm]
        threshold = conf.online_threshold(lowest, 100 * p.keep)
        voters = [(x, trace_confidence(x, p.measure, p.window)) for x, low in zip(warm, lowest) if low >= threshold]
        stopped = 0
        while drawn < budget and self.share(voters) < p.consensus:
            n = min(p.round_size, budget - drawn)
            drawn += n
            for x in await ctx.sample_full(n, stop_below=ConfidenceStop(p.window, threshold)):
                if x is None:
                    continue
                if x.steps[-1].finish_reason == "low_confidence":
                    stopped += 1
                    continue
                voters.append((x, trace_confidence(x, p.measure, p.window)))
        extras = {"threshold": threshold, "traces": drawn, "stopped_early": stopped, "voters": len(voters),
                  "share": self.share(voters)}
        return self.result(ctx, budget, [x for x, _ in voters], [max(c, 1e-12) for _, c in voters],
                           selection="vote", scores=[c for _, c in voters], extras=extras)

    def share(self, voters: list[tuple[Particle, float]]) -> float:
        """The leading answer's share of the confidence-weighted vote (0 with no voter)."""
        if not voters:
            return 0.0
        cands = candidates([x for x, _ in voters], [max(w, 1e-12) for _, w in voters])
        return max(vote_totals(cands, self.answer_key).values(), default=0.0)
