"""Run one strategy over many problems concurrently, batched across the population.

Each problem runs as its own task with its own random stream; all of them share a
:class:`~itscale.strategies.batching.Coalescer`, so each round of the method is a
single policy call and a single scorer call covering every live particle of every
problem in flight. A problem whose run raises gets a ``status="error"`` result; the
others go on.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Callable, Sequence

import numpy as np

from ..types import Cost, Problem, Result
from .base import Strategy
from .batching import BatchedGenerator, BatchedOutcome, BatchedPRM, Coalescer


def problem_seed(seed: int, problem_id: str) -> int:
    """A stable 63-bit seed for one problem: the same whatever else is in the batch."""
    digest = hashlib.blake2b(f"{seed}:{problem_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


async def run_many(
    strategy: Strategy,
    problems: Sequence[Problem],
    budget: int,
    seed: int = 0,
    concurrency: int | None = None,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Results in the order of ``problems``; ``concurrency`` bounds problems in flight."""
    strategy.check_budget(budget)
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency!r}")
    coalescer = Coalescer()
    batched = strategy.with_backends(
        BatchedGenerator(strategy.policy, coalescer),
        BatchedPRM(strategy.prm, coalescer) if strategy.prm is not None else None,
        BatchedOutcome(strategy.outcome, coalescer) if strategy.outcome is not None else None,
    )
    gate = asyncio.Semaphore(concurrency or max(1, len(problems)))

    async def one(problem: Problem) -> Result:
        async with gate, coalescer.member():
            rng = np.random.default_rng(problem_seed(seed, problem.id))
            try:
                result = await batched.run(problem, budget, rng)
            except Exception as err:  # one problem's failure never ends the batch
                result = Result(problem, strategy.name, budget, None, None, (), Cost(), status="error",
                                message=f"{type(err).__name__}: {err}")
        if on_result is not None:
            on_result(result)
        return result

    return list(await asyncio.gather(*(one(p) for p in problems)))
