"""The bench's backends: the policy and PRM its configuration names, timed.

Loading is :func:`itscale.backends.load_policy` / :func:`~itscale.backends.load_prm` (the
one loader bench, serve and Python share); this module adds the bench's wall-time
accounting (:class:`Timed`) and a warm-up call, so that no phase pays for first-call
set-up. Loading is deferred until a sweep has work to do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..backends import describe, load_policy, load_prm
from ..strategies.batching import Wrapper
from .config import BenchConfig


class Timed(Wrapper):
    """Wraps a generator or PRM and adds up the wall time during which at least one of its
    calls is in flight (concurrent calls to a server count once). ``clear_cache``
    forgets cached prefixes, so that one phase's cost does not depend on the last one's."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0
        self._in_flight, self._since = 0, 0.0
        self._offer_race()  # a race is timed as any call (only when ``inner`` races)

    async def _timed(self, call):
        if self._in_flight == 0:
            self._since = time.perf_counter()
        self._in_flight += 1
        try:
            return await call
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self.seconds += time.perf_counter() - self._since

    async def generate_steps(self, requests):
        return await self._timed(self.inner.generate_steps(requests))

    async def score_steps(self, requests):
        return await self._timed(self.inner.score_steps(requests))

    async def _race(self, request):
        return await self._timed(self.inner.race(request))

    async def _race_many(self, requests):
        return await self._timed(self.inner.race_many(requests))


@dataclass
class Backends:
    policy: Timed
    prm: Timed | None
    description: dict


def load_backends(config: BenchConfig) -> Backends:
    """Load the policy (and PRM) the configuration names, timed and warmed up."""
    fmt = config.step_format()
    policy = load_policy(config.policy)
    description = {"policy": describe(config.policy, policy)}
    prm = load_prm(config.prm, delimiter=fmt.delimiter)
    if prm is not None:
        description["prm"] = describe(config.prm, prm)
    backends = Backends(Timed(policy), Timed(prm) if prm is not None else None, description)
    warm_up(backends, fmt)
    return backends


def warm_up(backends: Backends, fmt) -> None:
    """One tiny call to each local backend, so that no phase's wall time pays for first-call set-up."""
    from ..types import Problem, SamplingParams, ScoreRequest, StepRequest

    problem = Problem("warm-up", "Start at 1. Apply in order: +1.")
    gen = getattr(backends.policy.inner, "generate_steps_sync", None)
    if gen is not None:
        gen([StepRequest(problem, (), 2, SamplingParams(max_step_tokens=4, seed=0), (fmt.delimiter,))])
        backends.policy.clear_cache()
    score = getattr(backends.prm.inner, "score_steps_sync", None) if backends.prm is not None else None
    if score is not None:
        score([ScoreRequest(problem, ("1+1=2" + fmt.delimiter,))])
        backends.prm.clear_cache()
