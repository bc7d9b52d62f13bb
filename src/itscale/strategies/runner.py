"""Run one strategy over many problems concurrently, batched across the population.

Each problem runs as its own task with its own random stream; all of them share a
:class:`~itscale.strategies.batching.Coalescer`, so each round of the method is a
single policy call and a single scorer call covering every live particle of every
problem in flight (a backend that is a batching server is called per problem
instead, see :mod:`~itscale.strategies.batching`). A problem whose run raises gets a
``status="error"`` result; the others go on.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Awaitable, Callable, Sequence, TypeVar

import numpy as np

from ..types import Cost, Problem, Result
from .base import Strategy
from .batching import BatchedGenerator, BatchedOutcome, BatchedPRM, Coalescer

T = TypeVar("T")


def problem_seed(seed: int, problem_id: str) -> int:
    """A stable 63-bit seed for one problem: the same whatever else is in the batch."""
    digest = hashlib.blake2b(f"{seed}:{problem_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


async def map_batched(
    strategy: Strategy,
    problems: Sequence[Problem],
    job: Callable[[Strategy, Problem, np.random.Generator], Awaitable[T]],
    seed: int = 0,
    concurrency: int | None = None,
    on_done: Callable[[T], None] | None = None,
) -> list[T]:
    """``job(batched_strategy, problem, rng)`` for every problem, batched across problems.

    ``batched_strategy`` is ``strategy`` with its backends behind one shared coalescer;
    ``rng`` is the problem's own stream (:func:`problem_seed`). Results come back in the
    order of ``problems``; ``concurrency`` bounds problems in flight; ``on_done`` sees each
    result as soon as it is ready (e.g. to store it)."""
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency!r}")
    coalescer = Coalescer()
    batched = strategy.with_backends(
        BatchedGenerator(strategy.policy, coalescer),
        BatchedPRM(strategy.prm, coalescer) if strategy.prm is not None else None,
        BatchedOutcome(strategy.outcome, coalescer) if strategy.outcome is not None else None,
    )
    gate = asyncio.Semaphore(concurrency or max(1, len(problems)))

    async def one(problem: Problem) -> T:
        async with gate, coalescer.member():
            value = await job(batched, problem, np.random.default_rng(problem_seed(seed, problem.id)))
        if on_done is not None:
            on_done(value)
        return value

    return list(await asyncio.gather(*(one(p) for p in problems)))


async def run_many(
    strategy: Strategy,
    problems: Sequence[Problem],
    budget: int,
    seed: int = 0,
    concurrency: int | None = None,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """``strategy.run`` on every problem (see :func:`map_batched`); a problem whose run
    raises gets a ``status="error"`` result and the others go on."""
    strategy.check_budget(budget)

    async def solve(batched: Strategy, problem: Problem, rng: np.random.Generator) -> Result:
        try:
            return await batched.run(problem, budget, rng)
        except Exception as err:  # one problem's failure never ends the batch
            return Result(problem, strategy.name, budget, None, None, (), Cost(), status="error",
                          message=f"{type(err).__name__}: {err}")

    return await map_batched(strategy, problems, solve, seed, concurrency, on_result)
