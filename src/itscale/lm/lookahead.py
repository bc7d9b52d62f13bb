r"""Block-aligned look-ahead for step-by-step generation over HTTP (``Lookahead(generator, B)``).

:class:`Lookahead` wraps an :class:`~itscale.lm.openai.OpenAIGenerator` that uses the
completions API (``Lookahead(OpenAIGenerator(url, model, tokenizer=...), block=B)``)
and is itself a generator; ``B`` is the server's KV block size in tokens (vLLM: 16 on
GPU, 32 on CPU).

Why: a server's prefix cache (vLLM's) reuses KV only in whole blocks of ``B`` tokens. A
particle that stops at its step delimiter leaves the tail of its last block uncached,
so its next request re-prefills that tail — on short steps more tokens than it
generates. Here a particle's request does not stop at the delimiter: it generates up to
the next block boundary (``max_tokens`` chosen so that every token whose KV the server
computed fills whole blocks; at least ``B/2`` tokens), and the client cuts the step off
the text exactly as the server would have (first stop string, kept; or
``max_step_tokens`` tokens; or end of sequence / context). What follows the step is kept
as that particle's *look-ahead*:

- If the next round asks to continue the particle's context, its next step is read from
  the look-ahead — no request at all when the look-ahead holds a whole step; otherwise
  one request continues it, with a prompt that ends on a block boundary, so the server
  prefills one token instead of the tail.
- Exactness: the look-ahead is a draw from the policy given the context, made before
  anything is decided from the step's score. Each look-ahead serves one continuation (a
  particle duplicated by resampling gets a fresh continuation for its other copies).
- Look-ahead of the problem's particles that the next call does not continue (not
  selected) is dropped; its tokens are added to that call's first step of the problem,
  so ``Step.tokens`` still counts everything generated.
- It pays only where most particles go on. A problem whose kept look-ahead has been
  used less than half the time (beam search keeps one child in M, DVTS one in M) goes
  back to plain step requests that stop at the delimiter.
- Whole-solution requests (no stop string), requests that ask for top log-probabilities
  (``params.top_logprobs > 0``, and so every ``params.stop_below``), and every call of a
  generator with ``merge_prompts=1`` (seeded, one request per StepRequest), go to the
  generator as they are; so do races (``race``, offered when the generator has it;
  look-ahead is neither used nor kept for them).
- Look-ahead belongs to the request's problem *and* cache namespace
  (``StepRequest.cache_namespace``): a request never continues text generated for another
  namespace, and its merged requests carry only its namespace's ``cache_salt``.

Requests are merged into ``/completions`` prompt lists (one per distinct ``max_tokens``),
unseeded, as :class:`~itscale.lm.openai.OpenAIGenerator` merges them, through the
generator's :class:`~itscale.lm.completions.CompletionsClient`. A step's
``prompt_tokens`` is the context tokens sent on its behalf (local tokenizer), its
``prefilled_tokens`` unknown. The alignment counts the prompt's tokens with the local
tokenizer: right for a server that tokenizes the text the same way; otherwise it only
costs cache hits, never correctness. A BPE token that spans a stop string starts the
next step with its remainder (kept in the look-ahead); a request whose last step has a
``carry`` (made by a plain request) goes plain, so the generator reads the carry.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from typing import Protocol, Sequence

from ..types import Capabilities, RaceOutcome, Step, StepRequest
from .completions import CompletionsClient, OnClient, Sampling
from .http import BackendError

__all__ = ["Lookahead", "cut_step", "split_tokens"]

Piece = tuple[str, float, int]  # (text, log-probability, tokens)
MAX_LANES = 1 << 16  # look-aheads kept at most (problems that ended leave some behind)


def cut_step(pieces: Sequence[Piece], stop: Sequence[str], max_tokens: int,
             ended: str | None) -> tuple[Step, int, Piece | None] | None:
    """The next step in ``pieces``, as a server ends it: at the first stop string (kept),
    after ``max_tokens`` tokens, or where the text ended (``ended``: ``"eos"``/``"length"``).

    Returns ``(step, pieces used, remainder)`` — the remainder is the text after a stop
    string inside the last piece used (its token is counted in this step) — or ``None``
    while the text holds no whole step yet.
    """
    text, logprob, tokens = "", 0.0, 0
    longest = max(map(len, stop), default=0)
    for i, (piece, lp, n) in enumerate(pieces):
        start = max(len(text) - longest + 1, 0)
        text += piece
        logprob += lp
        tokens += n
        ends = [at + len(s) for s in stop if (at := text.find(s, start)) >= 0]
        if ends:
            end = min(ends)
            rest = text[end:]
            return Step(text[:end], tokens, logprob=logprob, finish_reason="stop"), i + 1, (rest, 0.0, 0) if rest else None
        if tokens >= max_tokens:
            return Step(text, tokens, logprob=logprob, finish_reason="length"), i + 1, None
    if ended is not None:
        return Step(text, tokens, logprob=logprob, finish_reason=ended), len(pieces), None
    return None


def split_tokens(text: str, tokens: Sequence[str], logprobs: Sequence[float | None]) -> list[Piece]:
    """A completion's text as one piece per returned token: the token's string where the
    text goes on with it, else ``""`` (special tokens such as end-of-sequence); text left
    over joins the last piece."""
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


@dataclass(eq=False)
class _Lane:
    """One continuation being generated: its context and the text after it."""

    context: str
    pieces: list[Piece] = field(default_factory=list)
    ended: str | None = None  # "eos" / "length" once the text cannot go on
    error: str | None = None
    prompt_tokens: int = 0  # context tokens sent for its current step

    @property
    def tokens(self) -> int:
        return sum(n for _, _, n in self.pieces)


class StepGenerator(Protocol):
    """What :class:`Lookahead` wraps: an :class:`~itscale.lm.openai.OpenAIGenerator` (or
    anything with its client, API, merge limit and plain ``generate_steps``)."""

    client: CompletionsClient
    api: str
    merge_prompts: int
    capabilities: Capabilities

    async def generate_steps(self, requests: Sequence[StepRequest]) -> list[list[Step]]: ...

    async def check(self) -> dict[str, list[str]]: ...

    async def aclose(self) -> None: ...


class Lookahead(OnClient):
    """A generator that serves step requests from block-aligned look-ahead (see the module
    docstring) and everything else through ``generator``; ``block`` is the server's KV
    block size in tokens. ``stats`` counts look-aheads reused, continuations started
    fresh, prompts sent and look-ahead tokens dropped (charged to a step)."""

    def __init__(self, generator: StepGenerator, block: int):
        if block < 1:
            raise ValueError(f"kv_block must be >= 1, got {block}")
        if generator.api != "completions":
            raise ValueError("kv_block needs the completions API: pass the policy's tokenizer (tokenizer=FOLDER)")
        self.generator, self.client, self.block = generator, generator.client, int(block)
        self.min_tokens = max(self.block // 2, 1)
        self._lanes: dict[tuple, list[_Lane]] = {}  # (owner, sampling, context) -> look-aheads there
        self._fate: dict[tuple[str, ...], list[int]] = {}  # owner -> [look-aheads used, dropped]
        self.stats = {"reused": 0, "fresh": 0, "prompts": 0, "dropped_tokens": 0}
        if hasattr(generator, "race"):  # an optional capability: offered only when the generator has it
            self.race = self._race

    @property
    def capabilities(self) -> Capabilities:
        return self.generator.capabilities

    def clear_cache(self) -> None:
        """Forget every look-ahead and what each problem made of it (e.g. between benchmark
        phases, so that one phase's look-ahead is neither reused nor charged in the next)."""
        self._lanes.clear()
        self._fate.clear()

    async def generate_steps(self, requests: Sequence[StepRequest]) -> list[list[Step]]:
        """Steps for ``requests``. Step requests (with stop strings) of problems where
        look-ahead pays are served here; the others (whole solutions, problems that use
        little look-ahead, every request of a generator that does not merge) go through
        the generator's plain requests."""
        if self.generator.merge_prompts == 1:  # seeded, one request per StepRequest: no look-ahead
            return await self.generator.generate_steps(requests)
        stepwise = [r for r in requests if r.k > 0 and r.stop and not r.params.top_logprobs]
        dropped = self._drop_unwanted(stepwise)
        usable: dict[tuple[str, ...], int] = {}  # look-aheads this call can use, by problem
        for r in stepwise:
            usable[_owner(r)] = usable.get(_owner(r), 0) + min(r.k, len(self._lanes.get(self._key(r, r.prefix), ())))
        ahead = [i for i, r in enumerate(requests)  # (a step that carries text goes plain: the generator reads it)
                 if r.k > 0 and r.stop and not r.carry and not r.params.top_logprobs
                 and self._pays(_owner(r), usable[_owner(r)])]
        chosen = set(ahead)
        plain = [i for i in range(len(requests)) if i not in chosen]
        out: list[list[Step]] = [[] for _ in requests]
        steps, plain_steps = await asyncio.gather(self._generate([requests[i] for i in ahead]),
                                                  self.generator.generate_steps([requests[i] for i in plain]))
        for i, s in [*zip(ahead, steps), *zip(plain, plain_steps)]:
            out[i] = s
        for owner, tokens in dropped.items():
            first = next((i for i, r in enumerate(requests) if _owner(r) == owner and out[i]), None)
            if first is not None:
                out[first][0] = replace(out[first][0], tokens=out[first][0].tokens + tokens)
        return out

    async def _race(self, request: StepRequest) -> RaceOutcome:
        """The generator's race, as it is (see the module docstring)."""
        return await self.generator.race(request)

    def _pays(self, owner: tuple[str, ...], usable: int) -> bool:
        """Whether the problem has used at least half of its look-aheads (counting those this
        call can use; judged once four have been used or dropped)."""
        used, dropped = self._fate.get(owner, (0, 0))
        used += usable
        return used + dropped < 4 or used >= dropped

    async def _generate(self, requests: Sequence[StepRequest]) -> list[list[Step]]:
        if not requests:
            return []
        lanes: list[tuple[int, _Lane]] = []
        for i, r in enumerate(requests):
            here = self._lanes.pop(self._key(r, r.prefix), [])
            reused, spare = here[: r.k], here[r.k:]
            if spare:
                self._lanes[self._key(r, r.prefix)] = spare
            self.stats["reused"] += len(reused)
            self.stats["fresh"] += r.k - len(reused)
            if reused:
                self._fate.setdefault(_owner(r), [0, 0])[0] += len(reused)
            lanes += [(i, lane) for lane in reused] + [(i, _Lane(r.prefix)) for _ in range(r.k - len(reused))]
        while todo := [(i, lane) for i, lane in lanes if self._needs_text(requests[i], lane)]:
            await self._extend(requests, todo)
        out: list[list[Step]] = [[] for _ in requests]
        for i, lane in lanes:
            out[i].append(self._take_step(requests[i], lane))
        return out

    # -- the store ------------------------------------------------------------------------
    @staticmethod
    def _key(request: StepRequest, context: str) -> tuple:
        return _owner(request), (request.params.temperature, request.params.top_p), context

    def _drop_unwanted(self, requests: Sequence[StepRequest]) -> dict[tuple[str, ...], int]:
        """Forget the look-ahead of these problems' particles that the call does not continue;
        its tokens by problem."""
        owners = {_owner(r) for r in requests}
        wanted = {self._key(r, r.prefix) for r in requests}
        dropped: dict[tuple[str, ...], int] = {}
        for key in [k for k in self._lanes if k[0] in owners and k not in wanted]:
            lanes = self._lanes.pop(key)
            dropped[key[0]] = dropped.get(key[0], 0) + sum(lane.tokens for lane in lanes)
            self._fate.setdefault(key[0], [0, 0])[1] += len(lanes)
        excess = sum(map(len, self._lanes.values())) - MAX_LANES
        for key in list(self._lanes)[: max(excess, 0)]:
            del self._lanes[key]
        for owner in list(self._fate)[: max(len(self._fate) - MAX_LANES, 0)]:
            del self._fate[owner]
        self.stats["dropped_tokens"] += sum(dropped.values())
        return dropped

    # -- generating -----------------------------------------------------------------------
    def _needs_text(self, request: StepRequest, lane: _Lane) -> bool:
        return lane.error is None and cut_step(lane.pieces, request.stop, request.params.max_step_tokens,
                                               lane.ended) is None

    def _room(self, n: int) -> int:
        """Tokens to generate after an ``n``-token prompt so that the KV the server computes
        (all but the last sampled token) ends on a block boundary: at least ``min_tokens``."""
        room = (-n) % self.block + 1
        while room < self.min_tokens:
            room += self.block
        limit = self.client.context_length
        return room if limit is None else min(room, limit - n)

    async def _extend(self, requests: Sequence[StepRequest], todo: list[tuple[int, _Lane]]) -> None:
        """One more chunk of text for every lane in ``todo``, merged by sampling and length."""
        groups: dict[tuple, list[tuple[int, _Lane, str, int]]] = {}
        for i, lane in todo:
            r = requests[i]
            text = lane.context + "".join(piece for piece, _, _ in lane.pieces)
            n = self.client.context_tokens(r.problem.prompt, text)
            lane.prompt_tokens += n
            room = self._room(n)
            if room < 1:  # the context is full
                lane.ended = "length"
                continue
            key = (r.params.temperature, r.params.top_p, room, r.cache_namespace)
            groups.setdefault(key, []).append((i, lane, text, room))
        size = self.generator.merge_prompts
        chunks = [items[j:j + size] for items in groups.values() for j in range(0, len(items), size)]
        await asyncio.gather(*(self._send(requests, chunk) for chunk in chunks))

    async def _send(self, requests: Sequence[StepRequest], chunk: list[tuple[int, _Lane, str, int]]) -> None:
        """One merged request (no stop strings, no seed) extending every lane of ``chunk``."""
        first = requests[chunk[0][0]]
        params = first.params
        sampling = Sampling(chunk[0][3], params.temperature, params.top_p, n=1, cache_namespace=first.cache_namespace)
        prompts = [self.client.context_text(requests[i].problem.prompt, text) for i, _, text, _ in chunk]
        self.stats["prompts"] += len(chunk)
        try:
            completion = self.client.parse(await self.client.post_completions(prompts, sampling), expected=len(chunk))
        except BackendError as err:
            if self.client.learn_context_length(err) or self.client.drop_extensions(err):
                return  # sent again, with the context length now known or without the extensions
            for _, lane, _, _ in chunk:
                lane.error = str(err)
            return
        for (_, lane, _, room), choice in zip(chunk, completion.choices):
            new = split_tokens(choice.text, choice.tokens or (), choice.token_logprobs or ())
            lane.pieces += new
            reason = choice.finish_reason
            if reason == "stop":
                lane.ended = "eos"
            elif reason == "length" and sum(n for _, _, n in new) < room:  # the context ran out first
                lane.ended = "length"
            elif reason != "length":
                lane.error = f"{completion.endpoint}: the server ended the completion with finish_reason={reason!r}"

    def _take_step(self, request: StepRequest, lane: _Lane) -> Step:
        """The lane's next step; what follows it is kept for the particle's next round."""
        if lane.error is not None:
            return Step("", 0, finish_reason="error", error=lane.error)
        step, used, remainder = cut_step(lane.pieces, request.stop, request.params.max_step_tokens, lane.ended)
        del lane.pieces[:used]
        if remainder is not None:
            lane.pieces.insert(0, remainder)
        step = replace(step, prompt_tokens=lane.prompt_tokens)
        lane.prompt_tokens = 0
        lane.context += step.text
        if step.finish_reason == "stop" and (lane.pieces or lane.ended is None):
            self._lanes.setdefault(self._key(request, lane.context), []).append(lane)
        return step


def _owner(request: StepRequest) -> tuple[str, ...]:
    """Whose look-ahead a request may use: its problem's (id, prompt), in its cache namespace
    (appended when there is one)."""
    owner = (str(request.problem.id), request.problem.prompt)
    return owner if request.cache_namespace is None else (*owner, request.cache_namespace)
