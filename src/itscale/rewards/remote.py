r"""Process reward models behind an HTTP server (design 6, PRM styles a and b).

:class:`RemoteTagPRM` — a tag-style causal-LM PRM (Math-Shepherd / RLHFlow, and the
embedded PRM) served by any OpenAI-compatible completions server, scored from
*prompt* log-probabilities. It builds exactly the text :class:`~itscale.rewards.hf.HFTagPRM`
scores (:meth:`RemoteTagPRM.text`)::

    chat_prompt(problem) + Σ_t (strip(s_t) + tag + separator)

and sends it once per request::

    POST {base}/completions
    {"model": M, "prompt": text, "max_tokens": 1, "temperature": 0,
     "echo": true, "logprobs": top_logprobs,
     "add_special_tokens": false}   # vLLM extension, when the chat template wrote the
                                    # special tokens itself (as HFTagPRM encodes it)

With ``echo`` the reply's ``choices[0].logprobs`` covers the prompt tokens followed by
the one generated token: ``tokens``, ``top_logprobs`` (one ``{token: logprob}`` dict per
position, ``None`` for the first) and ``text_offset`` (else cumulative token lengths).
The top-k dict at position ``i`` is the model's next-token distribution *after*
tokens ``< i``, so the score of step t is read at the token that starts right where
the t-th tag ends (the separator's first token, or the generated token when the
text ends with the tag). Token positions come from the local tokenizer's character
offsets when its token count agrees with the server's, else from the server's
``text_offset`` (see :meth:`RemoteTagPRM.token_after`):

    s_t = p(good) / (p(good) + p(bad)).

The text itself is unchanged, so later steps are conditioned exactly as in
HFTagPRM. If ``good`` or ``bad`` is missing from the top-k, its probability is bounded
by the k-th largest probability at that position and that bound is used: with
``bad`` missing the score is a *lower* bound, with ``good`` missing an *upper* bound
(``stats.bounded_steps`` counts them; raise ``top_logprobs`` — vLLM caps it at its
``--max-logprobs``, default 20 — to avoid it). If both are missing, or no token
starts at the end of a tag (the server's tokenizer merged the tag with the next
character), the step's score is NaN. Token keys are matched as strings
(``"+"``), or as ``"token_id:N"`` when vLLM runs with ``--return-tokens-as-token-ids``.

Caveats: the server tokenizes the whole text, whereas HFTagPRM encodes it piece by
piece (prompt, step, tag, separator); for character-level tokenizers (the embedded
PRM) the two are identical, for BPE tokenizers a token may differ at a step boundary.
A server that ignores ``add_special_tokens: false`` prepends a second BOS to a chat
template that writes one, which shifts the scores (and the positions).

:class:`RemoteRewardPRM` — a token-classification PRM (Qwen2.5-Math-PRM style) behind
vLLM's pooling API: ``POST {server}/pooling`` with ``{"model": M, "input": ids}``,
where ``ids`` are built client-side exactly as
:meth:`~itscale.rewards.hf.HFClassifierPRM.input_ids` does (prompt, then each step and
a separator token). The reply's ``data[0].data`` holds one row per token (``ALL``
pooling; rows at the separator positions are read) or one row per separator
(``STEP`` pooling, vLLM's ``step_tag_id``); the score is ``row[positive_label]``
(rows that are not probabilities are softmaxed first; a scalar row is the score).

Both scorers cache scores by step prefix — ``(problem prompt, steps[:t]) → s_t`` — so a
request whose every prefix has been scored costs no request (``tokens=0``); otherwise
the whole text is sent (a server with prefix caching, like vLLM's, re-reads only the
new part) and ``StepScores.tokens`` is the reply's ``usage.prompt_tokens``. Identical
requests in one call are sent once (the copies report 0 tokens). A request that fails
after its retries never raises: its steps score NaN (the particle dies) and
``stats.last_error`` keeps the reason. Scores are clipped to [1e-12, 1 − 1e-12].
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from ..lm.http import BackendError, EndpointPool, Reply
from ..lm.loading import ChatPrompts, encode, single_token_id
from ..lm.openai import make_pool, resolve_tokenizer
from ..types import Capabilities, ScoreRequest, StepScores
from .formats import EMBEDDED_TAG_FORMAT, TagFormat
from .prefix_cache import PrefixScores

__all__ = ["RemotePRMStats", "RemoteRewardPRM", "RemoteTagPRM", "tag_score"]

_EPS = 1e-12
_NAN = float("nan")


@dataclass
class RemotePRMStats:
    """Counters since construction (or ``reset_stats``)."""

    calls: int = 0
    requests: int = 0
    http_requests: int = 0
    scored_steps: int = 0
    cached_steps: int = 0
    bounded_steps: int = 0  # good or bad fell outside the top-k: the score is a bound
    failed_steps: int = 0  # NaN scores
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _clip(p: float) -> float:
    return p if math.isnan(p) else min(max(p, _EPS), 1.0 - _EPS)


def tag_score(top: Mapping[str, float], good: Sequence[str], bad: Sequence[str], k: int) -> tuple[float, bool]:
    """``(p(good) / (p(good) + p(bad)), bounded)`` from one position's top-k log-probabilities.

    ``good`` / ``bad`` are the keys a token may appear under. A token missing from the
    top-k gets the k-th largest probability there (an upper bound on its own), and
    ``bounded`` is True; NaN when both are missing.
    """
    def prob(keys: Sequence[str]) -> float | None:
        values = [top[key] for key in keys if key in top and top[key] is not None]
        return math.exp(max(values)) if values else None

    p_good, p_bad = prob(good), prob(bad)
    if p_good is None and p_bad is None:
        return _NAN, False
    bounded = p_good is None or p_bad is None
    if bounded:
        ranked = sorted((v for v in top.values() if v is not None), reverse=True)
        floor = math.exp(ranked[min(k, len(ranked)) - 1])
        p_good = floor if p_good is None else p_good
        p_bad = floor if p_bad is None else p_bad
    return p_good / (p_good + p_bad), bounded


class _RemoteScorer:
    """HTTP, prompt text, prefix cache and failure handling shared by the remote PRMs."""

    def _setup(self, base_url, model, tokenizer, system_prompt, delimiter, cache_size, n_parameters, extra_body,
               **http: Any) -> None:
        self.http: EndpointPool = make_pool(base_url, **http)
        self.model = str(model)
        self.tokenizer = resolve_tokenizer(tokenizer, self.model)
        if self.tokenizer is None:
            raise ValueError(
                f"{type(self).__name__} needs the PRM's tokenizer to build its input exactly: pass tokenizer=FOLDER "
                "(or a tokenizer object), or a local model folder as model"
            )
        self.system_prompt, self.delimiter = system_prompt, delimiter
        self.cache_size, self.extra_body = int(cache_size), dict(extra_body or {})
        self.capabilities = Capabilities(n_parameters=n_parameters)
        self.stats = RemotePRMStats()
        self._scores = PrefixScores(self.cache_size)
        self._chat_prompts = ChatPrompts(self.tokenizer, system_prompt)

    # -- public API -------------------------------------------------------------------
    def chat_prompt(self, prompt: str) -> tuple[str, bool]:
        """The chat prompt text, and whether tokenizing it adds special tokens (as in HFTagPRM)."""
        return self._chat_prompts(prompt)

    async def score_steps(self, requests: Sequence[ScoreRequest]) -> list[StepScores]:
        self.stats.calls += 1
        self.stats.requests += len(requests)
        out: list[StepScores | None] = [None] * len(requests)
        todo: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        for i, r in enumerate(requests):
            key = (r.problem.prompt, tuple(r.steps))
            hit = self._scores.get(*key)
            if hit is not None:
                self.stats.cached_steps += len(hit)
                out[i] = StepScores(hit, 0)
            else:
                todo.setdefault(key, []).append(i)
        keys = list(todo)
        results = await asyncio.gather(*(self._score_one(requests[todo[key][0]]) for key in keys))
        for key, (scores, tokens) in zip(keys, results):
            self._scores.put(*key, scores)
            first, *rest = todo[key]
            out[first] = StepScores(scores, tokens)
            for i in rest:
                out[i] = StepScores(scores, 0)
        return out  # type: ignore[return-value]

    async def check(self) -> dict[str, list[str]]:
        """Fail fast (BackendError) if a server is unreachable or does not serve ``model``."""
        return await self.http.check(self.model)

    def clear_cache(self) -> None:
        self._scores.clear()

    def reset_stats(self) -> None:
        self.stats = RemotePRMStats()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # -- internals ----------------------------------------------------------------------
    async def _score_one(self, request: ScoreRequest) -> tuple[tuple[float, ...], int]:
        """One request's scores and prompt tokens; NaN scores (never an exception) on failure."""
        n = len(request.steps)
        try:
            reply = await self._send(request)
            self.stats.http_requests += 1
            try:
                scores = self._read(request, reply)
            except (KeyError, IndexError, TypeError, ValueError) as err:
                raise BackendError(reply.endpoint, 200, f"unexpected response shape ({type(err).__name__}: {err})") from err
            tokens = int((reply.data.get("usage") or {}).get("prompt_tokens") or 0)
        except BackendError as err:
            self.stats.failed_steps += n
            self.stats.last_error = str(err)
            return (_NAN,) * n, 0
        failed = sum(math.isnan(s) for s in scores)
        self.stats.failed_steps += failed
        self.stats.scored_steps += n - failed
        return tuple(_clip(s) for s in scores), tokens

    async def _send(self, request: ScoreRequest) -> Reply:  # pragma: no cover - overridden
        raise NotImplementedError

    def _read(self, request: ScoreRequest, reply: Reply) -> list[float]:  # pragma: no cover - overridden
        raise NotImplementedError


class RemoteTagPRM(_RemoteScorer):
    """A tag-style causal-LM PRM scored by prompt log-probabilities (see the module docstring).

    ``base_url``/``api_key``/``max_concurrency``/``timeout``/``retries``/``transport`` are
    as for :class:`~itscale.lm.openai.OpenAIGenerator` (or pass an ``EndpointPool``).
    ``extensions=False`` leaves out the vLLM field ``add_special_tokens``.
    """

    def __init__(
        self,
        base_url: str | Sequence[str] | EndpointPool,
        model: str,
        *,
        tokenizer: Any = None,
        format: TagFormat = EMBEDDED_TAG_FORMAT,
        delimiter: str = "\n",
        top_logprobs: int = 20,
        system_prompt: str | None = None,
        extensions: bool = True,
        extra_body: Mapping[str, Any] | None = None,
        cache_size: int = 1 << 17,
        n_parameters: int | None = None,
        api_key: str | None = None,
        max_concurrency: int = 64,
        timeout: float = 60.0,
        retries: int = 4,
        transport: Any = None,
    ):
        if top_logprobs < 1:
            raise ValueError(f"top_logprobs must be >= 1, got {top_logprobs}")
        self._setup(base_url, model, tokenizer, system_prompt, delimiter, cache_size, n_parameters, extra_body,
                    api_key=api_key, max_concurrency=max_concurrency, timeout=timeout, retries=retries,
                    transport=transport)
        self.format, self.top_logprobs, self.extensions = format, int(top_logprobs), bool(extensions)
        self._good = self._keys(format.good, "the PRM good token")
        self._bad = self._keys(format.bad, "the PRM bad token")

    def _keys(self, token: str, what: str) -> tuple[str, ...]:
        """The strings a token's top-logprob entry may be keyed by (its text, ``token_id:N``)."""
        return (token, f"token_id:{single_token_id(self.tokenizer, token, what)}")

    def text(self, request: ScoreRequest) -> tuple[str, list[int]]:
        """The exact text HFTagPRM scores, and the character offset where each tag ends."""
        text = self.chat_prompt(request.problem.prompt)[0]
        ends = []
        for step in request.steps:
            text += TagFormat.strip(step, self.delimiter) + self.format.tag
            ends.append(len(text))
            text += self.format.separator
        return text, ends

    async def _send(self, request: ScoreRequest) -> Reply:
        text, _ = self.text(request)
        body: dict[str, Any] = {"model": self.model, "prompt": text, "max_tokens": 1, "temperature": 0.0,
                                "echo": True, "logprobs": self.top_logprobs}
        if self.extensions and not self.chat_prompt(request.problem.prompt)[1]:
            body["add_special_tokens"] = False
        body.update(self.extra_body)
        return await self.http.post("completions", body)

    def _read(self, request: ScoreRequest, reply: Reply) -> list[float]:
        text, ends = self.text(request)
        lp = reply.data["choices"][0]["logprobs"]
        tokens, top = lp["tokens"], lp["top_logprobs"]
        after = self.token_after(text, self.chat_prompt(request.problem.prompt)[1], tokens, lp.get("text_offset"))
        scores = []
        for end in ends:
            i = after.get(end)
            if i is None or i >= len(top) or top[i] is None:
                scores.append(_NAN)
                self.stats.last_error = f"{reply.endpoint}: no token starts right after a tag (tag merged by the tokenizer?)"
                continue
            score, bounded = tag_score(top[i], self._good, self._bad, self.top_logprobs)
            self.stats.bounded_steps += bounded
            if math.isnan(score):
                self.stats.last_error = (f"{reply.endpoint}: neither {self.format.good!r} nor {self.format.bad!r} "
                                         f"is in the top {self.top_logprobs} after a tag")
            scores.append(score)
        return scores

    def token_after(self, text: str, special: bool, tokens: Sequence[str], offsets: Sequence[int] | None) -> dict[int, int]:
        """``{character offset e: index of the first returned token that starts at e}``.

        Preferred: the local tokenizer's own character offsets for ``text`` (the server
        tokenizes the same string with the same tokenizer), used when the server returned
        exactly one token more (the generated one). Otherwise the server's
        ``text_offset`` (or cumulative token lengths), which drift where single tokens do
        not decode to their exact text (sentencepiece spaces, split UTF-8 characters).
        """
        try:
            spans = self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)["offset_mapping"]
        except (NotImplementedError, KeyError, TypeError, ValueError):  # a slow tokenizer: no offsets
            spans = None
        after: dict[int, int] = {}
        if spans is not None and len(tokens) == len(spans) + 1:
            for i, (_, end) in enumerate(spans):  # token i + 1 starts where token i ends
                after.setdefault(int(end), i + 1)
            return after
        if not offsets:
            offsets, at = [], 0
            for token in tokens:
                offsets.append(at)
                at += len(token)
        for i, offset in enumerate(offsets):
            if i > 0:
                after.setdefault(int(offset), i)
        return after


class RemoteRewardPRM(_RemoteScorer):
    """A token-classification PRM behind vLLM's ``/pooling`` endpoint (see the module docstring).

    Input ids are built as :meth:`HFClassifierPRM.input_ids` does: the chat prompt's ids,
    then for each step its text (without the delimiter) and ``separator_token``.
    ``endpoint`` is the request path (leading ``/``: from the server root).
    """

    def __init__(
        self,
        base_url: str | Sequence[str] | EndpointPool,
        model: str,
        *,
        tokenizer: Any = None,
        separator_token: str = "<extra_0>",
        positive_label: int = 1,
        delimiter: str = "\n",
        endpoint: str = "/pooling",
        system_prompt: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
        cache_size: int = 1 << 17,
        n_parameters: int | None = None,
        api_key: str | None = None,
        max_concurrency: int = 64,
        timeout: float = 60.0,
        retries: int = 4,
        transport: Any = None,
    ):
        self._setup(base_url, model, tokenizer, system_prompt, delimiter, cache_size, n_parameters, extra_body,
                    api_key=api_key, max_concurrency=max_concurrency, timeout=timeout, retries=retries,
                    transport=transport)
        self.separator_id = single_token_id(self.tokenizer, separator_token, "the separator token")
        self.positive_label, self.endpoint = int(positive_label), endpoint

    def input_ids(self, request: ScoreRequest) -> tuple[list[int], list[int]]:
        """The token ids sent and the index of every separator (as HFClassifierPRM.input_ids)."""
        text, special = self.chat_prompt(request.problem.prompt)
        ids, seps = encode(self.tokenizer, text, add_special_tokens=special), []
        for step in request.steps:
            ids += encode(self.tokenizer, TagFormat.strip(step, self.delimiter))
            seps.append(len(ids))
            ids.append(self.separator_id)
        return ids, seps

    async def _send(self, request: ScoreRequest) -> Reply:
        body = {"model": self.model, "input": self.input_ids(request)[0], **self.extra_body}
        return await self.http.post(self.endpoint, body)

    def _read(self, request: ScoreRequest, reply: Reply) -> list[float]:
        ids, seps = self.input_ids(request)
        rows = reply.data["data"][0]["data"]
        if len(rows) == len(ids):
            rows = [rows[i] for i in seps]
        elif len(rows) != len(seps):
            raise ValueError(f"expected {len(ids)} rows (one per token) or {len(seps)} (one per separator), "
                             f"got {len(rows)}")
        return [self._positive(row) for row in rows]

    def _positive(self, row: Any) -> float:
        if isinstance(row, (int, float)):
            return float(row)
        row = [float(v) for v in row]
        if min(row) < 0 or abs(sum(row) - 1.0) > 1e-3:  # logits, not probabilities
            top = max(row)
            weights = [math.exp(v - top) for v in row]
            row = [w / sum(weights) for w in weights]
        return row[self.positive_label]
