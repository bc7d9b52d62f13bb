"""Awaitable helpers that keep the core free of event-loop policy.

The SMC driver is a coroutine so that backends can batch real I/O across many
problems. Pure-numpy models never suspend, and :func:`run_sync` drives such a
coroutine to completion without an event loop (fast, and safe to call from code
that is itself inside a running loop). A coroutine that really waits on I/O must be
awaited by the caller's loop instead; ``run_sync`` says so rather than blocking.
"""

from __future__ import annotations

import inspect
from typing import Any, Awaitable, TypeVar

T = TypeVar("T")


async def resolve(value: "T | Awaitable[T]") -> T:
    """Await ``value`` if it is awaitable; return it unchanged otherwise."""
    if inspect.isawaitable(value):
        return await value
    return value


def run_sync(coro: Awaitable[T]) -> T:
    """Run a coroutine that never suspends (pure computation) and return its result."""
    if not inspect.iscoroutine(coro):
        raise TypeError(f"run_sync expects a coroutine, got {type(coro).__name__}")
    try:
        yielded: Any = coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError(
        f"run_sync: the coroutine suspended on {yielded!r}, so it does real asynchronous I/O; "
        "await it from an event loop instead (e.g. `await run_smc(...)`)."
    )
