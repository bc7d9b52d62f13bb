"""Particle filtering (Puri et al. 2025) and twisted SMC, as configurations of the core.

Particle filtering: N particles, one step each per round, weights from
``EveryStep(prm, link, temperature)``: Δℓ_t = link(s_t)/T with s_t the aggregated
PRM score of the partial solution. Resample every step (the paper) or by ESS.
The answer is the heaviest solution, one drawn ∝ weight, or the answer with the
largest total weight (``selection``).

Copies of one solution (resampling duplicates them) are one candidate whose weight
is the sum of theirs: the particle approximation of the posterior is
π̂(x) = Σ_i W_i·1[x_i = x], so "argmax" returns its mode. (Comparing copies one by
one would ignore how often resampling chose a solution: after the last resampling
every copy weighs the same, and a solution that finished early — increment 0 since
— would lose to any single particle whose last step scored above even.)

Entropic particle filtering (as its_hub has it): particle filtering whose resampling is
tempered, W^{1/T}, when the weights collapse early in the run
(:class:`~itscale.core.EntropicAnnealing`: T > 1 only while ESS/N < ``ess_threshold``
and t/T_max < ``early_phase``), so that more distinct prefixes survive the first PRM
scores. ``correct=False`` (its_hub's choice) resets the weights after a tempered draw;
``correct=True`` gives each offspring the importance weight W/W̃, which keeps the
particle-filtering target and an unbiased Ẑ.

Twisted SMC: ``Twisted(reward, twist=prm, beta)``: the target is p(x)·r(x)^β with
r the outcome score (outcome scorer if given, else the PRM's final score); the PRM
only shapes the proposal population. Systematic resampling at ESS < 0.5 and a
weighted answer vote by default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ..core import RESAMPLERS, EntropicAnnealing, EveryStep, Twisted, get_resampler, get_schedule, run_smc
from ..types import Particle, Result
from .base import Aggregation, Params, Selection, Strategy, register
from .context import RunContext


class _SMCParams(Params):
    resampler: str = "systematic"
    schedule: str = "always"
    aggregation: Aggregation = "last"
    selection: Selection = "argmax"

    @field_validator("resampler")
    @classmethod
    def _known_resampler(cls, value: str) -> str:
        get_resampler(value)
        return value

    @field_validator("schedule")
    @classmethod
    def _known_schedule(cls, value: str) -> str:
        get_schedule(value)
        return value


class ParticleFilteringParams(_SMCParams):
    temperature: float = Field(1.0, gt=0, description="softmax temperature T on the log-odds weights")
    link: Literal["odds", "log"] = "odds"


class EntropicParams(ParticleFilteringParams):
    ess_threshold: float = Field(0.5, gt=0, le=1, description="temper only while ESS/N is below this")
    early_phase: float = Field(0.5, ge=0, le=1, description="temper only while t / max_steps is below this")
    temperature_method: Literal["ess", "entropy"] = "ess"
    correct: bool = Field(False, description="importance-correct the tempered draw (keeps the target; its_hub: no)")

    @field_validator("resampler")
    @classmethod
    def _unbiased(cls, value: str) -> str:
        if value not in RESAMPLERS:
            raise ValueError(f"tempering needs an unbiased resampler, one of {sorted(RESAMPLERS)}")
        return value


class TwistedParams(_SMCParams):
    schedule: str = "ess:0.5"
    # argmax over final importance weights r/ψ chases PRM noise as N grows;
    # the weighted vote estimates the posterior's most probable answer
    selection: Selection = "vote"
    beta: float = Field(1.0, gt=0, description="reward exponent: target p(x)·r(x)^β")


def _result(strategy: Strategy, ctx: RunContext, budget: int, smc, selection: str) -> Result:
    fields = dict(
        log_z=smc.log_z,
        exact=smc.exact,
        ess=tuple(t.ess for t in smc.trace),
        resampled=tuple(t.resampled for t in smc.trace),
        genealogy=smc.genealogy,
    )
    if not smc.ok:
        return strategy.result(ctx, budget, [], [], message=smc.message, **fields)
    particles, weights = merge_copies(smc.states, smc.weights)
    return strategy.result(ctx, budget, particles, weights, selection=selection, **fields)


def merge_copies(particles, weights) -> tuple[list, list[float]]:
    """One particle per distinct solution text, weighing the sum of its copies' weights
    (first-seen order; dead particles, ``None`` or weight 0, are dropped)."""
    total: dict[str, float] = {}
    first: dict[str, Particle] = {}
    for p, w in zip(particles, weights):
        if p is None or not w > 0:
            continue
        total[p.text] = total.get(p.text, 0.0) + float(w)
        first.setdefault(p.text, p)
    return [first[t] for t in total], list(total.values())


class _SMCStrategy(Strategy):
    """N particles from the empty solution, moved and weighted by the core driver."""

    needs_prm = True

    def observation(self, ctx: RunContext):
        raise NotImplementedError

    def options(self) -> dict:
        """Further core options (:class:`~itscale.core.SMC` fields)."""
        return {}

    async def _run(self, ctx: RunContext, budget: int) -> Result:
        p = self.params
        smc = await run_smc([Particle(ctx.problem)] * budget, ctx.propose, self.observation(ctx), rng=ctx.rng,
                            max_steps=self.format.max_steps, resampler=p.resampler, schedule=p.schedule,
                            **self.options())
        return _result(self, ctx, budget, smc, p.selection)


@register
class ParticleFiltering(_SMCStrategy):
    name = "particle_filtering"
    Params = ParticleFilteringParams

    def observation(self, ctx: RunContext):
        return EveryStep(ctx.prm_scores, link=self.params.link, temperature=self.params.temperature)


@register
class EntropicParticleFiltering(ParticleFiltering):
    name = "entropic_particle_filtering"
    Params = EntropicParams

    def options(self) -> dict:
        p = self.params
        anneal = EntropicAnnealing(self.format.max_steps, p.ess_threshold, p.early_phase, p.temperature_method)
        return {"tempering": anneal, "correct_tempering": p.correct}


@register
class TwistedSMC(_SMCStrategy):
    name = "twisted_smc"
    Params = TwistedParams

    def observation(self, ctx: RunContext):
        return Twisted(reward=ctx.outcome_scores, twist=ctx.prm_scores, beta=self.params.beta)
