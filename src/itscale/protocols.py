"""The contracts that backends implement (docs/architecture.md §3).

Every call takes a *list* of requests covering many particles of many problems,
so that a runner can batch a whole population into one backend call. Backends
declare what they can do in ``capabilities`` instead of failing late.

Whole solutions are requested with ``StepRequest(stop=())``: one method,
``generate_steps``, serves both step-by-step and full-solution sampling.

A backend may offer more than the contract: :class:`Racer` (``race``: sample ``k``
continuations, keep the first to finish, stop the rest) is such an optional capability;
callers check ``isinstance(policy, Racer)`` and fall back to ``generate_steps`` otherwise.

Every rule a backend must keep is written as a check in :mod:`itscale.testing.contracts`
(``GeneratorContract``, ``PRMContract``); a backend's tests subclass those suites.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from .types import (
    Capabilities,
    RaceOutcome,
    ScoreRequest,
    Step,
    StepRequest,
    StepScores,
)


@runtime_checkable
class Generator(Protocol):
    """A policy backend: k sampled continuations per request, in request order."""

    capabilities: Capabilities

    async def generate_steps(self, requests: Sequence[StepRequest]) -> list[list[Step]]: ...


@runtime_checkable
class Racer(Protocol):
    """A policy that races ``request.k`` samples of one request and keeps the first to finish.

    ``race`` samples the ``k`` continuations concurrently (usually whole solutions,
    ``stop=()``; step requests work the same), returns as soon as one finishes (a stop
    string, end-of-sequence, or its token limit) and stops generating the others. Each
    sample is drawn as ``generate_steps`` would draw it, so the winner is a valid
    continuation; which one wins is what the race decides (fewest tokens on a local model
    decoding in lock-step, earliest reply on a server). A sample that fails does not win;
    only when all ``k`` fail is the winner a failed step (``finish_reason="error"``)
    carrying the error. ``k < 1`` is a ``ValueError``, and so is ``params.stop_below``
    (:func:`check_raceable`).

    Optional: a wrapper exposes ``race`` only when what it wraps has it, so
    ``isinstance(policy, Racer)`` (or ``hasattr(policy, "race")``) tells a caller whether to
    fall back to ``generate_steps``.
    """

    async def race(self, request: StepRequest) -> RaceOutcome: ...


def check_raceable(request: StepRequest) -> None:
    """``ValueError`` for a race request with ``params.stop_below``: a sample stopped for low
    confidence ended without an answer, so it cannot be a race's first to finish."""
    if request.params.stop_below is not None:
        raise ValueError("race does not take SamplingParams.stop_below (a sample stopped for low confidence has no "
                         "answer, it cannot win); use generate_steps")


@runtime_checkable
class ProcessRewardModel(Protocol):
    """Per-step probabilities that each step so far is correct, in (0, 1)."""

    capabilities: Capabilities

    async def score_steps(self, requests: Sequence[ScoreRequest]) -> list[StepScores]: ...


@runtime_checkable
class OutcomeScorer(Protocol):
    """One score per complete solution (a verifier, an ORM, unit tests)."""

    async def score_final(self, requests: Sequence[ScoreRequest]) -> list[float]: ...
