r"""One client for an OpenAI-compatible completions server (vLLM, llama.cpp, hosted APIs).

:class:`CompletionsClient` is what every HTTP backend of itscale shares: the policy
(:class:`~itscale.lm.openai.OpenAIGenerator`), its look-ahead
(:class:`~itscale.lm.lookahead.Lookahead`) and the remote PRMs
(:mod:`itscale.rewards.remote`). It owns

- the :class:`~itscale.lm.http.EndpointPool` (several base URLs, bounded concurrency,
  retries with backoff, typed errors), the served model id, the tokenizer and the chat
  prompt built from it;
- the server quirks it learns from the server's answers (``n_per_request``,
  ``extensions``, ``context_length``);
- request bodies for ``/completions`` and ``/chat/completions``, posting (with the
  re-sends that learning a quirk calls for), and the one reply parser
  (:func:`parse_reply`: a reply's choices as :class:`Choice` records, plus usage);
- the finish-reason mapping (:func:`finish_of`) and token counting
  (:meth:`~CompletionsClient.context_text`, :meth:`~CompletionsClient.context_tokens`,
  :meth:`~CompletionsClient.stop_token_ids`).

It knows nothing of steps, particles or scores: callers turn their requests into
:class:`Sampling` fields and prompts, and the parsed choices into their own results.

The HTTP contract
-----------------
**Completions (default when a tokenizer is known).** The chat template is applied
client-side, exactly as :meth:`itscale.lm.hf.HFGenerator.context_text` does, so the
server continues the exact text ``c = chat_prompt(problem) + prefix``::

    POST {base}/completions
    {"model": M, "prompt": c (or a list of them), "max_tokens": max_tokens,
     "temperature": T, "top_p": P, "n": k, "logprobs": 1,
     "seed": seed,                         # only when set
     "stop": [...stop],                    # only when non-empty
     "stop_token_ids": [...],              # vLLM extension: the one-token stop strings
     "include_stop_str_in_output": true,   # vLLM extension (see `extensions`)
     "add_special_tokens": false,          # vLLM extension, when the chat template wrote
                                           # the special tokens itself (no second BOS)
     "cache_salt": salt}                   # vLLM extension, for a cache namespace (below)

``top_p`` and ``n`` are left out where a caller does not set them (a PRM's one-token
scoring request), as is ``include_stop_str_in_output`` with ``keep_stop_strings=False``.
``logprobs`` is ``max(Sampling.logprobs, Sampling.top_logprobs)``: vLLM (and the OpenAI
completions API) then returns, per generated token, the ``logprobs`` most likely tokens
plus the sampled one.

Read back (:func:`parse_reply`): ``choices[i].text``, ``.finish_reason``,
``.stop_reason`` (vLLM), ``.logprobs.tokens`` / ``.token_logprobs`` /
``.top_logprobs`` and ``usage.prompt_tokens`` / ``usage.completion_tokens`` /
``usage.prompt_tokens_details.cached_tokens``. ``choices`` are put in ``index`` order:
``choices[i]`` answers prompt ``i`` of a prompt list.

**Chat (fallback when no tokenizer is known, or ``api="chat"``).** ``POST
{base}/chat/completions`` with ``messages = [system?, user: problem, assistant:
prefix]``, ``logprobs: true`` and, when there is a prefix, the vLLM extensions
``continue_final_message: true, add_generation_prompt: false`` so that the model
continues the assistant turn (these two are sent even with ``extensions=False``:
without them the server would start a new turn). The server applies its own
template, so an *exact* continuation of partial steps then depends on the server
(vLLM: yes; hosted APIs mostly lack the option, and those requests fail with the
server's error). With ``Sampling.top_logprobs = k > 0`` the body also asks
``top_logprobs: min(k + 1, 20)``: vLLM 0.32's chat API lists the sampled token first, then the
most likely ones, ``top_logprobs`` entries in all, so one more than ``k`` always holds the
``k`` most likely (at ``k = 20``, OpenAI's cap, the 20th may be missing and the sampled
token's value stand in its place). Read back: ``choices[i].message.content``,
``.logprobs.content[j].logprob`` and ``.logprobs.content[j].top_logprobs``.

Either API's top log-probabilities are read into :attr:`Choice.top_values` (per position,
every value returned, descending; :func:`top_values`). What they are of: vLLM's default
``--logprobs-mode raw_logprobs`` (0.32) computes them from the model's logits before any
processing (temperature, top-p, penalties): the raw distribution at temperature 1 that
:class:`~itscale.lm.hf.HFGenerator` reports too. A server started with
``--logprobs-mode processed_logprobs`` would report the sampling distribution instead.

**Streamed (a policy's races).** The same bodies with ``"stream": true`` and
``"stream_options": {"include_usage": true}``, posted with
:meth:`~itscale.lm.http.EndpointPool.post_stream` (``post_learning(..., send=...)``): each
event's tokens are counted as it arrives (:func:`streamed_tokens`), and the merged events
are read by :func:`parse_reply` like a reply that was not streamed.

Finish reasons
--------------
:func:`finish_of` maps a choice to ``(text, finish_reason, error)``. ``text`` keeps its
stop string: vLLM reports it in ``stop_reason`` (and includes it with
``include_stop_str_in_output``); if the text lacks it, it is re-appended. A server that
strips stop strings and has no ``stop_reason`` cannot tell a stop string from
end-of-sequence: a ``"stop"`` then counts as the (first) stop string.
``"length"`` → ``length``; ``"stop"`` with a stop string → ``stop``; ``"stop"``
without one (end-of-sequence, or a stop *token*, i.e. an int ``stop_reason``) →
``eos``; anything else (``abort``, ``content_filter``) → ``error``.

Stop tokens
-----------
A stop string that is exactly one token of the tokenizer (the usual ``"\n"`` step
delimiter of small vocabularies) is also sent as ``stop_token_ids`` (vLLM extension).
vLLM checks stop *strings* in its API server's detokenizer, after the engine has
already scheduled the sequence's next forward pass, and aborts it from there; a stop
*token* ends the sequence inside the engine's scheduler at once. The stop strings are
sent as well, so a token that merely contains the delimiter still stops as before, and
the text comes back the same: vLLM's ``stop_reason`` is then the token id, read as the
stop string it stands for (a text that does not end with that string means the local
tokenizer is not the server's, and :func:`finish_of` reports an error saying so).

Cache namespaces
----------------
A request with a cache namespace (``StepRequest.cache_namespace``, passed here as
``Sampling.cache_namespace``) carries vLLM's ``cache_salt`` (vLLM ≥ 0.9 keys its prefix
cache by it, so requests with different salts never share cached blocks), with the
extensions on. The salt is :func:`cache_salt`: an HMAC-SHA256 of the namespace under a
secret drawn once per process, so one namespace always gets the same salt here and no
one can compute another namespace's salt from its name (vLLM asks for unpredictable
salts). A server without the field rejects it (the extensions are then dropped, and
:meth:`~CompletionsClient.isolates` says so: the server's cached tokens may then be
another namespace's work) or ignores it (an older vLLM: its cache stays shared, which
the client cannot tell).

Learnt quirks
-------------
- ``n_per_request``: ``None`` assumes the server honours ``n``; :meth:`~CompletionsClient.rejects_n`
  recognises a 4xx whose message mentions ``n``, and :meth:`~CompletionsClient.learn_n`
  records what a reply showed (a server that returns fewer choices than asked, like
  llama.cpp, ignores ``n``). Once ``False``, it stays ``False``.
- ``extensions``: with ``True``, a 4xx naming one of the vLLM extension fields
  (:data:`VLLM_EXTENSIONS`) switches them off for good (:meth:`~CompletionsClient.drop_extensions`).
- ``context_length``: a 400 that names the model's context length (vLLM's
  ``max_model_len=N``, OpenAI's ``maximum context length is N``) shorter than the one
  known is learnt (:meth:`~CompletionsClient.learn_context_length`); from then on
  :meth:`~CompletionsClient.fit_max_tokens` caps ``max_tokens`` to what the context
  leaves (at least 1), as a local model stops at its last position (``"length"``).

:meth:`~CompletionsClient.post_learning` posts a body and, on a 4xx that teaches one of
the last two, learns it and re-sends the body rebuilt (a context length learnt is
re-sent only when the caller asks: a merged request re-sends its prompts one by one
instead, each capped to its own room). :meth:`~CompletionsClient.post` and
:meth:`~CompletionsClient.post_completions` post once and learn nothing. A request
that fails raises :class:`~itscale.lm.http.BackendError`; a reply of the wrong shape
is one too (:func:`unexpected_shape`), so callers handle a single error type.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Sequence

from ..types import MAX_TOP_LOGPROBS
from .http import BackendError, EndpointPool, Reply
from .loading import TOKENIZER_FILES, ChatPrompts, ModelLoadError, encode, load_tokenizer

__all__ = [
    "VLLM_EXTENSIONS", "Choice", "Completion", "CompletionsClient", "Sampling", "cache_salt", "finish_of",
    "make_pool", "named_context_length", "parse_reply", "resolve_tokenizer", "split_evenly", "streamed_tokens",
    "top_values", "unexpected_shape",
]

#: vLLM request fields beyond the OpenAI API that this module may send.
VLLM_EXTENSIONS = ("include_stop_str_in_output", "add_special_tokens", "continue_final_message", "add_generation_prompt",
                   "stop_token_ids", "cache_salt")
_SALT_KEY = secrets.token_bytes(32)  # this process's secret behind every cache salt
_MENTIONS_N = re.compile(r"(?<![\w-])['\"`]?n['\"`]?(?![\w-])|best_of", re.IGNORECASE)
#: A server's context length in its 400 reply: vLLM 0.32 ("max_tokens=480 cannot be greater than
#: max_model_len=256") and the OpenAI / older vLLM wording ("maximum context length is 256 tokens").
_CONTEXT_LENGTH = re.compile(r"max_model_len\s*=?\s*(\d+)|maximum context length is (\d+)", re.IGNORECASE)
#: What a reply of the wrong shape raises while it is read.
_SHAPE_ERRORS = (KeyError, IndexError, TypeError, ValueError, AttributeError)


# -- plumbing -----------------------------------------------------------------------------------
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


def named_context_length(err: BackendError) -> int | None:
    """The context length a 400 reply names, if any."""
    match = _CONTEXT_LENGTH.search(err.message) if err.status == 400 else None
    return int(match.group(1) or match.group(2)) if match else None


def cache_salt(namespace: str) -> str:
    """vLLM's ``cache_salt`` for a cache namespace: 64 hex digits, the same for one namespace
    within this process and unpredictable from its name (see "Cache namespaces")."""
    return hmac.new(_SALT_KEY, namespace.encode("utf-8"), hashlib.sha256).hexdigest()


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` integers that differ by at most one (the larger first)."""
    q, r = divmod(int(total), parts)
    return [q + (1 if j < r else 0) for j in range(parts)]


def streamed_tokens(event: Mapping[str, Any]) -> int:
    """The tokens one streamed event delivers: its log-probability entries (``logprobs.tokens``
    for completions, ``logprobs.content`` for chat; vLLM sends one per token), else one per
    choice with text (a server that streams without log-probabilities sends about a token a
    chunk)."""
    n = 0
    for choice in event.get("choices") or ():
        lp = choice.get("logprobs")
        entries = None
        if isinstance(lp, Mapping):
            entries = lp.get("tokens") if lp.get("tokens") is not None else lp.get("content")
        if isinstance(entries, list):
            n += len(entries)
        elif choice.get("text") or (choice.get("delta") or {}).get("content"):
            n += 1
    return n


def unexpected_shape(endpoint: str, err: Exception) -> BackendError:
    """The error for a 200 reply that is not shaped as the API says."""
    return BackendError(endpoint, 200, f"unexpected response shape ({type(err).__name__}: {err})")


# -- replies ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    """One returned completion, as read from ``choices[i]``.

    ``stop_reason`` is vLLM's (the stop string, a stop token id, or ``None`` for
    end-of-sequence) and ``stop_reported`` whether the server sent the field at all.
    ``tokens`` / ``token_logprobs`` are the returned token strings and their
    log-probabilities, aligned (``None`` entries where the server gave none);
    ``top_logprobs`` one ``{token: log-probability}`` per position, and ``top_values`` the
    log-probabilities the server returned at each position, descending (:func:`top_values`;
    not collapsed by token text). Each is ``None`` when the reply lacks it."""

    text: str
    finish_reason: str | None
    stop_reason: str | int | None = None
    stop_reported: bool = False
    tokens: tuple[str, ...] | None = None
    token_logprobs: tuple[float | None, ...] | None = None
    top_logprobs: tuple[Mapping[str, float] | None, ...] | None = None
    top_values: tuple[tuple[float, ...] | None, ...] | None = None

    @property
    def logprobs(self) -> list[float] | None:
        """The sampled tokens' log-probabilities (entries the server left empty dropped), if returned."""
        if self.token_logprobs is None:
            return None
        return [v for v in self.token_logprobs if v is not None]


@dataclass(frozen=True)
class Completion:
    """A parsed reply: its choices in ``index`` order, and its usage (0 / ``None`` when unreported)."""

    endpoint: str
    choices: tuple[Choice, ...]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens


def top_values(choice: Mapping[str, Any]) -> list[tuple[float, ...] | None] | None:
    """The top log-probabilities of each generated position of one returned (or streamed)
    choice, descending: completions' ``logprobs.top_logprobs[j]`` values (a ``{token text:
    log-probability}`` map: two top tokens of the same text leave one value) or chat's
    ``logprobs.content[j].top_logprobs[*].logprob`` (a list); ``None`` for a position without
    them, and for a choice without log-probabilities."""
    lp = choice.get("logprobs")
    if not isinstance(lp, Mapping):
        return None
    if lp.get("token_logprobs") is None and lp.get("content") is not None:  # chat
        rows = [[t["logprob"] for t in item.get("top_logprobs") or ()] or None for item in lp["content"]]
    elif lp.get("top_logprobs") is not None:  # completions
        rows = [None if top is None else list(top.values()) for top in lp["top_logprobs"]]
    else:
        return None
    return [None if row is None else tuple(sorted((float(v) for v in row), reverse=True)) for row in rows]


def _choice(raw: Mapping[str, Any], api: str) -> Choice:
    text = raw["text"] if api == "completions" else raw["message"]["content"]
    tokens = token_lps = top = None
    lp = raw.get("logprobs")
    if isinstance(lp, Mapping):
        if lp.get("token_logprobs") is None and lp.get("content") is not None:  # chat
            items = lp["content"]
            token_lps = tuple(float(item["logprob"]) for item in items)
            tokens = tuple(str(item.get("token", "")) for item in items)
            top = tuple({str(t["token"]): float(t["logprob"]) for t in item.get("top_logprobs") or ()} for item in items)
        else:  # completions
            if lp.get("token_logprobs") is not None:
                token_lps = tuple(None if v is None else float(v) for v in lp["token_logprobs"])
            if lp.get("tokens") is not None:
                tokens = tuple(str(t) for t in lp["tokens"])
            if lp.get("top_logprobs") is not None:
                top = tuple(lp["top_logprobs"])
    values = top_values(raw)
    return Choice(text or "", raw.get("finish_reason"), raw.get("stop_reason"), "stop_reason" in raw,
                  tokens, token_lps, top, None if values is None else tuple(values))


def parse_reply(reply: Reply, api: str = "completions", expected: int | None = None) -> Completion:
    """The reply's choices (``index`` order) and usage; ``expected``: the number of choices it
    must hold (one per prompt of a list). A reply of another shape raises :func:`unexpected_shape`."""
    try:
        raw = sorted(reply.data["choices"], key=lambda c: c.get("index", 0))
        if expected is not None and len(raw) != expected:
            raise ValueError(f"{len(raw)} choices for {expected} prompts")
        choices = tuple(_choice(c, api) for c in raw)
        usage = reply.data.get("usage")
        usage = usage if isinstance(usage, Mapping) else {}
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
        return Completion(reply.endpoint, choices, int(usage.get("prompt_tokens") or 0),
                          int(usage.get("completion_tokens") or 0), None if cached is None else int(cached))
    except _SHAPE_ERRORS as err:
        raise unexpected_shape(reply.endpoint, err) from err


def finish_of(choice: Choice, stops: Sequence[str],
              stop_ids: Mapping[int, str] | None = None) -> tuple[str, str, str | None]:
    """``(text with its stop string, finish_reason, error)`` for one returned choice (see
    "Finish reasons"). ``stop_ids`` maps the stop token ids sent to the stop strings they stand for."""
    text, reason = choice.text, choice.finish_reason
    if reason == "length":
        return text, "length", None
    if reason != "stop":
        return "", "error", f"the server ended the completion with finish_reason={reason!r}"
    if choice.stop_reported:  # vLLM: the stop string, a stop token id (int), or None (EOS)
        stop = choice.stop_reason
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


# -- requests -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """The sampling fields of one request body. ``top_p`` / ``n`` / ``seed``: left out when
    ``None``; ``stop``: left out when empty; ``logprobs``: the top-k asked per position
    (completions; chat asks ``true``); ``top_logprobs``: the top-k log-probabilities a caller
    wants per generated token (0: none; completions ask ``max(logprobs, top_logprobs)``, chat
    ``top_logprobs: min(k + 1, 20)``, see "The HTTP contract"); ``keep_stop_strings``: send vLLM's
    ``include_stop_str_in_output`` (with extensions on); ``cache_namespace``: send vLLM's
    ``cache_salt`` for it (with extensions on; see "Cache namespaces")."""

    max_tokens: int
    temperature: float
    top_p: float | None = None
    n: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int = 1
    top_logprobs: int = 0
    keep_stop_strings: bool = True
    cache_namespace: str | None = None


class CompletionsClient:
    """An OpenAI-compatible server, its model and its learnt quirks (see the module docstring).

    ``base_url`` is one API root (``http://host:8000/v1``), several (load-balanced), or
    a ready :class:`~itscale.lm.http.EndpointPool` (then the HTTP options here are
    ignored). ``model`` is the served model id. ``tokenizer`` (a folder or tokenizer
    object) supplies the chat template and token counts; with ``None`` it is loaded from
    ``model`` if that is a local folder. ``api`` is ``"auto"`` (completions when a
    tokenizer is known, else chat), ``"completions"`` or ``"chat"``. ``extensions=False``
    sends only standard OpenAI fields. ``extra_body`` is merged into every body built here.
    """

    def __init__(
        self,
        base_url: str | Sequence[str] | EndpointPool,
        model: str,
        *,
        tokenizer: Any = None,
        api: str = "auto",
        system_prompt: str | None = None,
        extensions: bool = True,
        extra_body: Mapping[str, Any] | None = None,
        n_per_request: bool | None = None,
        api_key: str | None = None,
        max_concurrency: int = 64,
        timeout: float = 60.0,
        retries: int = 4,
        transport: Any = None,
    ):
        if api not in ("auto", "completions", "chat"):
            raise ValueError(f"api must be 'auto', 'completions' or 'chat', got {api!r}")
        self.http = make_pool(base_url, api_key=api_key, max_concurrency=max_concurrency, timeout=timeout,
                              retries=retries, transport=transport)
        self.model = str(model)
        self.tokenizer = resolve_tokenizer(tokenizer, self.model)
        self.api = ("completions" if self.tokenizer is not None else "chat") if api == "auto" else api
        self.system_prompt = system_prompt
        self.extra_body = dict(extra_body or {})
        # learnt quirks
        self.extensions = bool(extensions)
        self.n_per_request = n_per_request
        self.context_length: int | None = None  # learnt from a server that rejected max_tokens
        self._chat_prompts = ChatPrompts(self.tokenizer, system_prompt)
        #: whether tokenizing a chat prompt adds the tokenizer's special tokens (no chat template)
        self.adds_special_tokens = self._chat_prompts("")[1]
        self._stop_token_ids: dict[tuple[str, ...], dict[int, str]] = {}

    # -- text and tokens ----------------------------------------------------------------
    def chat_prompt(self, prompt: str) -> tuple[str, bool]:
        """The chat prompt text, and whether tokenizing it adds special tokens
        (:func:`~itscale.lm.loading.chat_prompt`, memoised)."""
        return self._chat_prompts(prompt)

    def context_text(self, prompt: str, prefix: str = "") -> str:
        """The exact text sent as ``prompt`` to ``/completions`` (as HFGenerator.context_text)."""
        return self._chat_prompts(prompt)[0] + prefix

    def context_tokens(self, prompt: str, prefix: str = "") -> int:
        """Tokens of :meth:`context_text` (local tokenizer; 0 without one)."""
        if self.tokenizer is None:
            return 0
        text, special = self._chat_prompts(prompt)
        return len(encode(self.tokenizer, text + prefix, add_special_tokens=special))

    def stop_token_ids(self, stops: Sequence[str]) -> dict[int, str]:
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

    def fit_max_tokens(self, wanted: int, prompt: str, prefix: str = "") -> int:
        """``wanted``, capped to what the context leaves once the server's length is known (>= 1)."""
        if self.context_length is None:
            return wanted
        room = self.context_length - (self.context_tokens(prompt, prefix) if self.api == "completions" else 0)
        return max(1, min(wanted, room))

    # -- bodies -------------------------------------------------------------------------
    def completions_body(self, prompt: str | list[str], sampling: Sampling) -> dict[str, Any]:
        """A ``/completions`` body for the context text(s) ``prompt`` (see "The HTTP contract")."""
        body = self._sampling_fields(sampling)
        body["prompt"] = prompt
        body["logprobs"] = max(sampling.logprobs, sampling.top_logprobs)
        if self.extensions:
            if sampling.keep_stop_strings:
                body["include_stop_str_in_output"] = True
            if not self.adds_special_tokens:  # the chat template writes the special tokens itself
                body["add_special_tokens"] = False
        body.update(self.extra_body)
        return body

    def chat_body(self, prompt: str, prefix: str, sampling: Sampling) -> dict[str, Any]:
        """A ``/chat/completions`` body continuing the assistant turn ``prefix`` (see "The HTTP contract")."""
        body = self._sampling_fields(sampling)
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": prompt})
        body["logprobs"] = True
        if sampling.top_logprobs > 0:  # vLLM lists the sampled token first: one more holds the top k
            body["top_logprobs"] = min(sampling.top_logprobs + 1, MAX_TOP_LOGPROBS)
        if prefix:
            messages.append({"role": "assistant", "content": prefix})
            body["continue_final_message"], body["add_generation_prompt"] = True, False
        body["messages"] = messages
        if self.extensions and sampling.keep_stop_strings:
            body["include_stop_str_in_output"] = True
        body.update(self.extra_body)
        return body

    def _sampling_fields(self, s: Sampling) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": s.max_tokens, "temperature": s.temperature}
        if s.top_p is not None:
            body["top_p"] = s.top_p
        if s.n is not None:
            body["n"] = s.n
        if s.seed is not None:
            body["seed"] = int(s.seed)
        if s.stop:
            body["stop"] = list(s.stop)
            stop_ids = self.stop_token_ids(s.stop)
            if self.extensions and stop_ids:
                body["stop_token_ids"] = list(stop_ids)
        body.update(self.cache_fields(s.cache_namespace))
        return body

    def cache_fields(self, namespace: str | None) -> dict[str, str]:
        """``{"cache_salt": ...}`` for a cache namespace with the extensions on, else ``{}``."""
        return {"cache_salt": cache_salt(namespace)} if namespace is not None and self.extensions else {}

    def isolates(self, namespace: str | None) -> bool:
        """Whether a request of ``namespace`` is kept from other namespaces' cache entries as far
        as this client can tell: no namespace, or its salt is being sent (a server that ignores
        the field cannot be told apart)."""
        return namespace is None or self.extensions

    # -- posting ------------------------------------------------------------------------
    async def post(self, path: str, body: Mapping[str, Any]) -> Reply:
        """One POST of ``body`` (``path`` as for :meth:`EndpointPool.post`); learns nothing."""
        return await self.http.post(path, body)

    async def post_completions(self, prompts: str | list[str], sampling: Sampling) -> Reply:
        """One ``/completions`` request for ``prompts``; learns nothing (the caller may pass a
        :class:`BackendError` it gets to :meth:`learn_context_length`)."""
        return await self.http.post("completions", self.completions_body(prompts, sampling))

    async def post_learning(self, path: str, make_body: Callable[[], Mapping[str, Any]], *,
                            resend_after_context_length: bool = True,
                            send: Callable[[str, Mapping[str, Any]], Awaitable[Reply]] | None = None) -> Reply:
        """POST ``make_body()``; on a 4xx that teaches a quirk, learn it and re-send a body made
        anew: after dropping the vLLM extensions always, after learning a context length only
        with ``resend_after_context_length`` (else the error is raised, the length learnt).
        ``send(path, body)`` posts (default: the pool's ``post``; e.g. a stream's ``post_stream``)."""
        try:
            return await (send or self.http.post)(path, make_body())
        except BackendError as err:
            if self.learn_context_length(err):
                if not resend_after_context_length:
                    raise
            elif not self.drop_extensions(err):
                raise
        return await self.post_learning(path, make_body, resend_after_context_length=resend_after_context_length,
                                        send=send)

    def parse(self, reply: Reply, expected: int | None = None) -> Completion:
        """:func:`parse_reply` for this client's API."""
        return parse_reply(reply, self.api, expected)

    # -- learning quirks ----------------------------------------------------------------
    def learn_context_length(self, err: BackendError) -> bool:
        """Whether ``err`` names a context length shorter than the one known (now learnt)."""
        limit = named_context_length(err)
        if limit is None or (self.context_length is not None and limit >= self.context_length):
            return False
        self.context_length = limit
        return True

    def drop_extensions(self, err: BackendError) -> bool:
        """Whether ``err`` is a strict server (e.g. a hosted API) rejecting a vLLM extension
        field; if so, only standard fields are sent from now on."""
        rejected = err.status is not None and 400 <= err.status < 500 and any(
            name in err.message for name in VLLM_EXTENSIONS)
        if rejected and self.extensions:
            self.extensions = False
            return True
        return False

    @staticmethod
    def rejects_n(err: BackendError) -> bool:
        """Whether ``err`` is a 4xx about ``n`` (or ``best_of``)."""
        return err.status is not None and 400 <= err.status < 500 and bool(_MENTIONS_N.search(err.message))

    def learn_n(self, supported: bool) -> None:
        """Record whether the server honoured ``n``: an unknown ``n_per_request`` takes the
        answer; a ``False`` one stays ``False``."""
        if self.n_per_request is None or not supported:
            self.n_per_request = supported

    # -- lifetime -----------------------------------------------------------------------
    async def check(self) -> dict[str, list[str]]:
        """Fail fast (BackendError) if a server is unreachable or does not serve ``model``."""
        return await self.http.check(self.model)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> "CompletionsClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


class OnClient:
    """What every backend built on a :class:`CompletionsClient` (its ``client``) shares: the
    client's settings as read-only attributes, and its lifetime (``check``, ``aclose``,
    ``async with``)."""

    client: CompletionsClient

    http = property(lambda self: self.client.http, doc="The client's pool (its ``usage`` counts every request).")
    model = property(lambda self: self.client.model, doc="The served model id.")
    tokenizer = property(lambda self: self.client.tokenizer, doc="The tokenizer (None: the chat API).")
    api = property(lambda self: self.client.api, doc="``completions`` or ``chat``.")
    system_prompt = property(lambda self: self.client.system_prompt)
    extra_body = property(lambda self: self.client.extra_body)
    extensions = property(lambda self: self.client.extensions, doc="Whether vLLM's extension fields are sent.")
    n_per_request = property(lambda self: self.client.n_per_request, doc="Whether the server honours ``n``.")
    context_length = property(lambda self: self.client.context_length, doc="The server's context, once learnt.")

    def context_room(self, prompt: str) -> int | None:
        """Tokens the model's context leaves after ``prompt``'s chat prompt, once the server's
        context length is known (from its model list or a reply) and a tokenizer counts; else None."""
        if self.client.context_length is None or self.client.tokenizer is None:
            return None
        return self.client.context_length - self.client.context_tokens(prompt)

    async def check(self) -> dict[str, list[str]]:
        """Fail fast (BackendError) if a server is unreachable or does not serve ``model``."""
        return await self.client.check()

    async def aclose(self) -> None:
        await self.client.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
