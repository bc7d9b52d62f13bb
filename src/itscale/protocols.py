"""The contracts that backends implement (docs/architecture.md §3).

Every call takes a *list* of requests covering many particles of many problems,
so that a runner can batch a whole population into one backend call. Backends
declare what they can do in ``capabilities`` instead of failing late.

Whole solutions are requested with ``StepRequest(stop=())``: one method,
``generate_steps``, serves both step-by-step and full-solution sampling.

Every rule a backend must keep is written as a check in :mod:`itscale.testing.contracts`
(``GeneratorContract``, ``PRMContract``); a backend's tests subclass those suites.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from .types import Capabilities, ScoreRequest, Step, StepRequest, StepScores


@runtime_checkable
class Generator(Protocol):
    """A policy backend: k sampled continuations per request, in request order."""

    capabilities: Capabilities

    async def generate_steps(self, requests: Sequence[StepRequest]) -> list[list[Step]]: ...


@runtime_checkable
class ProcessRewardModel(Protocol):
    """Per-step probabilities that each step so far is correct, in (0, 1)."""

    capabilities: Capabilities

    async def score_steps(self, requests: Sequence[ScoreRequest]) -> list[StepScores]: ...


@runtime_checkable
class OutcomeScorer(Protocol):
    """One score per complete solution (a verifier, an ORM, unit tests)."""

    async def score_final(self, requests: Sequence[ScoreRequest]) -> list[float]: ...
