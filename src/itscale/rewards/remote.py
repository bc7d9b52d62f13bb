r"""Process reward models behind an HTTP server.

Both talk to their server through a :class:`~itscale.lm.completions.CompletionsClient`
(the pool, the tokenizer, the chat prompt, posting and reply parsing) and build their
input with the shared :class:`~itscale.rewards.encoding.PRMEncoder`, so they read what
the local PRMs read.

:class:`RemoteTagPRM` — a tag-style causal-LM PRM (Math-Shepherd / RLHFlow, and the
embedded PRM) served by any OpenAI-compatible completions server, scored from the
next-token log-probabilities right after each step's tag. It builds exactly the text
:class:`~itscale.rewards.hf.HFTagPRM` scores (:meth:`RemoteTagPRM.text`, the
encoder's ``text`` with ``mark = tag`` and ``after = separator``)::

    chat_prompt(problem) + Σ_t (strip(s_t) + tag + separator)

and scores step t by a one-token completion of the text up to the end of the t-th
tag, ``c_t``::

    POST {base}/completions
    {"model": M, "prompt": [c_t, …], "max_tokens": 1, "temperature": 0,
     "logprobs": top_logprobs,
     "add_special_tokens": false}   # vLLM extension, when the chat template wrote the
                                    # special tokens itself (as HFTagPRM encodes it)

``choices[i].logprobs.top_logprobs[0]`` is the model's next-token distribution after
``c_i`` (vLLM returns the raw distribution, before temperature), read as

    s_t = p(good) / (p(good) + p(bad)).

Only steps whose score is not cached are sent: a particle filter's round costs one
prompt per particle (its new step), and the server's prefix cache re-reads only
that step, so scoring stays linear in the solution length (a server without prefix
caching re-reads each ``c_t`` whole). The prompts of a call go as ``prompt`` lists of
at most ``merge_prompts`` strings per HTTP request (deterministic, so merging costs
nothing), which keeps the server's per-request overhead off the critical path.

If ``good`` or ``bad`` is missing from the top-k, its probability is bounded by the
k-th largest probability at that position and that bound is used: with ``bad``
missing the score is a *lower* bound, with ``good`` missing an *upper* bound
(``stats.bounded_steps`` counts them; raise ``top_logprobs`` — vLLM caps it at its
``--max-logprobs``, default 20 — to avoid it). If both are missing the step's score
is NaN. Token keys are matched as strings (``"+"``), or as ``"token_id:N"`` when vLLM
runs with ``--return-tokens-as-token-ids``.

Caveats: the server tokenizes each ``c_t`` whole, whereas HFTagPRM encodes the text
piece by piece (prompt, step, tag, separator); for character-level tokenizers (the
embedded PRM) the two are identical, for BPE tokenizers a token may differ at a step
boundary. A server that ignores ``add_special_tokens: false`` prepends a second BOS to
a chat template that writes one, which shifts the scores.

:class:`RemoteRewardPRM` — a token-classification PRM (Qwen2.5-Math-PRM style) behind
vLLM's pooling API: ``POST {server}/pooling`` with ``{"model": M, "input": ids}``,
where ``ids`` are built client-side exactly as
:meth:`~itscale.rewards.hf.HFClassifierPRM.input_ids` does (the encoder's ``ids`` with
``mark = separator token`` and nothing after it: prompt, then each step and a separator
token). The reply's ``data[0].data`` holds one row per token (``ALL``
pooling; rows at the separator positions are read) or one row per separator
(``STEP`` pooling, vLLM's ``step_tag_id``); the score is ``row[positive_label]``
(rows that are not probabilities are softmaxed first; a scalar row is the score).

Both scorers cache scores by step prefix — ``(problem prompt, steps[:t]) → s_t`` — so a
request whose every prefix has been scored costs no request (``tokens=0``).
RemoteRewardPRM sends the whole text of any other request (a server with prefix
caching, like vLLM's, re-reads only the new part) and ``StepScores.tokens`` is the
reply's ``usage.prompt_tokens``; RemoteTagPRM counts the tokens of the prompts it
sends for the request (local tokenizer). Identical requests (and prefixes) in one
call are sent once: the copies report 0 tokens. Both split their cache, and what one
call shares, by ``ScoreRequest.cache_namespace``, and send a namespaced request with
vLLM's ``cache_salt`` for it (with the client's extensions on; see
:mod:`itscale.lm.completions`, "Cache namespaces"), so the server's prefix cache is split
the same way. A request that fails after its retries never raises: its steps score NaN (the particle dies) and
``stats.last_error`` keeps the reason. Scores are clipped to [1e-12, 1 − 1e-12].
"""

from __future__ import annotations

import asyncio
import functools
import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from ..lm.completions import CompletionsClient, OnClient, Sampling, unexpected_shape
from ..lm.http import BackendError, EndpointPool, Reply
from ..lm.loading import encode, single_token_id
from ..types import Capabilities, ScoreRequest, StepScores
from .encoding import PRMEncoder
from .formats import EMBEDDED_TAG_FORMAT, TagFormat
from .judge import JudgePrompt, answer_ids
from .prefix_cache import PrefixScores, StepUnits

__all__ = ["RemoteJudgePRM", "RemotePRMStats", "RemoteRewardPRM", "RemoteTagPRM", "tag_score"]

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


def tag_score(top: Mapping[str, float], good: Sequence[Sequence[str]], bad: Sequence[Sequence[str]],
              k: int) -> tuple[float, bool]:
    """``(p(good) / (p(good) + p(bad)), bounded)`` from one position's top-k log-probabilities.

    ``good`` / ``bad`` are groups of keys, one group per token (a tag PRM's ``+``; a judge's
    ``Yes`` and ``␣Yes``), each group the keys that token's entry may appear under (its text,
    ``token_id:N``); p(good) sums the tokens' probabilities. When no token of one side is in
    the top-k, that side gets the k-th largest probability there (an upper bound on any one
    missing token) and ``bounded`` is True; NaN when both sides are missing.
    """
    def prob(groups: Sequence[Sequence[str]]) -> float | None:
        found = [max(top[key] for key in keys if key in top and top[key] is not None) for keys in groups
                 if any(key in top and top[key] is not None for key in keys)]
        return sum(math.exp(v) for v in found) if found else None

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


class _RemoteScorer(OnClient):
    """The client, prefix cache and failure handling shared by the remote PRMs."""

    def _setup(self, base_url, model, tokenizer, system_prompt, delimiter, cache_size, n_parameters, extra_body,
               extensions: bool = True, **http: Any) -> None:
        self.client = CompletionsClient(base_url, model, tokenizer=tokenizer, api="completions",
                                        system_prompt=system_prompt, extensions=extensions, extra_body=extra_body,
                                        **http)
        if self.client.tokenizer is None:
            raise ValueError(
                f"{type(self).__name__} needs the PRM's tokenizer to build its input exactly: pass tokenizer=FOLDER "
                "(or a tokenizer object), or a local model folder as model"
            )
        self.delimiter, self.cache_size = delimiter, int(cache_size)
        self.capabilities = Capabilities(n_parameters=n_parameters, server_batching=True)
        self.stats = RemotePRMStats()
        self._scores = PrefixScores(self.cache_size)

    # -- public API -------------------------------------------------------------------
    def chat_prompt(self, prompt: str) -> tuple[str, bool]:
        """The chat prompt text, and whether tokenizing it adds special tokens (as in HFTagPRM)."""
        return self.client.chat_prompt(prompt)

    async def score_steps(self, requests: Sequence[ScoreRequest]) -> list[StepScores]:
        self.stats.calls += 1
        self.stats.requests += len(requests)
        hits, todo = self._scores.lookup(requests)
        out: list[StepScores | None] = [None if hit is None else StepScores(hit, 0) for hit in hits]
        self.stats.cached_steps += sum(len(hit) for hit in hits if hit is not None)
        keys = list(todo)
        results = await asyncio.gather(*(self._score_one(requests[todo[key][0]]) for key in keys))
        for key, (scores, tokens) in zip(keys, results):
            self._scores.put(key[0], key[1], scores, namespace=key[2])
            first, *rest = todo[key]
            out[first] = StepScores(scores, tokens)
            for i in rest:
                out[i] = StepScores(scores, 0)
        return out  # type: ignore[return-value]

    def clear_cache(self) -> None:
        self._scores.clear()

    def reset_stats(self) -> None:
        self.stats = RemotePRMStats()

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
                raise unexpected_shape(reply.endpoint, err) from err
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
    """A tag-style causal-LM PRM scored by next-token log-probabilities (see the module docstring).

    ``base_url``/``api_key``/``max_concurrency``/``timeout``/``retries``/``transport`` are
    as for :class:`~itscale.lm.openai.OpenAIGenerator` (or pass an ``EndpointPool``).
    ``extensions=False`` leaves out the vLLM field ``add_special_tokens``.
    ``merge_prompts`` is the most prompts sent in one HTTP request.
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
        merge_prompts: int = 256,
        api_key: str | None = None,
        max_concurrency: int = 64,
        timeout: float = 60.0,
        retries: int = 4,
        transport: Any = None,
    ):
        if top_logprobs < 1:
            raise ValueError(f"top_logprobs must be >= 1, got {top_logprobs}")
        if merge_prompts < 1:
            raise ValueError(f"merge_prompts must be >= 1, got {merge_prompts}")
        self._setup(base_url, model, tokenizer, system_prompt, delimiter, cache_size, n_parameters, extra_body,
                    extensions=extensions, api_key=api_key, max_concurrency=max_concurrency, timeout=timeout,
                    retries=retries, transport=transport)
        self.top_logprobs, self.merge_prompts = int(top_logprobs), int(merge_prompts)
        self._reader(format, delimiter, system_prompt)

    def _reader(self, format: TagFormat, delimiter: str, system_prompt: str | None) -> None:
        """How steps are read: the encoder, and the good and bad tokens' keys (one group each)."""
        self.format = format
        self.encoder = PRMEncoder(self.tokenizer, format.tag, format.separator, delimiter=delimiter,
                                  system_prompt=system_prompt)
        self._special = self.encoder.adds_special_tokens()  # whether tokenizing a prompt adds special tokens
        self._good = (self._keys(format.good, "the PRM good token"),)
        self._bad = (self._keys(format.bad, "the PRM bad token"),)
        self._names, self._where = (format.good, format.bad), "after a tag"

    @property
    def extensions(self) -> bool:
        return self.client.extensions

    def _keys(self, token: str, what: str) -> tuple[str, ...]:
        """The strings a token's top-logprob entry may be keyed by (its text, ``token_id:N``)."""
        return (token, f"token_id:{single_token_id(self.tokenizer, token, what)}")

    def text(self, request: ScoreRequest) -> tuple[str, list[int]]:
        """The exact text HFTagPRM scores, and the character offset where each tag ends."""
        return self.encoder.text(request.problem.prompt, request.steps)

    async def score_steps(self, requests: Sequence[ScoreRequest]) -> list[StepScores]:
        self.stats.calls += 1
        self.stats.requests += len(requests)
        plan = StepUnits(self._scores, requests, self._unit_reader())
        self.stats.cached_steps += plan.cached_steps
        # one namespace (one cache salt) per HTTP request
        chunks = [(namespace, keys[j:j + self.merge_prompts]) for namespace, keys in plan.by_namespace().items()
                  for j in range(0, len(keys), self.merge_prompts)]
        scored: dict = {}
        replies = await asyncio.gather(*(self._score_prompts([plan.units[k] for k in c], ns) for ns, c in chunks))
        for (_, chunk), scores in zip(chunks, replies):
            scored.update(zip(chunk, scores))
        return plan.finish(scored, lambda text: len(encode(self.tokenizer, text, add_special_tokens=self._special)))

    def _unit_reader(self):
        """``unit(request, t)``: what is sent to score step t, the text up to the end of its tag
        (each request's text built once per call)."""
        texts = functools.cache(self.text)
        return lambda request, t: texts(request)[0][: texts(request)[1][t]]

    async def _score_prompts(self, prompts: list[str], namespace: str | None = None) -> list[float]:
        """One merged request: the tag score after each prompt; NaN for all (never raises) on failure."""
        sampling = Sampling(max_tokens=1, temperature=0.0, logprobs=self.top_logprobs, keep_stop_strings=False,
                            cache_namespace=namespace)
        try:
            reply = await self.client.post_learning("completions", lambda: self.client.completions_body(
                prompts, sampling), resend_after_context_length=False)
            self.stats.http_requests += 1
            completion = self.client.parse(reply, expected=len(prompts))
            try:
                tops = [c.top_logprobs[0] for c in completion.choices]  # type: ignore[index]
            except (IndexError, TypeError) as err:  # no top_logprobs
                raise unexpected_shape(reply.endpoint, err) from err
        except BackendError as err:
            self.stats.failed_steps += len(prompts)
            self.stats.last_error = str(err)
            return [_NAN] * len(prompts)
        scores = []
        for top in tops:
            score, bounded = tag_score(top or {}, self._good, self._bad, self.top_logprobs)
            self.stats.bounded_steps += bounded
            if math.isnan(score):
                self.stats.failed_steps += 1
                self.stats.last_error = (f"{reply.endpoint}: neither {self._names[0]!r} nor {self._names[1]!r} "
                                         f"is in the top {self.top_logprobs} {self._where}")
            else:
                self.stats.scored_steps += 1
            scores.append(_clip(score))
        return scores


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
        self.encoder = PRMEncoder(self.tokenizer, separator_token, "", delimiter=delimiter,
                                  system_prompt=system_prompt, what="the separator token")
        self.separator_id = self.encoder.mark_id
        self.positive_label, self.endpoint = int(positive_label), endpoint

    def input_ids(self, request: ScoreRequest) -> tuple[list[int], list[int]]:
        """The token ids sent and the index of every separator (as HFClassifierPRM.input_ids)."""
        encoded = self.encoder.encode(request.problem.prompt, request.steps)
        return encoded.ids, encoded.marks

    async def _send(self, request: ScoreRequest) -> Reply:
        ids = self.input_ids(request)[0]
        return await self.client.post_learning(self.endpoint, lambda: {
            "model": self.model, "input": ids, **self.client.cache_fields(request.cache_namespace),
            **self.extra_body}, resend_after_context_length=False)

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


class RemoteJudgePRM(RemoteTagPRM):
    """A chat model behind an OpenAI-compatible completions server as an LLM judge
    (:mod:`itscale.rewards.judge`): step t scores ``p(yes) / (p(yes) + p(no))`` from the top
    log-probabilities of one token after the judge's question about it, rendered here with the
    judge's chat template (so ``tokenizer`` is required, as for :class:`RemoteTagPRM`).

    ``template``, ``yes``, ``no`` as for :class:`~itscale.rewards.hf.HFJudgePRM`; ``delimiter``
    the policy's step delimiter; every other argument as for :class:`RemoteTagPRM`. A yes or
    no spelling missing from the top-k is bounded as :func:`tag_score` says; when neither side
    is there the step scores NaN and ``stats.last_error`` says so."""

    def __init__(self, base_url: str | Sequence[str] | EndpointPool, model: str, *, template: str | None = None,
                 yes: str = "Yes", no: str = "No", delimiter: str = "\n\n", **kwargs: Any):
        self._words = (template, yes, no)
        super().__init__(base_url, model, delimiter=delimiter, **kwargs)

    def _reader(self, format: TagFormat, delimiter: str, system_prompt: str | None) -> None:
        template, yes, no = self._words
        self.prompt = JudgePrompt(self.tokenizer, template, delimiter=delimiter, system_prompt=system_prompt)
        self._special = self.prompt.adds_special_tokens()
        yes_ids, no_ids = answer_ids(self.tokenizer, yes, no)
        self._good, self._bad = self._groups(yes_ids), self._groups(no_ids)
        self._names, self._where = (yes, no), "as the judge's first answer token"

    def _groups(self, ids: list[int]) -> tuple[tuple[str, ...], ...]:
        """Each answer token's keys in a top-logprobs entry: its text and ``token_id:N``."""
        return tuple((self.tokenizer.decode([i]), f"token_id:{i}") for i in ids)

    def _unit_reader(self):
        """``unit(request, t)``: the judge's whole input about step t (only uncached steps are asked)."""
        return lambda request, t: self.prompt.text(request, t)[0]
