"""Batching backend calls across concurrent tasks: one mechanism for the bench and the server.

Many tasks (problems of a bench phase, requests to the server) run concurrently, each
awaiting its own backend calls. They share one :class:`Coalescer`, and each backend sits
behind a :class:`BatchedGenerator` / :class:`BatchedPRM` / :class:`BatchedOutcome` with
the same protocol, so strategies never know they are batched.

When a call is sent
-------------------
A submitted call waits in its *kind*'s queue (``policy``, ``prm``, ``outcome``). The
queue is sent as one backend call covering every waiting request when

1. every member task is waiting on some coalesced call (a structural barrier, not a
   timer: the round is complete), or the event loop went a full iteration without a new
   submission (some member awaits other I/O, so the barrier cannot be reached: batching
   degrades gracefully instead of deadlocking); and
2. for a *serial* backend (a model on this machine, which runs one call at a time: no
   ``Capabilities.server_batching``), no call of that kind is in flight. Calls that arrive
   while one is in flight wait and are sent together as soon as it returns (continuous
   batching at the granularity of a backend call: the server's requests join and leave
   at any time).

A backend that batches concurrent calls itself (an HTTP server with continuous batching:
``Capabilities.server_batching``) is called directly by each task instead: one
population call would return only when its slowest request does, holding every task at
the pace of the slowest step. Called per task, tasks drift apart, one task's scoring
overlaps another's generation (policy and PRM servers both stay busy), and the server
keeps its batch full.

Failure isolation (the one path): when a combined call fails, each waiting task's
requests are sent again on their own (one after another for a serial backend), so a
failure reaches only the tasks whose own requests fail. A task cancelled while waiting
(a client gone) is left out of the call.

``Coalescer.calls`` counts the backend calls made per kind (retries included).

Races (:class:`itscale.protocols.Racer`): a :class:`BatchedGenerator` whose backend has
``race`` offers it too (one whose backend has none has no ``race`` either, so callers fall
back to ``generate_steps``). A local backend that also has ``race_many`` (several races in one
lock-step batch, each ended by its own first finish: ``HFGenerator.race_many``) gets the
concurrent tasks' races coalesced into one call, in their own queue, counted in
``Coalescer.calls["policy"]``; any other backend gets each race as it comes (a server batches
them itself).
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
class _Queue:
    call: BackendCall
    serial: bool
    counted: str  # the kind its calls count as in ``Coalescer.calls``
    waiting: list[_Pending] = field(default_factory=list)
    busy: bool = False


@dataclass
class Coalescer:
    active: int = 0
    waiting: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    _queues: dict[str, _Queue] = field(default_factory=dict)
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
            if any(q.waiting for q in self._queues.values()):
                self._schedule_check()

    async def submit(self, kind: str, call: BackendCall, items: Sequence[Any], serial: bool = False,
                     counted: str | None = None) -> list[Any]:
        """``call(items)``'s results, sent together with the other tasks' waiting calls of ``kind``
        (counted in :attr:`calls` as ``counted``, default ``kind``)."""
        future = asyncio.get_running_loop().create_future()
        queue = self._queues.get(kind)
        if queue is None:
            queue = self._queues[kind] = _Queue(call, serial, counted or kind)
        queue.waiting.append(_Pending(list(items), future))
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
        if not any(q.waiting for q in self._queues.values()):
            return
        if self.waiting >= self.active or self._submissions == seen:
            # everyone is waiting, or nothing new arrived for a whole iteration
            # (some member is awaiting other I/O): send what we have
            for kind, queue in self._queues.items():
                if queue.waiting and not (queue.serial and queue.busy):
                    self._send(kind, queue)
        else:
            self._schedule_check()

    def _send(self, kind: str, queue: _Queue) -> None:
        batch, queue.waiting = queue.waiting, []
        queue.busy = True
        asyncio.get_running_loop().create_task(self._run(kind, queue, batch))

    async def _run(self, kind: str, queue: _Queue, batch: list[_Pending]) -> None:
        try:
            await self._dispatch(kind, queue, batch)
        finally:
            queue.busy = False
            if queue.serial and queue.waiting:  # arrived during the call: they have waited long enough
                self._send(kind, queue)

    async def _dispatch(self, kind: str, queue: _Queue, batch: list[_Pending]) -> None:
        batch = [p for p in batch if not p.future.done()]  # a cancelled caller is left out
        if not batch:
            return
        items = [item for p in batch for item in p.items]
        self.calls[queue.counted] = self.calls.get(queue.counted, 0) + 1
        try:
            results = await queue.call(items)
            if len(results) != len(items):
                raise RuntimeError(f"backend returned {len(results)} results for {len(items)} requests")
        except (KeyboardInterrupt, SystemExit, asyncio.CancelledError) as err:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(err)
            raise
        except Exception as err:
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(err)
                return
            # Isolate the failure: each waiting task retries its own requests alone, so
            # one task's bad request (or a transient error) fails that task only.
            if queue.serial:
                for p in batch:
                    await self._dispatch(kind, queue, [p])
            else:
                await asyncio.gather(*(self._dispatch(kind, queue, [p]) for p in batch))
            return
        start = 0
        for p in batch:
            if not p.future.done():
                p.future.set_result(list(results[start : start + len(p.items)]))
            start += len(p.items)


class Wrapper:
    """A backend wrapper: ``capabilities`` and ``clear_cache`` are those of ``inner``.

    A wrapper that can pass races on defines ``_race`` (and ``_race_many``, for several races
    in one call) and calls :meth:`_offer_race` once ``inner`` is set: the wrapper then has
    ``race`` (``race_many``) exactly when ``inner`` has it.
    """

    inner: Any

    def _offer_race(self) -> None:
        """Expose ``race`` (bound to ``_race``) only when ``inner`` races, and ``race_many`` when
        ``inner`` has it and this wrapper passes it on: an optional capability is an instance
        attribute, so ``isinstance(wrapper, Racer)`` is never claimed falsely."""
        if hasattr(self.inner, "race"):
            self.race = self._race
        if hasattr(self.inner, "race_many") and hasattr(self, "_race_many"):
            self.race_many = self._race_many

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    def clear_cache(self) -> None:
        clear = getattr(self.inner, "clear_cache", None)
        if clear is not None:
            clear()


def _server_batching(backend: Any) -> bool:
    return bool(getattr(getattr(backend, "capabilities", None), "server_batching", False))


@dataclass
class BatchedGenerator(Wrapper):
    inner: Any
    coalescer: Coalescer

    def __post_init__(self) -> None:
        self._offer_race()

    async def generate_steps(self, requests):
        if _server_batching(self.inner):
            return await self.inner.generate_steps(requests)
        return await self.coalescer.submit("policy", self.inner.generate_steps, requests, serial=True)

    async def _race(self, request):
        if _server_batching(self.inner):
            return await self.inner.race(request)
        if hasattr(self.inner, "race_many"):  # the local model runs the waiting races in one batch
            (outcome,) = await self.coalescer.submit("race", self.inner.race_many, [request], serial=True,
                                                     counted="policy")
            return outcome
        self.coalescer.calls["policy"] = self.coalescer.calls.get("policy", 0) + 1  # a call of the local model
        return await self.inner.race(request)


@dataclass
class BatchedPRM(Wrapper):
    inner: Any
    coalescer: Coalescer

    async def score_steps(self, requests):
        if _server_batching(self.inner):
            return await self.inner.score_steps(requests)
        return await self.coalescer.submit("prm", self.inner.score_steps, requests, serial=True)


@dataclass
class BatchedOutcome(Wrapper):
    inner: Any
    coalescer: Coalescer

    async def score_final(self, requests):
        return await self.coalescer.submit("outcome", self.inner.score_final, requests,
                                           serial=not _server_batching(self.inner))
