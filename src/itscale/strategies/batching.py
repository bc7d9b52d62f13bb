"""Population batching across problems: one backend call per round, not per problem.

Many problems run as concurrent tasks, each awaiting its own backend calls. The
:class:`Coalescer` holds each call until every active problem task is waiting on
it (a structural barrier, not a timer), then issues a single backend call per kind
covering all pending requests and hands each task its slice of the results.

If a task awaits something that is not a coalesced call (its own I/O, a sleep),
the barrier cannot be reached; the coalescer then flushes once the event loop has
gone a full iteration without a new submission, so batching degrades gracefully
instead of deadlocking.

A backend that batches concurrent calls itself (an HTTP server with continuous
batching: ``Capabilities.server_batching``) is called directly by each task instead:
one population call would return only when its slowest request does, holding every
problem at the pace of the slowest step. Called per problem, problems drift apart,
one problem's scoring overlaps another's generation (policy and PRM servers both stay
busy), and the server keeps its batch full.

``BatchedGenerator`` / ``BatchedPRM`` / ``BatchedOutcome`` wrap real backends with
the same protocols, so strategies never know they are batched. When a combined call
fails, each waiting task's requests are sent again on their own, so a failure reaches
only the tasks whose own requests fail.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

from ..types import Capabilities

BackendCall = Callable[[list[Any]], Awaitable[list[Any]]]


@dataclass
class _Pending:
    items: list[Any]
    future: asyncio.Future


@dataclass
class Coalescer:
    active: int = 0
    waiting: int = 0
    flushes: dict[str, int] = field(default_factory=dict)
    _pending: dict[str, tuple[BackendCall, list[_Pending]]] = field(default_factory=dict)
    _check_scheduled: bool = False
    _submissions: int = 0

    @asynccontextmanager
    async def member(self):
        """Register the current task as a participant for the duration of the block."""
        self.active += 1
        try:
            yield self
        finally:
            self.active -= 1
            if self._pending:
                self._schedule_check()

    async def submit(self, kind: str, call: BackendCall, items: Sequence[Any]) -> list[Any]:
        future = asyncio.get_running_loop().create_future()
        _, queue = self._pending.setdefault(kind, (call, []))
        queue.append(_Pending(list(items), future))
        self.waiting += 1
        self._submissions += 1
        self._schedule_check()
        try:
            return await future
        finally:
            self.waiting -= 1

    def _schedule_check(self) -> None:
        # Decide on the next loop iteration, after every task that is already
        # runnable has had its turn (and so had the chance to submit too).
        if not self._check_scheduled:
            self._check_scheduled = True
            asyncio.get_running_loop().call_soon(self._check, self._submissions)

    def _check(self, seen: int) -> None:
        self._check_scheduled = False
        if not self._pending:
            return
        if self.waiting >= self.active or self._submissions == seen:
            # everyone is waiting, or nothing new arrived for a whole iteration
            # (some member is awaiting other I/O): send what we have
            self._flush()
        else:
            self._schedule_check()

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        for kind, (call, queue) in pending.items():
            self.flushes[kind] = self.flushes.get(kind, 0) + 1
            asyncio.get_running_loop().create_task(self._dispatch(call, queue))

    @staticmethod
    async def _dispatch(call: BackendCall, queue: list[_Pending]) -> None:
        items = [item for p in queue for item in p.items]
        try:
            results = await call(items)
            if len(results) != len(items):
                raise RuntimeError(f"backend returned {len(results)} results for {len(items)} requests")
        except (KeyboardInterrupt, SystemExit, asyncio.CancelledError) as err:
            for p in queue:
                if not p.future.done():
                    p.future.set_exception(err)
            raise
        except Exception as err:
            if len(queue) == 1:
                if not queue[0].future.done():
                    queue[0].future.set_exception(err)
                return
            # Isolate the failure: each waiting task retries its own requests alone, so
            # one problem's bad request (or a transient error) fails that problem only.
            await asyncio.gather(*(Coalescer._dispatch(call, [p]) for p in queue))
            return
        start = 0
        for p in queue:
            if not p.future.done():
                p.future.set_result(list(results[start : start + len(p.items)]))
            start += len(p.items)


class Wrapper:
    """A backend wrapper: ``capabilities`` and ``clear_cache`` are those of ``inner``."""

    inner: Any

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    def clear_cache(self) -> None:
        clear = getattr(self.inner, "clear_cache", None)
        if clear is not None:
            clear()


@dataclass
class BatchedGenerator(Wrapper):
    inner: Any
    coalescer: Coalescer

    async def generate_steps(self, requests):
        if self.capabilities.server_batching:
            return await self.inner.generate_steps(requests)
        return await self.coalescer.submit("policy", self.inner.generate_steps, requests)


@dataclass
class BatchedPRM(Wrapper):
    inner: Any
    coalescer: Coalescer

    async def score_steps(self, requests):
        if self.capabilities.server_batching:
            return await self.inner.score_steps(requests)
        return await self.coalescer.submit("prm", self.inner.score_steps, requests)


@dataclass
class BatchedOutcome:
    inner: Any
    coalescer: Coalescer

    async def score_final(self, requests):
        return await self.coalescer.submit("outcome", self.inner.score_final, requests)
