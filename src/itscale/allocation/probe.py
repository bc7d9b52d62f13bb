"""The difficulty probe: k whole samples of a problem, their difficulty score and their vote.

:func:`run_probe` draws k whole solutions with one policy request (``ctx.sample_full(k)``, the
request's seed drawn from the run's random stream), reads each one's answer, scores them with
the PRM when the difficulty score is ``prm`` (one PRM call, the context's aggregation), and
returns the difficulty (:mod:`itscale.allocation.difficulty`), the samples' own answer
(:func:`~itscale.allocation.difficulty.vote`) and what the probe cost: the tokens it generated
and the PRM tokens it read, which the request that ran it is charged.

``ctx`` is a :class:`itscale.strategies.RunContext` (used through ``sample_full``,
``prm_scores`` and ``cost`` only; this package imports nothing from ``strategies``, which
imports it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..tasks.answers import answer_key as default_answer_key
from ..tasks.answers import extract_answer
from ..types import Particle
from .difficulty import SCORES, difficulty, vote


@dataclass(frozen=True)
class ProbeOutcome:
    """What one probe saw and spent."""

    difficulty: float
    particles: tuple[Particle | None, ...]  # the k samples (None: the sample failed)
    answers: tuple[str | None, ...]
    scores: tuple[float, ...] | None  # aggregated PRM scores (NaN: failed), for the ``prm`` score only
    chosen: int | None  # the sample that answers for the probe (None: no sample has an answer)
    generated_tokens: int
    prm_tokens: int

    @property
    def answer(self) -> str | None:
        return None if self.chosen is None else self.answers[self.chosen]

    @property
    def cost(self) -> float:
        """Generated plus PRM tokens, the bench's token cost."""
        return float(self.generated_tokens + self.prm_tokens)


async def run_probe(ctx: Any, samples: int, score: str,
                    key: Callable[[str | None], Any] = default_answer_key) -> ProbeOutcome:
    """Probe one problem with ``samples`` whole samples (module docstring)."""
    if score not in SCORES:
        raise ValueError(f"unknown difficulty score {score!r}; choose one of {', '.join(SCORES)}")
    if samples < 1:
        raise ValueError(f"the probe needs at least one sample, got {samples!r}")
    generated0, prm0 = ctx.cost.generated_tokens, ctx.cost.prm_tokens
    particles = list(await ctx.sample_full(samples))
    answers = [None if p is None else extract_answer(p.text) for p in particles]
    scores = None
    if score == "prm":
        alive = [p for p in particles if p is not None]
        values = iter((await ctx.prm_scores(alive)).tolist() if alive else [])
        scores = tuple(float("nan") if p is None else float(next(values)) for p in particles)
    return ProbeOutcome(
        difficulty=difficulty(score, answers, scores, key), particles=tuple(particles), answers=tuple(answers),
        scores=scores, chosen=vote(answers, scores, key),
        generated_tokens=int(ctx.cost.generated_tokens - generated0), prm_tokens=int(ctx.cost.prm_tokens - prm0))
