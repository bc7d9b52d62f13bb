"""Bounded concurrency with a queue, and back-pressure.

At most ``max_running`` requests run at once and at most ``max_queue`` more wait
for a slot, first come first served. A request that finds both full is refused at
once with 429 and a ``Retry-After`` header (never queued without bound); so is a
request whose API key already has its ``max_running`` requests in the server.

``Retry-After`` estimates when a slot frees up: the mean running time of recent
requests (an exponential moving average, α = 0.2) × (requests waiting + 1) ÷
``max_running``, rounded up and clamped to [1, 60] seconds.

A :class:`Ticket` is taken when the request is admitted and released exactly once,
whatever happens to it (finished, failed, timed out, cancelled while waiting).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time

from .errors import ApiError

_ALPHA = 0.2


class Admission:
    def __init__(self, max_running: int, max_queue: int):
        if max_running < 1 or max_queue < 0:
            raise ValueError(f"need max_running >= 1 and max_queue >= 0, got {max_running}, {max_queue}")
        self.max_running, self.max_queue = max_running, max_queue
        self.running = 0
        self.waiting: dict[int, "Ticket"] = {}
        self.per_key: dict[str, int] = {}
        self.mean_seconds: float | None = None
        self._slots: asyncio.Semaphore | None = None
        self._numbers = itertools.count()

    @property
    def slots(self) -> asyncio.Semaphore:
        if self._slots is None:  # created inside the running loop
            self._slots = asyncio.Semaphore(self.max_running)
        return self._slots

    def retry_after(self) -> int:
        per_request = self.mean_seconds if self.mean_seconds is not None else 1.0
        return max(1, min(60, math.ceil(per_request * (len(self.waiting) + 1) / self.max_running)))

    def admit(self, key: str, key_limit: int | None) -> "Ticket":
        """A ticket, or a 429 when the server (or the key's share of it) is full."""
        if self.running + len(self.waiting) >= self.max_running + self.max_queue:
            wait = self.retry_after()
            raise ApiError(429, f"the server is at capacity ({self.running} running, {len(self.waiting)} waiting); "
                                f"retry after {wait} s", None, "server_busy", headers={"Retry-After": str(wait)})
        if key_limit is not None and self.per_key.get(key, 0) >= key_limit:
            wait = self.retry_after()
            raise ApiError(429, f"this API key already has {key_limit} request(s) in progress (its max_running); "
                                f"retry after {wait} s", None, "key_busy", headers={"Retry-After": str(wait)})
        self.per_key[key] = self.per_key.get(key, 0) + 1
        ticket = Ticket(self, key, next(self._numbers))
        self.waiting[ticket.number] = ticket
        return ticket

    def _finished(self, seconds: float) -> None:
        self.mean_seconds = seconds if self.mean_seconds is None else (1 - _ALPHA) * self.mean_seconds + _ALPHA * seconds


class Ticket:
    """One admitted request's place: waiting, then running, then released."""

    def __init__(self, admission: Admission, key: str, number: int):
        self.admission, self.key, self.number = admission, key, number
        self.state = "waiting"
        self.admitted = time.perf_counter()
        self.started: float | None = None

    @property
    def position(self) -> int:
        """Requests ahead of this one in the queue (0: next)."""
        return sum(1 for n in self.admission.waiting if n < self.number)

    @property
    def queued_seconds(self) -> float:
        return (self.started or time.perf_counter()) - self.admitted

    async def start(self) -> None:
        """Wait for a running slot."""
        adm = self.admission
        await adm.slots.acquire()
        if self.state != "waiting":  # released while waiting (cannot normally happen)
            adm.slots.release()
            raise asyncio.CancelledError()
        self.state, self.started = "running", time.perf_counter()
        del adm.waiting[self.number]
        adm.running += 1

    def release(self) -> None:
        """Give the place back (idempotent)."""
        adm = self.admission
        if self.state == "waiting":
            adm.waiting.pop(self.number, None)
        elif self.state == "running":
            adm.running -= 1
            adm.slots.release()
            adm._finished(time.perf_counter() - self.started)
        else:
            return
        self.state = "released"
        left = adm.per_key.get(self.key, 1) - 1
        if left:
            adm.per_key[self.key] = left
        else:
            adm.per_key.pop(self.key, None)
