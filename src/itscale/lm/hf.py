r"""A local Hugging Face causal LM as an itscale policy backend, with KV-cache reuse.

:class:`HFGenerator` implements :class:`itscale.protocols.Generator`. One call
serves a whole population: every request's ``k`` continuations are rows of one
batched decode (chunked by ``max_batch``).

What the model reads
--------------------
For a request with problem ``x`` and steps ``s_1..s_t`` the context text is

    c = chat_template([user: x], add_generation_prompt=True) + s_1 + … + s_t + carry(s_t)

(the raw prompt when the tokenizer has no chat template), and each continuation is
sampled after exactly ``c``. A continuation ends

- right after the first stop string in its text (``finish_reason="stop"``; the stop string
  stays in ``Step.text``, nothing after it; when the token that completed the stop string
  decodes to more, e.g. ``"\n\n   "``, the rest is ``Step.carry``: the next step of the
  particle starts with it and continues from the states after that whole token, so the
  concatenated steps are exactly the text the model generated),
- at an end-of-sequence token (``"eos"``; the token is counted in ``Step.tokens`` and its
  log-probability in ``Step.logprob``, but it is not in the text),
- or after ``params.max_step_tokens`` tokens, or at the model's last position
  (``max_position_embeddings``) if that comes first (``"length"``). A context that
  already fills every position gives ``finish_reason="error"``.

``Step.logprob = Σ_j log p(y_j | c, y_<j)`` over the generated tokens under the model's
raw distribution (temperature 1, no nucleus), in float64. Sampling is described in
:mod:`itscale.lm.sampling`: continuation ``j`` of a request with seed ``s`` uses only
its own row of uniforms, so results do not depend on batch composition.

Confidence
----------
With ``params.top_logprobs = k > 0``, ``Step.top_logprobs[j]`` is the ``k`` largest values of
``log softmax(z_j)`` (the same raw distribution, float64, descending) at the position that
sampled token ``j``: one tuple per counted token, the token that completed a stop string and
an end-of-sequence token included. With ``params.stop_below`` (window ``n``, threshold
``s``) each row checks, after each of its tokens that did not end it otherwise (stop string,
end-of-sequence, token limit), ``(1/n) Σ_{last n tokens} C_t < s`` with
``C_t = −mean(top_logprobs[t])`` (:class:`itscale.lm.confidence.WindowCheck`, once ``n``
tokens exist); when it holds, that row finishes there with ``finish_reason="low_confidence"``
(its text flushed as for ``length``) and the other rows decode on, token for token as
without it. :meth:`HFGenerator.race` does not take ``stop_below``.

Racing
------
:meth:`HFGenerator.race` decodes a request's ``k`` rows as above and stops the whole
batch after the first forward pass in which a row finished: the winner is the row with
the fewest tokens (lowest index on ties), token for token what ``generate_steps`` gives
that row with the same seed, and the race costs ``k`` times its length.
:meth:`HFGenerator.race_many` runs several races in one lock-step batch (the bench and the
server coalesce concurrent races into it, as they coalesce ``generate_steps`` calls): a row
that finishes ends its own request's race only, and the other requests' rows decode on, so
each outcome is the one :meth:`~HFGenerator.race` gives that request alone.

Key/value-cache reuse
---------------------
With ``reuse_cache=True`` a :class:`~itscale.lm.kv_cache.KVStore` (a prefix tree of KV
segments keyed by the text they cover) keeps the states of every context and every
generated step:

1. *Lookup.* For a context ``c`` find the deepest stored node whose text is a prefix
   of ``c``. The uncovered suffix ``c[covered:]`` alone is tokenized and prefilled
   on top of the node's states (their token ids are reused, never re-tokenized).
   When the node covers ``c`` exactly — the usual case, a particle continuing right
   after a step this generator produced — nothing is prefilled: the node stores the
   next-token logits too, and the first token is sampled from them.
2. *Store.* After a continuation stops, its last token is run through the model
   once more (it is needed anyway by whoever continues the particle) and the step's
   states and next-token logits are stored as a child node keyed by the step text.
   When a stop string ends inside a token, the whole token is stored (its text is
   the step's plus its carry, which the next step reads first); only if the last
   tokens do not decode whole (an incomplete UTF-8 character) are just the tokens that
   decode exactly to a prefix of the step kept, and the rest re-read as a suffix.
3. *Evict.* Least-recently-used leaves beyond ``cache_tokens`` stored tokens.

A request with a ``cache_namespace`` is looked up in, and stored into, that namespace's
tree of the store only (identical contexts of one call are shared only within a
namespace), so it never reuses states that requests of another namespace stored; the
``cache_tokens`` bound covers every namespace together.

Rows with different cached and new lengths share a batch with left padding, an
attention mask and explicit position ids (each row counts only its real tokens; see
:mod:`itscale.lm.prefill`).
``Step.prompt_tokens`` is the whole context's token count and ``Step.prefilled_tokens``
the tokens actually run through prefill for that request (both on the first
continuation only). Identical contexts in one call are prefilled once (the later
requests report 0 prefilled). With ``reuse_cache=False`` every request's context is
tokenized whole and prefilled, the baseline.

Caveat: for tokenizers whose tokens span several characters, the ids reused from
the cache are the tokens the model generated, while the baseline re-tokenizes the
text; the two can differ (both are valid encodings of the same text). With
character-level tokenizers they are identical.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..protocols import check_raceable
from ..types import Capabilities, RaceOutcome, SamplingParams, Step, StepRequest
from .confidence import WindowCheck, token_confidence
from .detok import Detokenizer, find_stop
from .hf_cache import accepts, buffered_cache, cache_kwarg, cache_states, check_full_attention, tokens_for_bytes
from .kv_cache import KVNode, KVStore, new_root
from .loading import (
    ChatPrompts,
    ModelLoadError,
    chat_prompt,
    count_parameters,
    encode,
    eos_token_ids,
    load_hf,
)
from .prefill import PrefillBatch, left_padded_kv, left_padding_mask, slice_kv
from .sampling import sample_tokens, token_logprobs, uniform_table

__all__ = ["GeneratorStats", "HFGenerator", "ModelLoadError"]

_DEFAULT_SEED = 0x5EED  # requests with params.seed None: this seed and a per-generator counter
_CACHE_BYTES = 1 << 30  # default cache budget when cache_tokens is not given


@dataclass
class GeneratorStats:
    """Counters since construction (or :meth:`HFGenerator.reset_stats`)."""

    calls: int = 0
    requests: int = 0
    rows: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    prefilled_tokens: int = 0
    forward_passes: int = 0
    cache_hits: int = 0  # contexts served entirely from the cache (nothing prefilled)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(eq=False)
class _Context:
    """One distinct context text of a call, ready to decode from once ``node`` is set."""

    text: str
    node: KVNode | None = None
    namespace: str | None = None  # the cache namespace it is looked up and stored in
    prompt_tokens: int = 0
    prefilled: int = 0
    error: str | None = None
    claimed: bool = False  # whether a request has already reported its prefill


@dataclass(eq=False)
class _Row:
    request: int
    ctx: _Context
    params: SamplingParams
    stops: tuple[str, ...]
    uniforms: torch.Tensor
    limit: int  # max_step_tokens, or fewer near the model's last position
    detok: Detokenizer | None = None
    n_tokens: int = 0
    logprob: float = 0.0
    text: str | None = None
    finish: str | None = None
    fed: int = 0  # generated tokens already run through the model
    store_kept: int = 0  # generated tokens to store once fed (0: nothing to store)
    ids: list[int] = field(default_factory=list)  # generated ids (without an EOS)
    head: str = ""  # the previous step's carry: the text this continuation begins with
    carry: str = ""  # what the last token produced past the stop string
    top: list[tuple[float, ...]] | None = None  # per token, the top-k log-probabilities (k > 0)
    watch: WindowCheck | None = None  # params.stop_below's rule for this row

    def __post_init__(self) -> None:
        if self.params.top_logprobs:
            self.top = []
        stop = self.params.stop_below
        if stop is not None:
            self.watch = WindowCheck(stop.window, stop.threshold)


class HFGenerator:
    """A Hugging Face causal LM as a batched, seeded, KV-reusing step generator.

    ``path_or_model`` is a model folder or a ``.gguf`` file (loaded with
    ``AutoModelForCausalLM``), or a model object (then ``tokenizer`` is required); see
    :func:`~itscale.lm.loading.load_hf`. ``device="auto"`` is CUDA, else MPS, else the CPU;
    ``dtype="auto"`` is the checkpoint's 16-bit dtype on CUDA/MPS and float32 on the CPU
    (a model object keeps its own). ``cache_tokens`` bounds
    the stored KV tokens (default: as many as fit in 1 GiB; stored next-token logits
    count as the KV tokens of the same memory). ``run_in_thread`` runs
    the torch work in a worker thread so the event loop stays responsive; calls are
    serialised by a lock either way.
    """

    def __init__(
        self,
        path_or_model: Any,
        tokenizer: Any = None,
        *,
        device: Any = "auto",
        dtype: Any = "auto",
        max_batch: int = 64,
        cache_tokens: int | None = None,
        reuse_cache: bool = True,
        system_prompt: str | None = None,
        run_in_thread: bool = True,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        loaded = load_hf(path_or_model, tokenizer, "causal_lm", device, dtype, owner="HFGenerator")
        model, tokenizer = loaded.model, loaded.tokenizer
        check_full_attention(model)
        self.model, self.tokenizer = model, tokenizer
        self.device, self.dtype = loaded.device, loaded.dtype
        self.max_batch = int(max_batch)
        self.reuse_cache = bool(reuse_cache)
        self.system_prompt = system_prompt
        self.run_in_thread = run_in_thread
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)
        self.pad_id = int(pad)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self._cache_kw = cache_kwarg(model)
        self._logits_to_keep = accepts(model, "logits_to_keep")
        self.capabilities = Capabilities(
            logprobs=True, top_logprobs=True, n_per_request=True, prefix_cache=self.reuse_cache,
            n_parameters=count_parameters(model),
        )
        self.store = KVStore(cache_tokens if cache_tokens is not None else tokens_for_bytes(model, _CACHE_BYTES))
        self.stats = GeneratorStats()
        self._chat_prompts = ChatPrompts(self.tokenizer, self.system_prompt)
        self._add_special_tokens = chat_prompt(tokenizer, "", None)[1]
        self._seeds = itertools.count()
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> "HFGenerator":
        """Load a local model folder or .gguf file; :class:`ModelLoadError` names it and the cause."""
        return cls(Path(path), **kwargs)

    # -- public API -----------------------------------------------------------------
    async def generate_steps(self, requests: Sequence[StepRequest]) -> list[list[Step]]:
        if self.run_in_thread:
            return await asyncio.to_thread(self.generate_steps_sync, list(requests))
        return self.generate_steps_sync(requests)

    def generate_steps_sync(self, requests: Sequence[StepRequest]) -> list[list[Step]]:
        """The same as :meth:`generate_steps`, blocking."""
        with self._lock, torch.inference_mode():
            return self._generate(list(requests))

    async def race(self, request: StepRequest) -> RaceOutcome:
        """The first of ``request.k`` samples to finish (:class:`itscale.protocols.Racer`),
        decoded in lock-step and stopped early.

        The ``k`` rows are exactly the rows :meth:`generate_steps` decodes for ``request``
        (the same context, and the same uniforms: row ``j`` draws from row ``j`` of the
        request's seeded table, so its tokens do not depend on the other rows). Forward pass
        ``t`` gives every running row its ``t``-th token; the first pass after which a row has
        finished (stop string, end-of-sequence, or its token limit) ends the race. With
        ``L_j`` the token count ``generate_steps`` gives row ``j`` (same seed):

        - ``index = argmin_j L_j`` (the lowest ``j`` on ties), and ``winner`` is that row's
          step as ``generate_steps`` returns it (text, tokens, log-probability, carry), with
          the request's ``prompt_tokens`` / ``prefilled_tokens``;
        - ``spent_tokens = k · L_min``: every row generated ``L_min`` tokens (when
          ``k <= max_batch``; a larger ``k`` decodes in chunks of ``max_batch`` one after
          another, each chunk stopped at the fewest tokens any earlier row finished with,
          so ``spent_tokens`` counts what the chunks really generated, ``>= k · L_min``);
        - ``cancelled`` = the rows that had not finished (``L_j > L_min``).

        A carry that already holds a stop string is the whole step (index 0, nothing spent).
        A context that leaves no room in the model fails every row: the winner is that error
        step, index 0, nothing spent. ``k < 1`` raises ``ValueError``.
        """
        if self.run_in_thread:
            return await asyncio.to_thread(self.race_sync, request)
        return self.race_sync(request)

    def race_sync(self, request: StepRequest) -> RaceOutcome:
        """The same as :meth:`race`, blocking."""
        return self.race_many_sync([request])[0]

    async def race_many(self, requests: Sequence[StepRequest]) -> list[RaceOutcome]:
        """:meth:`race` for each request, decoded together: the rows of every request share
        the lock-step batch (up to ``max_batch`` rows; a request's rows never split across
        batches unless it alone has more), and a pass in which a row finishes ends that row's
        request's race, not the others'. Outcome ``i`` is :meth:`race` of ``requests[i]``."""
        if self.run_in_thread:
            return await asyncio.to_thread(self.race_many_sync, requests)
        return self.race_many_sync(requests)

    def race_many_sync(self, requests: Sequence[StepRequest]) -> list[RaceOutcome]:
        """The same as :meth:`race_many`, blocking."""
        for request in requests:
            if request.k < 1:
                raise ValueError(f"race needs k >= 1 samples to race, got k={request.k}")
            check_raceable(request)
        with self._lock, torch.inference_mode():
            return self._race(list(requests))

    def reset_stats(self) -> None:
        self.stats = GeneratorStats()

    def clear_cache(self) -> None:
        self.store.clear()

    def context_room(self, prompt: str) -> int | None:
        """Positions the model has left after ``prompt``'s chat prompt (None: no known limit)."""
        if not self.max_positions:
            return None
        text, special = self._chat_prompts(prompt)
        return self.max_positions - len(encode(self.tokenizer, text, add_special_tokens=special))

    def context_text(self, prompt: str, prefix: str = "") -> str:
        """The exact text the model continues for a problem prompt and a solution prefix."""
        return self._chat_prompts(prompt)[0] + prefix

    # -- one call -------------------------------------------------------------------
    def _generate(self, requests: list[StepRequest]) -> list[list[Step]]:
        rows = self._rows(requests)
        # chunks of similar context lengths pad less (rows of one context stay together)
        live = sorted((row for row in rows if row.ctx.error is None and row.finish is None),
                      key=lambda row: row.ctx.node.length)
        for start in range(0, len(live), self.max_batch):
            self._decode(live[start:start + self.max_batch])
        outputs: list[list[Step]] = [[] for _ in requests]
        for row in rows:
            outputs[row.request].append(self._step(row, first=not outputs[row.request]))
        if self.reuse_cache:
            self.store.trim()
        return outputs

    def _rows(self, requests: list[StepRequest]) -> list[_Row]:
        """Every continuation of the call as a row, its context prefilled (or failed); a row
        whose carry already holds a stop string is finished."""
        self.stats.calls += 1
        self.stats.requests += len(requests)
        texts = [self.context_text(r.problem.prompt, r.prefix + r.carry) for r in requests]
        contexts = self._prepare(texts, [r.cache_namespace for r in requests])
        rows: list[_Row] = []
        for i, r in enumerate(requests):
            seed = r.params.seed if r.params.seed is not None else _DEFAULT_SEED * 1_000_003 + next(self._seeds)
            table = uniform_table(seed, r.k, r.params.max_step_tokens)
            limit = r.params.max_step_tokens
            if self.max_positions and contexts[i].node is not None:  # stop at the model's last position
                limit = min(limit, self.max_positions - contexts[i].node.length)
            rows.extend(_Row(i, contexts[i], r.params, tuple(r.stop), table[j], limit, head=r.carry)
                        for j in range(r.k))
        for row in rows:  # a carry that holds a stop string is a whole step already
            end = find_stop(row.head, row.stops, 0) if row.head and row.stops else None
            if end is not None:
                row.text, row.carry, row.finish = row.head[:end], row.head[end:], "stop"
        return rows

    def _race(self, requests: list[StepRequest]) -> list[RaceOutcome]:
        rows = self._rows(requests)
        of = [[row for row in rows if row.request == i] for i in range(len(requests))]
        best = [math.inf] * len(requests)  # per request, the fewest tokens a row has finished with so far
        chunk: list[_Row] = []

        def decode() -> None:
            if chunk:
                self._decode(chunk, race={row.request: best[row.request] for row in chunk})
                for row in chunk:
                    if row.finish is not None:
                        best[row.request] = min(best[row.request], row.n_tokens)
                chunk.clear()

        for own in of:  # whole requests per batch; one larger than a batch alone, batch after batch
            live = [row for row in own if row.ctx.error is None and row.finish is None]
            if len(chunk) + len(live) > self.max_batch:
                decode()
            for start in range(0, len(live), self.max_batch):
                chunk.extend(live[start:start + self.max_batch])
                if len(live) > self.max_batch:
                    decode()
        decode()
        outcomes = []
        for own in of:
            finished = [j for j, row in enumerate(own) if row.finish is not None]
            index = min(finished, key=lambda j: (own[j].n_tokens, j), default=0)
            spent = sum(row.n_tokens for row in own)
            winner = self._step(own[index], first=True)
            self.stats.rows += sum(row.ctx.error is None for j, row in enumerate(own) if j != index)
            self.stats.generated_tokens += spent - own[index].n_tokens
            running = sum(row.finish is None for row in own if row.ctx.error is None)
            outcomes.append(RaceOutcome(winner, index, spent, running))
        if self.reuse_cache:
            self.store.trim()
        return outcomes

    def _step(self, row: _Row, first: bool) -> Step:
        ctx = row.ctx
        if ctx.error is not None:
            return Step("", finish_reason="error", error=ctx.error, prompt_tokens=0, prefilled_tokens=0)
        prompt, prefilled = 0, 0
        if first:
            prompt = ctx.prompt_tokens
            if not ctx.claimed:
                prefilled, ctx.claimed = ctx.prefilled, True
        self.stats.rows += 1
        self.stats.generated_tokens += row.n_tokens
        self.stats.prompt_tokens += prompt
        self.stats.prefilled_tokens += prefilled
        return Step(row.text or "", row.n_tokens, prompt, prefilled, row.logprob, row.finish or "length",
                    carry=row.carry, top_logprobs=None if row.top is None else tuple(row.top))

    # -- contexts: lookup and prefill ----------------------------------------------
    def _prepare(self, texts: Sequence[str], namespaces: Sequence[str | None]) -> list[_Context]:
        """One context per request (shared by requests with the same text and cache namespace
        when reusing)."""
        if self.reuse_cache:
            keys = list(zip(namespaces, texts))
            distinct = {key: _Context(key[1], namespace=key[0]) for key in dict.fromkeys(keys)}
            contexts = [distinct[key] for key in keys]
        else:
            contexts = [_Context(text) for text in texts]
        pending: list[tuple[_Context, KVNode, str, list[int]]] = []
        scratch = new_root()  # parent of nodes that are not stored (reuse off)
        for ctx in dict.fromkeys(contexts):
            text = ctx.text
            if self.reuse_cache:
                # a node without next-token logits can only be a base for a non-empty suffix
                node, covered = self.store.match_text(
                    text, lambda n, pos, end=len(text): n.logits is not None or pos < end, namespace=ctx.namespace)
            else:
                node, covered = scratch, 0
            if covered == len(text) and node.logits is not None:
                if self._too_long(ctx, node.length):
                    continue
                ctx.node, ctx.prompt_tokens = node, node.length
                self.store.touch(node)
                self.stats.cache_hits += 1
                continue
            if covered:
                key, ids = text[covered:], encode(self.tokenizer, text[covered:])
            else:
                key, ids = text, encode(self.tokenizer, text, add_special_tokens=self._add_special_tokens)
            if not ids:
                ctx.error = "the context tokenizes to no tokens"
                continue
            if self._too_long(ctx, node.length + len(ids)):
                continue
            pending.append((ctx, node, key, ids))
        pending.sort(key=lambda p: p[1].length + len(p[3]))
        for start in range(0, len(pending), self.max_batch):
            self._prefill(pending[start:start + self.max_batch])
        return contexts

    def _too_long(self, ctx: _Context, length: int) -> bool:
        if self.max_positions and length >= self.max_positions:
            ctx.error = f"a context of {length} tokens leaves no room in the model's {self.max_positions} positions"
            return True
        return False

    def _prefill(self, chunk: list[tuple[_Context, KVNode, str, list[int]]]) -> None:
        batch = PrefillBatch.build([base for _, base, _, _ in chunk], [ids for *_, ids in chunk], self.pad_id)
        logits = self._forward(batch.input_ids, batch.attention_mask, batch.position_ids, batch.cache)
        for b, (ctx, base, key, ids) in enumerate(chunk):
            n = len(ids)
            node = KVNode(key, base, torch.tensor(ids, dtype=torch.long), batch.new_kv(b, 0, n),
                          logits=logits[b].clone())
            if self.reuse_cache:
                node = self.store.insert(node)
            ctx.node, ctx.prompt_tokens, ctx.prefilled = node, node.length, n

    def _forward(self, input_ids, mask, positions, cache) -> torch.Tensor:
        """Next-token logits ``[B, V]`` (float32) at the last column; ``cache`` grows in place."""
        kwargs = {self._cache_kw: cache, "use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(
            input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device), **kwargs,
        )
        self.stats.forward_passes += 1
        return out.logits[:, -1].float()

    # -- decoding -------------------------------------------------------------------
    def _decode(self, rows: list[_Row], race: dict[int, float] | None = None) -> None:
        """Decode ``rows`` in lock-step (one token for every running row per forward pass)
        until each has finished. ``race`` (see :meth:`race_many`), per request index: that
        request's rows stop after the first pass in which one of them finished, or once they
        have ``race[request]`` tokens; the rows stopped then stay unfinished (``finish`` None)."""
        nodes = list(dict.fromkeys(row.ctx.node for row in rows))
        where = {id(n): i for i, n in enumerate(nodes)}
        index = torch.tensor([where[id(row.ctx.node)] for row in rows], device=self.device)
        spare = max(row.limit for row in rows) + 1
        keys, values, P = left_padded_kv(nodes, spare)
        if len(nodes) < len(rows):  # copies of a context (k > 1): one buffer row each
            keys, values = [k.index_select(0, index) for k in keys], [v.index_select(0, index) for v in values]
        cache = buffered_cache(keys, values, P)
        lengths = torch.tensor([row.ctx.node.length for row in rows], dtype=torch.long)
        mask = left_padding_mask(lengths, P)
        positions = lengths.clone()
        logits = torch.stack([n.logits for n in nodes]).index_select(0, index)
        temperature = torch.tensor([row.params.temperature for row in rows], dtype=torch.float64)
        top_p = torch.tensor([row.params.top_p for row in rows], dtype=torch.float64)
        top_k = max(row.params.top_logprobs for row in rows)  # the top log-probabilities any row asks
        width = max(row.uniforms.numel() for row in rows)
        uniforms = torch.zeros((len(rows), width), dtype=torch.float64)
        for b, row in enumerate(rows):
            uniforms[b, : row.uniforms.numel()] = row.uniforms
            row.detok = Detokenizer(self.tokenizer, row.ctx.node.tail_ids(8))

        batch = list(rows)  # batch position -> row; finished rows stay until compacted away
        live = set(range(len(rows)))
        t = 0
        while live:
            tokens = sample_tokens(logits, temperature, top_p, uniforms[:, t]).tolist()
            lps, tops = token_logprobs(logits, torch.tensor(tokens, device=logits.device), top_k)
            lps, tops = lps.tolist(), None if tops is None else tops.tolist()
            finals = set()  # rows whose last token must be run once more to store the step
            ended = set()  # the requests a row of which finished in this pass
            for b in sorted(live):
                row = batch[b]
                if not self._advance(row, tokens[b], lps[b], None if tops is None else tops[b]):
                    continue
                live.discard(b)
                ended.add(row.request)
                if row.store_kept > row.fed:
                    finals.add(b)
                elif row.store_kept:  # a stop string ended inside a token: store what was fed
                    self._store(row, cache, b, P, None)
            if race is not None:  # those races are over: their other rows stop here (finished rows are still stored)
                ended |= {request for request, bound in race.items() if t + 1 >= bound}
                live = {b for b in live if batch[b].request not in ended}
            feed = sorted(live | finals)
            if not feed:
                break
            if 4 * (len(batch) - len(feed)) >= len(batch):  # compact: drop finished rows
                keep = torch.tensor(feed, device=self.device)
                for layer in cache.layers:
                    layer.batch_select_indices(keep)
                cpu_keep = torch.tensor(feed)
                mask, positions = mask.index_select(0, cpu_keep), positions.index_select(0, cpu_keep)
                temperature, top_p = temperature.index_select(0, cpu_keep), top_p.index_select(0, cpu_keep)
                uniforms = uniforms.index_select(0, cpu_keep)
                renumber = {old: new for new, old in enumerate(feed)}
                batch, tokens = [batch[old] for old in feed], [tokens[old] for old in feed]
                live, finals = {renumber[b] for b in live}, {renumber[b] for b in finals}
            running = live | finals
            fed = [[tok if b in running else self.pad_id] for b, tok in enumerate(tokens)]
            mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=torch.long)], dim=1)
            logits = self._forward(torch.tensor(fed, dtype=torch.long), mask, positions[:, None], cache)
            positions = positions + 1
            for b in running:
                batch[b].fed += 1
            for b in finals:
                self._store(batch[b], cache, b, P, logits[b])
            t += 1

    def _advance(self, row: _Row, token: int, logprob: float, top: list[float] | None) -> bool:
        """Take one sampled token (``top``: the position's largest log-probabilities, when asked);
        True when the row has finished."""
        row.n_tokens += 1
        row.logprob += logprob
        confident = True
        if row.top is not None:
            row.top.append(tuple(top[: row.params.top_logprobs]))
            confident = row.watch is None or not row.watch.push(token_confidence(row.top[-1]))
        detok = row.detok
        head = row.head
        if token in self.eos_ids:
            detok.flush()
            row.text, row.finish = head + detok.text, "eos"
            return True
        row.ids.append(token)
        start = len(detok.text)
        detok.push(token)
        stop_end = (find_stop(head + detok.text, row.stops, len(head) + start)
                    if row.stops and len(detok.text) > start else None)
        if stop_end is not None:
            row.text, row.finish = (head + detok.text)[:stop_end], "stop"
            if detok.kept_tokens(len(detok.text)) == len(row.ids):  # every token decoded whole: carry the rest
                row.carry = (head + detok.text)[stop_end:]
        elif row.n_tokens >= row.limit or not confident:
            detok.flush()
            row.text, row.finish = head + detok.text, "length" if row.n_tokens >= row.limit else "low_confidence"
        else:
            return False
        if self.reuse_cache:  # with a carry, the whole last token (its text goes on in the next step)
            row.store_kept = len(row.ids) if row.carry else detok.kept_tokens(len(row.text) - len(head))
        return True

    def _store(self, row: _Row, cache, b: int, P: int, logits: torch.Tensor | None) -> None:
        """Store the row's kept generated tokens (batch columns ``[P, P + kept)``) under its context."""
        key = row.detok.text[: row.detok.kept_text_end(row.store_kept)]
        if not key:
            return
        ids = torch.tensor(row.ids[: row.store_kept], dtype=torch.long)
        node = KVNode(key, row.ctx.node, ids, slice_kv(cache_states(cache), b, P, P + row.store_kept),
                      logits=None if logits is None else logits.clone())
        self.store.insert(node)
