r"""Particles that keep streaming: an OpenAI-compatible policy that does not re-send contexts.

Step-by-step search over HTTP re-sends every particle's whole context each round. The
server's prefix cache spares most of it, but only in whole KV blocks (vLLM: 16 tokens
on GPU, 32 at least on CPU), so every particle-step re-reads the unfinished tail of its
last block — on short steps more tokens than it generates. :class:`StreamingGenerator`
instead opens one streaming completion per particle *without* a stop string and reads
its steps off the stream as they arrive::

    POST {base}/completions  {"prompt": c, "stream": true, "logprobs": 1,
                              "max_tokens": room left in the context, no "stop", …}

Round t hands out the particle's next step (cut client-side at the request's stop
strings or ``max_step_tokens``, exactly as the server would cut it) while the server
goes on generating the step after it. When the next round asks for a continuation of
that particle's context, it is already there — no new request, no prefill. Only a
context that is asked for more often than streams stand at it (resampling duplicated
the particle) opens new streams, with the usual prompt.

Why this is exact: a stream's text after step t is a draw from the policy given the
context up to step t, made before and independently of anything the search decides
from the scores of steps ≤ t; handing it to one child of that particle is the same as
sampling that child afresh. A stream serves one particle at a time; each continuation
is used once.

Bookkeeping:

- Streams belong to a problem (``(id, prompt)``). A call that includes a problem's
  requests closes that problem's streams standing at contexts the call does not ask
  for (their particles were not selected): the connection is closed and vLLM aborts
  the request. Their read-but-unused tokens are added to the first returned step of
  the problem, so ``Step.tokens`` still counts everything generated.
- Look-ahead is bounded: a stream that has ``lookahead_steps`` unread complete steps
  (or ``lookahead_steps × max_step_tokens`` unread tokens) is closed; its unread steps
  remain usable. A particle whose stream ended (or failed) mid-step gets a fresh
  stream. A failing stream never fails the particle while a fresh request can
  serve it; a failing fresh request fails just that continuation (``finish_reason
  "error"``), as in :class:`~itscale.lm.openai.OpenAIGenerator`.
- At most ``max_streams`` streams are open; continuations beyond that, requests
  without stop strings (whole solutions gain nothing from streaming) and the chat API
  go through :class:`~itscale.lm.openai.OpenAIGenerator`'s merged requests.
- Steps from a stream report ``prompt_tokens = prefilled_tokens = 0``; a fresh
  stream's first step reports its context's tokens (local tokenizer), prefilled unknown.

Costs and limits: one HTTP connection per live particle (the server must admit as many
running sequences: vLLM's ``--max-num-seqs``), one server-sent event per token or so,
and no seeds (like merged requests, runs are not reproducible token for token). The
cut at a stop string is made on the decoded text: with a BPE tokenizer a token that
spans the stop string starts the next step with its remainder, where a fresh request
would re-tokenize the context — a sample from the same model, conditioned on tokens
rather than on re-tokenized text.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from ..types import Step, StepRequest
from .http import BackendError
from .openai import OpenAIGenerator

__all__ = ["StreamingGenerator"]


@dataclass(eq=False)
class _Stream:
    """One streaming completion and the unread part of what it generated."""

    owner: tuple[str, str]  # (problem id, problem prompt)
    sampling: tuple  # (temperature, top_p): what the server samples with
    context: str  # the prefix its next unread step continues
    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # unread (text, logprob, tokens)
    finish: str | None = None  # "eos" / "length" from the server, "closed" by us, "error"
    error: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    fresh_prompt_tokens: int = 0  # reported on the first step read from a fresh stream

    @property
    def unread_tokens(self) -> int:
        return sum(n for _, _, n in self.pieces)


def cut_step(pieces: Sequence[tuple[str, float, int]], stop: Sequence[str], max_tokens: int,
             finish: str | None) -> tuple[Step, int, tuple[str, float, int] | None] | None:
    """The next step in ``pieces``, as a server would end it: at the first stop string
    (kept in the text), after ``max_tokens`` tokens, or where the stream ended.

    Returns ``(step, pieces used, remainder)`` — the remainder is the text after a stop
    string inside the last piece used, to be read first next time (its token is counted
    in this step) — or ``None`` when the stream has not yet produced the whole step.
    """
    text, logprob, tokens = "", 0.0, 0
    for i, (piece, lp, n) in enumerate(pieces):
        start = max(len(text) - max(map(len, stop), default=0) + 1, 0)
        text += piece
        logprob += lp
        tokens += n
        hits = [(text.find(s, start), s) for s in stop]
        hits = [(at + len(s), s) for at, s in hits if at >= 0]
        if hits:
            end = min(hits)[0]
            rest = text[end:]
            return Step(text[:end], tokens, logprob=logprob, finish_reason="stop"), i + 1, (rest, 0.0, 0) if rest else None
        if tokens >= max_tokens:
            return Step(text, tokens, logprob=logprob, finish_reason="length"), i + 1, None
    if finish in ("eos", "length") and (pieces or finish == "eos"):
        return Step(text, tokens, logprob=logprob, finish_reason=finish), len(pieces), None
    return None


def split_tokens(text: str, tokens: Sequence[str], logprobs: Sequence[float | None]) -> list[tuple[str, float, int]]:
    """One event's text as one piece per token: a token's string where the text goes on
    with it, else ``""`` (special tokens such as end-of-sequence); leftover text joins the
    last piece."""
    pieces, at = [], 0
    for token, lp in zip(tokens, logprobs):
        if token and text.startswith(token, at):
            pieces.append((token, float(lp or 0.0), 1))
            at += len(token)
        else:
            pieces.append(("", float(lp or 0.0), 1))
    if not pieces:
        return [(text, 0.0, 0)] if text else []
    if at < len(text):
        piece, lp, n = pieces[-1]
        pieces[-1] = (piece + text[at:], lp, n)
    return pieces


class StreamingGenerator(OpenAIGenerator):
    """:class:`~itscale.lm.openai.OpenAIGenerator` whose particles keep streaming (see the
    module docstring). ``max_streams`` bounds the open streams; ``lookahead_steps`` is
    how many unread steps a stream may run ahead before it is closed. Other arguments
    as for OpenAIGenerator (``merge_prompts`` applies to the requests that do not stream)."""

    def __init__(self, *args: Any, max_streams: int = 1024, lookahead_steps: int = 2, **kwargs: Any):
        if max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {max_streams}")
        if lookahead_steps < 1:
            raise ValueError(f"lookahead_steps must be >= 1, got {lookahead_steps}")
        super().__init__(*args, **kwargs)
        self.max_streams, self.lookahead_steps = int(max_streams), int(lookahead_steps)
        self._at: dict[tuple, list[_Stream]] = {}  # (owner, sampling, context) -> streams standing there
        self._open = 0
        self._readers: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stream_stats = {"opened": 0, "reused": 0, "closed_unused": 0, "wasted_tokens": 0, "failed": 0}

    # -- public API -------------------------------------------------------------------
    async def generate_steps(self, requests: Sequence[StepRequest]) -> list[list[Step]]:
        requests = list(requests)
        self._bind_loop()
        streamable = [i for i, r in enumerate(requests) if r.k > 0 and r.stop and self.api == "completions"]
        if not streamable:
            return await super().generate_steps(requests)
        wasted = self._close_unwanted([requests[i] for i in streamable])
        self._prune()
        plans: dict[int, list[_Stream | None]] = {}
        for i in streamable:
            r = requests[i]
            here = self._at.pop(self._key(r, r.prefix), [])
            reused = here[: r.k]
            if here[r.k:]:
                self._at[self._key(r, r.prefix)] = here[r.k:]
            self.stream_stats["reused"] += len(reused)
            fresh = [self._open_stream(r) for _ in range(r.k - len(reused)) if self._open < self.max_streams]
            plans[i] = reused + fresh + [None] * (r.k - len(reused) - len(fresh))  # None: no stream to spare
        rest = [i for i in range(len(requests)) if i not in plans]
        overflow = {i: replace(requests[i], k=sum(s is None for s in plans[i])) for i in plans}
        overflow = {i: r for i, r in overflow.items() if r.k > 0}
        batch = [requests[i] for i in rest] + list(overflow.values())
        others, streamed = await asyncio.gather(
            super().generate_steps(batch) if batch else _nothing(),
            asyncio.gather(*(self._steps_of(requests[i], [s for s in plans[i] if s is not None]) for i in plans)))
        out: list[list[Step]] = [[] for _ in requests]
        for i, steps in zip(rest, others):
            out[i] = steps
        for i, steps in zip(plans, streamed):
            out[i] = steps
        for i, steps in zip(overflow, others[len(rest):]):
            out[i] = out[i] + steps
        for owner, tokens in wasted.items():  # generated but never used: charged to the problem's first step
            first = next((i for i in plans if _owner(requests[i]) == owner and out[i]), None)
            if first is not None:
                out[first][0] = replace(out[first][0], tokens=out[first][0].tokens + tokens)
        return out

    async def aclose(self) -> None:
        for task in list(self._readers):
            task.cancel()
        self._at.clear()
        await super().aclose()

    # -- streams ------------------------------------------------------------------------
    def _bind_loop(self) -> None:
        """Streams belong to the event loop that opened them; a new loop starts afresh."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._at.clear()
            self._readers.clear()
            self._open = 0
            self._loop = loop

    @staticmethod
    def _key(request: StepRequest, context: str) -> tuple:
        p = request.params
        return _owner(request), (p.temperature, p.top_p), context

    def _close_unwanted(self, requests: Sequence[StepRequest]) -> dict[tuple[str, str], int]:
        """Close the streams of these requests' problems that stand at contexts not asked
        for; their unread tokens by problem."""
        owners = {_owner(r) for r in requests}
        wanted = {self._key(r, r.prefix) for r in requests}
        wasted: dict[tuple[str, str], int] = {}
        for key in [k for k in self._at if k[0] in owners and k not in wanted]:
            for s in self._at.pop(key):
                wasted[s.owner] = wasted.get(s.owner, 0) + s.unread_tokens
                self.stream_stats["closed_unused"] += 1
                self._close(s)
        self.stream_stats["wasted_tokens"] += sum(wasted.values())
        return wasted

    def _prune(self) -> None:
        """Forget streams that can serve nothing (ended, nothing unread) and, past twice
        ``max_streams`` standing streams (problems that ended leave some), the oldest."""
        for key in list(self._at):
            live = [s for s in self._at[key] if s.finish is None or s.pieces]
            if live:
                self._at[key] = live
            else:
                del self._at[key]
        excess = sum(map(len, self._at.values())) - 2 * self.max_streams
        for key in list(self._at)[: max(excess, 0)]:
            for s in self._at.pop(key):
                self._close(s)

    def _open_stream(self, request: StepRequest) -> _Stream:
        p = request.params
        stream = _Stream(_owner(request), (p.temperature, p.top_p), request.prefix,
                         fresh_prompt_tokens=self._prompt_tokens(request))
        body = self._body(request, 1, None)
        for name in ("stop", "include_stop_str_in_output", "n"):
            body.pop(name, None)
        known = self.context_length
        body["max_tokens"] = max(known - stream.fresh_prompt_tokens, 1) if known else max(p.max_step_tokens * 64, 1024)
        self._open += 1
        self.stream_stats["opened"] += 1
        stream.task = asyncio.create_task(self._read(stream, body, request))
        self._readers.add(stream.task)
        stream.task.add_done_callback(lambda task: self._ended(stream, task))
        return stream

    def _ended(self, stream: _Stream, task: asyncio.Task) -> None:
        """A stream's reader finished (also when cancelled before it ran)."""
        self._readers.discard(task)
        self._open -= 1
        if stream.finish is None:
            stream.finish = "closed"
        stream.changed.set()

    async def _read(self, stream: _Stream, body: dict[str, Any], request: StepRequest) -> None:
        limit_steps = self.lookahead_steps
        limit_tokens = self.lookahead_steps * request.params.max_step_tokens
        stop = tuple(request.stop)
        try:
            while True:
                try:
                    async with contextlib.aclosing(self.http.stream("completions", body)) as events:
                        async for event in events:
                            for choice in event.get("choices") or ():
                                lp = choice.get("logprobs") or {}
                                stream.pieces += split_tokens(choice.get("text") or "", lp.get("tokens") or (),
                                                              lp.get("token_logprobs") or ())
                                reason = choice.get("finish_reason")
                                if reason is not None:
                                    stream.finish = "length" if reason == "length" else (
                                        "eos" if reason == "stop" else "error")
                                    if stream.finish == "error":
                                        stream.error = f"the server ended the stream with finish_reason={reason!r}"
                            stream.changed.set()
                            if stream.finish is None and self._ahead(stream, stop, limit_steps, limit_tokens):
                                stream.finish = "closed"
                                return
                    return
                except BackendError as err:
                    self._learn_context_length(err)
                    room = None if self.context_length is None else max(self.context_length - stream.fresh_prompt_tokens, 1)
                    if room is not None and body["max_tokens"] > room and not stream.pieces:
                        body["max_tokens"] = room  # asked past the context (as OpenAIGenerator learns it)
                        continue
                    if not self._drop_extensions(err) or stream.pieces:
                        raise
                    body.pop("add_special_tokens", None)
        except BackendError as err:
            stream.finish, stream.error = "error", str(err)
            self.stream_stats["failed"] += 1

    @staticmethod
    def _ahead(stream: _Stream, stop: Sequence[str], steps: int, tokens: int) -> bool:
        """Whether the stream has run far enough ahead of its reader to be closed."""
        if stream.unread_tokens >= tokens:
            return True
        text = "".join(piece for piece, _, _ in stream.pieces)
        return sum(text.count(s) for s in stop) >= steps

    def _close(self, stream: _Stream) -> None:
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()

    async def _steps_of(self, request: StepRequest, streams: list[_Stream]) -> list[Step]:
        return list(await asyncio.gather(*(self._next_step(request, s) for s in streams)))

    async def _next_step(self, request: StepRequest, stream: _Stream) -> Step:
        """The stream's next step (waiting for it); a fresh stream — or, past the stream
        limit, a plain request — when this one ended without one."""
        while True:
            got = cut_step(stream.pieces, request.stop, request.params.max_step_tokens, stream.finish)
            if got is not None:
                break
            if stream.finish is not None:  # ended mid-step: this particle starts afresh
                wasted = stream.unread_tokens
                self.stream_stats["wasted_tokens"] += wasted
                if stream.finish == "closed" and self._open < self.max_streams:
                    step = await self._next_step(request, self._open_stream(request))
                else:  # a failed stream (or no stream to spare): a plain request, with its retries
                    step = (await OpenAIGenerator.generate_steps(self, [replace(request, k=1)]))[0][0]
                return replace(step, tokens=step.tokens + wasted)
            stream.changed.clear()
            await stream.changed.wait()
        step, used, remainder = got
        del stream.pieces[:used]
        if remainder is not None:
            stream.pieces.insert(0, remainder)
        fresh, stream.fresh_prompt_tokens = stream.fresh_prompt_tokens, 0
        step = replace(step, prompt_tokens=fresh, prefilled_tokens=None if fresh else 0)
        stream.context = request.prefix + step.text
        if stream.finish is None or stream.pieces:  # it may serve the particle's next step
            self._at.setdefault(self._key(request, stream.context), []).append(stream)
        return step


def _owner(request: StepRequest) -> tuple[str, str]:
    return str(request.problem.id), request.problem.prompt


async def _nothing() -> list:
    return []
