"""The strategy interface, its registry, and the shared final-answer rules.

Every method is a :class:`Strategy` subclass with a pydantic ``Params`` model, so a
method is selected by name with validated parameters:

    strategy = make_strategy("particle_filtering", policy=gen, prm=prm, temperature=0.5)
    result = await strategy.run(problem, budget=16, rng=np.random.default_rng(0))

Bad parameters raise ``ValueError`` naming the method and the field.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from ..core import SMC, Outcome, Unweighted, drive
from ..protocols import Generator, OutcomeScorer, ProcessRewardModel
from ..tasks.answers import answer_key as default_answer_key
from ..types import Candidate, Particle, Problem, Result, SamplingParams
from .context import RunContext, StepFormat, answer_of

STRATEGIES: dict[str, type["Strategy"]] = {}

SELECTIONS = ("argmax", "sample", "vote")
Aggregation = Literal["last", "min", "prod", "mean", "model"]
Selection = Literal["argmax", "sample", "vote"]


class Params(BaseModel):
    """Base for strategy parameters: unknown fields are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def register(cls: type["Strategy"]) -> type["Strategy"]:
    if cls.name in STRATEGIES:
        raise ValueError(f"strategy {cls.name!r} is already registered")
    STRATEGIES[cls.name] = cls
    return cls


def _validation_message(method: str, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        field = ".".join(str(x) for x in e["loc"]) or "(params)"
        parts.append(f"{method}.{field}: {e['msg']}")
    return "; ".join(parts)


class Strategy(ABC):
    """A method: ``async run(problem, budget, rng) -> Result`` plus a sync ``solve``."""

    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params
    needs_prm: ClassVar[bool] = False
    prm_kind: ClassVar[str | None] = None  # the PRM kind the method reads (self_certainty: "confidence"), if only one

    def __init__(
        self,
        policy: Generator,
        prm: ProcessRewardModel | None = None,
        outcome: OutcomeScorer | None = None,
        *,
        format: StepFormat | None = None,
        sampling: SamplingParams | None = None,
        answer_key: Callable[[str | None], Any] = default_answer_key,
        **params: Any,
    ):
        try:
            self.params = self.Params(**params)
        except ValidationError as err:
            raise ValueError(_validation_message(self.name, err)) from None
        if self.needs_prm and prm is None and outcome is None:
            raise ValueError(f"{self.name} needs a reward model: pass prm=... (or outcome=...)")
        self.policy, self.prm, self.outcome = policy, prm, outcome
        self.format = format or StepFormat()
        self.sampling = sampling or SamplingParams()
        self.answer_key = answer_key

    # -- public API -----------------------------------------------------------------
    def check_budget(self, budget: int) -> None:
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
            raise ValueError(f"{self.name}: budget must be a positive integer, got {budget!r}")

    def fits(self, budget: int) -> bool:
        """Whether this method can run at ``budget`` (:meth:`check_budget` passes)."""
        try:
            self.check_budget(budget)
        except ValueError:
            return False
        return True

    def budgets_up_to(self, limit: int) -> list[int]:
        """The budgets from 1 to ``limit`` this method can run at (e.g. the multiples of a beam width)."""
        return [b for b in range(1, int(limit) + 1) if self.fits(b)]

    def require_divisible(self, budget: int, divisor: int, what: str) -> None:
        if budget % divisor:
            raise ValueError(f"{self.name}: budget {budget} is not divisible by {what} {divisor}")

    async def run(self, problem: Problem, budget: int, rng: np.random.Generator) -> Result:
        self.check_budget(budget)
        if not isinstance(rng, np.random.Generator):
            raise TypeError("rng must be a numpy.random.Generator (pass np.random.default_rng(seed))")
        ctx = self.context(problem, rng)
        result = await self._run(ctx, int(budget))
        cost = ctx.finish_cost(_n_params(self.policy), _n_params(self.prm))
        return dataclasses.replace(result, cost=cost)

    def solve(self, problem: Problem, budget: int, seed: int | np.random.Generator = 0) -> Result:
        """Synchronous wrapper for scripts and notebooks without a running event loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError(f"{self.name}.solve() was called inside a running event loop; use `await strategy.run(...)`")
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        with asyncio.Runner() as runner:
            return runner.run(self.run(problem, budget, rng))

    def with_backends(self, policy=None, prm=None, outcome=None) -> "Strategy":
        """A copy of this strategy using other backends (e.g. batched wrappers)."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.policy = policy or self.policy
        clone.prm = prm or self.prm
        clone.outcome = outcome or self.outcome
        return clone

    # -- for subclasses -------------------------------------------------------------
    @abstractmethod
    async def _run(self, ctx: RunContext, budget: int) -> Result: ...

    def context(self, problem: Problem, rng: np.random.Generator) -> RunContext:
        aggregation = getattr(self.params, "aggregation", "last")
        return RunContext(problem, self.policy, self.prm, self.outcome, self.format, self.sampling, rng, aggregation)

    def result(
        self,
        ctx: RunContext,
        budget: int,
        particles: Sequence[Particle | None],
        weights: Sequence[float],
        *,
        selection: str = "argmax",
        scores: Sequence[float] | None = None,
        **fields: Any,
    ) -> Result:
        """Build a Result from final particles and their (unnormalised ≥ 0) weights; ``scores``
        default to each particle's latest PRM score in this run (``RunContext.scored``), if any."""
        if scores is None and ctx.scored:
            scores = [ctx.scored.get(p.text, math.nan) if p is not None else math.nan for p in particles]
        cands = candidates(particles, weights, scores)
        if not cands:
            failure = ctx.failure_message()  # the backend failed every time: an error, not a wrong answer
            message = fields.pop("message", "no candidate survived")
            if failure is None and ctx.failures:
                message += f"; {sum(ctx.failures.values())} continuation(s) failed, e.g. {ctx.top_failure()}"
            return Result(ctx.problem, self.name, budget, None, None, (), ctx.cost,
                          status="error" if failure else "all_dead", message=failure or message, **fields)
        best = choose(cands, selection, self.answer_key, ctx.rng)
        return Result(ctx.problem, self.name, budget, best.answer, best.text, tuple(cands), ctx.cost, **fields)


class PooledStrategy(Strategy):
    """A method whose answer is a function of N i.i.d. whole samples (and their scores).

    The pool is one macro-step of the core: N particles, each proposed a whole solution
    (one request with k = N), weighed by ``Outcome(score)`` (ℓ = log r, r the outcome
    score) for scored methods and not at all (``Unweighted``) otherwise, never resampled.
    ``run`` draws the pool and calls :meth:`select`; the bench instead draws one pool of
    the largest budget N and evaluates every budget b ≤ N on random size-b subsets of it,
    as is standard for the best-of-N family."""

    scored: ClassVar[bool] = False  # whether select() reads PRM/outcome scores

    @classmethod
    def pool_key(cls, params: dict) -> str:
        """What a pool drawn for this method needs beyond plain samples ("" if nothing), e.g.
        ``"top_logprobs=20"``: the bench shares a pool only among methods with the same key."""
        return ""

    async def _run(self, ctx: RunContext, budget: int) -> Result:
        particles, scores = await self.sample_pool(ctx, budget)
        return self.select(ctx, budget, particles, scores)

    async def sample_pool(self, ctx: RunContext, n: int) -> tuple[list[Particle | None], np.ndarray | None]:
        """n whole samples (``None`` where one failed), and their scores r = e^ℓ (NaN where a
        sample or its scoring failed; ``None`` for an unscored method)."""
        if n == 0:
            return [], (np.zeros(0) if self.scored else None)
        observe = Outcome(ctx.outcome_scores) if self.scored else Unweighted()
        kernel = SMC(ctx.propose_whole, observe, max_steps=1, schedule="never")
        smc = await drive(kernel, [Particle(ctx.problem)] * n, ctx.rng)
        alive = smc.log_weights > -math.inf
        particles = [s if ok else None for s, ok in zip(smc.states, alive)]
        if not self.scored:
            return particles, None
        return particles, np.where(alive, np.exp(smc.log_weights), np.nan)

    @abstractmethod
    def select(self, ctx: RunContext, budget: int, particles: Sequence[Particle | None],
               scores: np.ndarray | None) -> Result:
        """The result for this pool of samples."""


def candidates(particles, weights, scores=None) -> list[Candidate]:
    """Candidates with weights normalised over the particles that exist and weigh > 0."""
    w = np.array([wi if p is not None and np.isfinite(wi) and wi > 0 else 0.0 for p, wi in zip(particles, weights)])
    if w.sum() <= 0:
        return []
    w = w / w.sum()
    out = []
    for i, p in enumerate(particles):
        if p is None or w[i] == 0:
            continue
        s = None if scores is None or math.isnan(float(scores[i])) else float(scores[i])
        out.append(Candidate(p.text, answer_of(p), float(w[i]), s, p))
    return out


def choose(cands: Sequence[Candidate], selection: str, key: Callable, rng: np.random.Generator) -> Candidate:
    """The chosen candidate: highest weight, one drawn ∝ weight, or the heaviest answer group.

    Ties are broken by ``rng`` (uniformly among the tied)."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    w = np.array([c.weight for c in cands])
    if selection == "sample":
        return cands[int(rng.choice(len(cands), p=w / w.sum()))]
    if selection == "argmax":
        top = np.flatnonzero(w >= w.max() * (1 - 1e-12))
        return cands[int(top[rng.integers(top.size)])]
    totals = vote_totals(cands, key)
    if not totals:
        return choose(cands, "argmax", key, rng)
    best = max(totals.values())
    tied = [k for k, v in totals.items() if v >= best * (1 - 1e-12)]
    winner = tied[int(rng.integers(len(tied)))]
    members = [c for c in cands if key(c.answer) == winner]
    return max(members, key=lambda c: c.weight)


def vote_totals(cands: Sequence[Candidate], key: Callable) -> dict[Any, float]:
    """The total weight of each answer (grouped by ``key``; candidates without an answer vote for none)."""
    totals: dict[Any, float] = {}
    for c in cands:
        k = key(c.answer)
        if k is not None:
            totals[k] = totals.get(k, 0.0) + c.weight
    return totals


def _n_params(backend) -> int | None:
    caps = getattr(backend, "capabilities", None)
    return getattr(caps, "n_parameters", None)


def make_strategy(name: str, policy: Generator, prm: ProcessRewardModel | None = None, **kwargs: Any) -> Strategy:
    """The strategy registered as ``name``, with validated parameters."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name](policy, prm, **kwargs)
