r"""Hugging Face process reward models: tag-style (causal LM) and token classification.

:class:`HFTagPRM` — Math-Shepherd / RLHFlow style (see :mod:`itscale.rewards.formats`).
The model reads

    chat_template([user: x], add_generation_prompt=True) + Σ_t (strip(s_t) + tag + separator)

and the score of step t is read at the t-th tag token, whose next-token logits z give

    s_t = softmax(z_good, z_bad)[good] = σ(z_good − z_bad).

The token ids are built piece by piece — the prompt, then for each step its text, the
tag id and the separator — so each tag is exactly one token wherever it falls (both
PRMs read their input through :class:`~itscale.rewards.encoding.PRMEncoder`, as the
zoo's PRM training does).

What is cached (``reuse_cache=True``): a prefix tree of KV segments (one node for the
prompt, one per step) keyed by the exact prompt and step texts. A node holds its
tokens' keys/values and, for a step, the step's score. A request whose steps are all
stored costs nothing (``tokens=0``); a request that extends a stored prefix by new
steps runs *only the new steps' tokens* on top of the stored states — so an
unchanged prefix is never re-read nor re-scored, and ``StepScores.tokens`` counts
exactly the tokens run for the request. Identical requests in one call are computed
once (the copies report 0 tokens); a prompt shared by several new requests is run
once (its tokens are counted on the first). Least-recently-used leaves are evicted
beyond ``cache_tokens`` stored tokens (default: as many as fit in 1 GiB). With ``reuse_cache=False`` every request is one
full forward pass over prompt and steps (the baseline).

:class:`HFClassifierPRM` — Qwen2.5-Math-PRM style: a token-classification head read at
a separator token after each step, ``s_t = softmax(logits at the t-th separator)[positive_label]``.
It caches *scores* by step prefix: a request whose every prefix has been scored costs
nothing; otherwise the whole sequence is run once (heads differ between
architectures, so no KV reuse) and ``tokens`` counts all of it. Caching prefix scores
assumes a causal backbone (the score of step t depends only on the text up to its
separator), as in Qwen2.5-Math-PRM.

Both caches are split by ``ScoreRequest.cache_namespace``: a request is served only from
(and shares a call's work only with) requests of its own namespace, so it never reads a
state or score that another namespace's requests computed (``tokens`` then counts its
own work in full); the memory bound is shared.

Scores are clipped to [1e-12, 1 − 1e-12] so that log-odds stay finite.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..lm.hf_cache import accepts, cache_kwarg, check_full_attention, tokens_for_bytes
from ..lm.kv_cache import KVNode, KVStore, new_root
from ..lm.loading import ModelLoadError, count_parameters, load_hf, single_token_id
from ..lm.prefill import PrefillBatch, tail_logits
from ..types import Capabilities, ScoreRequest, StepScores
from .encoding import PRMEncoder
from .formats import EMBEDDED_TAG_FORMAT, TagFormat
from .judge import JudgePrompt, answer_ids
from .prefix_cache import PrefixScores, StepUnits

__all__ = ["HFClassifierPRM", "HFJudgePRM", "HFTagPRM", "ModelLoadError", "PRMStats"]

_EPS = 1e-12


@dataclass
class PRMStats:
    """Counters since construction (or ``reset_stats``)."""

    calls: int = 0
    requests: int = 0
    forward_passes: int = 0  # batched model calls
    sequences: int = 0  # rows run through the model
    tokens: int = 0  # tokens run through the model
    scored_steps: int = 0  # step scores computed by a forward pass
    cached_steps: int = 0  # step scores served from the cache

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def clip_probability(p: float) -> float:
    return min(max(p, _EPS), 1.0 - _EPS)


class HFScorer:
    """Loading (with the pad id and the model's positions), threading and the input encoder
    (``self.encoder``, set by each PRM) shared by the PRMs."""

    kind = "causal_lm"
    encoder: PRMEncoder

    def _load(self, path_or_model, tokenizer, device, dtype):
        loaded = load_hf(path_or_model, tokenizer, self.kind, device, dtype, owner=type(self).__name__)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.device, self.dtype = loaded.device, loaded.dtype
        self.capabilities = Capabilities(n_parameters=count_parameters(self.model))
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self.stats = PRMStats()
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any):
        """Load a local model folder or .gguf file; :class:`ModelLoadError` names it and the cause."""
        return cls(Path(path), **kwargs)

    async def score_steps(self, requests: Sequence[ScoreRequest]) -> list[StepScores]:
        if self.run_in_thread:
            return await asyncio.to_thread(self.score_steps_sync, list(requests))
        return self.score_steps_sync(requests)

    def score_steps_sync(self, requests: Sequence[ScoreRequest]) -> list[StepScores]:
        """The same as :meth:`score_steps`, blocking."""
        with self._lock, torch.inference_mode():
            self.stats.calls += 1
            self.stats.requests += len(requests)
            return self._score(list(requests))

    def reset_stats(self) -> None:
        self.stats = PRMStats()

    def prompt(self, prompt: str) -> tuple[str, list[int]]:
        """The chat prompt text and its token ids."""
        return self.encoder.prompt(prompt)


@dataclass(eq=False)
class _Job:
    """Run ``segments`` on top of ``base``; each segment is (key, ids, tag index or None)."""

    base: KVNode
    segments: list[tuple[str, list[int], int | None]]
    nodes: list[KVNode] | None = None


class HFTagPRM(HFScorer):
    """A causal LM scoring each step by P(good | tag) (see the module docstring).

    ``path_or_model``: a model folder, a ``.gguf`` file or a model object (then ``tokenizer``
    is required); ``device``/``dtype`` default to ``"auto"`` (see :func:`~itscale.lm.loading.load_hf`).
    """

    def __init__(
        self,
        path_or_model: Any,
        tokenizer: Any = None,
        *,
        format: TagFormat = EMBEDDED_TAG_FORMAT,
        delimiter: str = "\n",
        max_batch: int = 32,
        device: Any = "auto",
        dtype: Any = "auto",
        cache_tokens: int | None = None,
        reuse_cache: bool = True,
        system_prompt: str | None = None,
        run_in_thread: bool = True,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._load(path_or_model, tokenizer, device, dtype)
        check_full_attention(self.model)
        self.format, self.delimiter = format, delimiter
        self.max_batch, self.reuse_cache = int(max_batch), bool(reuse_cache)
        self.system_prompt, self.run_in_thread = system_prompt, run_in_thread
        self.encoder = PRMEncoder(self.tokenizer, format.tag, format.separator, delimiter=delimiter,
                                  system_prompt=system_prompt, what="the PRM tag")
        self.tag_id, self.separator_ids = self.encoder.mark_id, self.encoder.after_ids
        self.good_id = single_token_id(self.tokenizer, format.good, "the PRM good token")
        self.bad_id = single_token_id(self.tokenizer, format.bad, "the PRM bad token")
        self.store = KVStore(cache_tokens if cache_tokens is not None else tokens_for_bytes(self.model, 1 << 30))
        self._cache_kw = cache_kwarg(self.model)
        self._logits_to_keep = accepts(self.model, "logits_to_keep")

    def clear_cache(self) -> None:
        self.store.clear()

    def input_ids(self, request: ScoreRequest) -> tuple[list[int], list[int]]:
        """The full token ids of a request and the index of every tag (for checking by hand)."""
        encoded = self.encoder.encode(request.problem.prompt, request.steps)
        return encoded.ids, encoded.marks

    # -- one call -------------------------------------------------------------------
    def _score(self, requests: list[ScoreRequest]) -> list[StepScores]:
        unique: dict[tuple[str, tuple[str, ...], str | None], list[int]] = {}  # (prompt, steps, namespace)
        for i, r in enumerate(requests):
            unique.setdefault((r.problem.prompt, tuple(r.steps), r.cache_namespace), []).append(i)
        tokens = dict.fromkeys(unique, 0)
        if self.reuse_cache:
            chains = self._reuse_plan(unique, tokens)
        else:
            chains = self._full_plan(unique, tokens)
        out: list[StepScores | None] = [None] * len(requests)
        for key, idx in unique.items():
            scores = tuple(clip_probability(n.value) for n in chains[key][1:])  # [0] is the prompt node
            out[idx[0]] = StepScores(scores, tokens[key])
            for i in idx[1:]:
                out[i] = StepScores(scores, 0)
        if self.reuse_cache:
            self.store.trim()
        return out  # type: ignore[return-value]

    def _full_plan(self, unique, tokens) -> dict:
        scratch, jobs = new_root(), {}
        for key in unique:
            prompt, steps, _ = key
            jobs[key] = _Job(scratch, [(self.prompt(prompt)[0], self.prompt(prompt)[1], None)] + self._segments(steps))
        self._run(list(jobs.values()))
        for key, job in jobs.items():
            tokens[key] = sum(len(ids) for _, ids, _ in job.segments)
        return {key: job.nodes for key, job in jobs.items()}

    def _reuse_plan(self, unique, tokens) -> dict:
        # 1. prompts that are not stored yet (in the request's namespace): run each once,
        #    counted on its first request
        missing: dict[tuple[str | None, str], tuple] = {}
        for key in unique:
            text, namespace = self.prompt(key[0])[0], key[2]
            if text not in self.store.root_of(namespace).children and (namespace, text) not in missing:
                missing[namespace, text] = key
        jobs = [_Job(self.store.root_of(ns), [(text, self.prompt(key[0])[1], None)])
                for (ns, text), key in missing.items()]
        self._run(jobs)
        for job, key in zip(jobs, missing.values()):
            tokens[key] += len(job.segments[0][1])
        # 2. each request's steps beyond its longest stored prefix
        chains, jobs = {}, {}
        for key in unique:
            prompt, steps, namespace = key
            text, ids = self.prompt(prompt)
            path = self.store.match_keys([text, *steps], namespace)
            chains[key] = path
            if not path:  # (only if the prompt node was just evicted: run everything)
                jobs[key] = _Job(self.store.root_of(namespace), [(text, ids, None)] + self._segments(steps))
                continue
            self.stats.cached_steps += len(path) - 1
            if len(path) == len(steps) + 1:
                self.store.touch(path[-1])
            else:
                jobs[key] = _Job(path[-1], self._segments(steps[len(path) - 1:]))
        self._run(list(jobs.values()))
        for key, job in jobs.items():
            chains[key] = chains[key] + job.nodes
            tokens[key] += sum(len(ids) for _, ids, _ in job.segments)
        return chains

    def _segments(self, steps: Sequence[str]) -> list[tuple[str, list[int], int]]:
        return [(step, *self.encoder.step(step)) for step in steps]

    # -- forward passes ---------------------------------------------------------------
    def _run(self, jobs: list[_Job]) -> None:
        jobs = sorted(jobs, key=lambda j: j.base.length + sum(len(s[1]) for s in j.segments))
        for start in range(0, len(jobs), self.max_batch):
            self._forward(jobs[start:start + self.max_batch])

    def _forward(self, jobs: list[_Job]) -> None:
        """One batched pass: past states of each job's base (left-padded), then its new tokens."""
        new = [[t for _, ids, _ in j.segments for t in ids] for j in jobs]
        batch = PrefillBatch.build([j.base for j in jobs], new, self.pad_id)
        tag_cols: list[list[int | None]] = []  # per job and segment: the input column of its tag
        for b, job in enumerate(jobs):
            cols, offset = [], 0
            for _, seg, tag in job.segments:
                cols.append(None if tag is None else batch.column(b, offset + tag))
                offset += len(seg)
            tag_cols.append(cols)
        wanted = sorted({c for cols in tag_cols for c in cols if c is not None})
        kwargs = {self._cache_kw: batch.cache, "use_cache": True}
        if self._logits_to_keep and wanted:
            kwargs["logits_to_keep"] = torch.tensor(wanted, device=self.device)
            column = {c: i for i, c in enumerate(wanted)}
        else:
            column = {c: c for c in range(batch.width)}
        logits = self.model(**batch.inputs(self.device), **kwargs).logits
        self.stats.forward_passes += 1
        self.stats.sequences += len(jobs)
        self.stats.tokens += sum(len(ids) for ids in new)
        for b, job in enumerate(jobs):
            parent, offset, nodes = job.base, 0, []
            for (key, ids, _), col in zip(job.segments, tag_cols[b]):
                score = None
                if col is not None:
                    pair = logits[b, column[col], [self.good_id, self.bad_id]].to(torch.float64)
                    score = float(torch.sigmoid(pair[0] - pair[1]))
                    self.stats.scored_steps += 1
                node = KVNode(key, parent, torch.tensor(ids, dtype=torch.long),
                              batch.new_kv(b, offset, offset + len(ids)), value=score)
                if self.reuse_cache:
                    node = self.store.insert(node)
                nodes.append(node)
                parent, offset = node, offset + len(ids)
            job.nodes = nodes


class HFClassifierPRM(HFScorer):
    """A token-classification PRM read at a separator token after each step (Qwen2.5-Math-PRM style).

    Input: the chat prompt, then each step's text (without its delimiter) followed by
    ``separator_token``; ``s_t = softmax(logits[t-th separator])[positive_label]``.
    See the module docstring for what is cached; loading, ``device`` and ``dtype`` as for
    :class:`HFTagPRM`.
    """

    kind = "token_classification"

    def __init__(
        self,
        path_or_model: Any,
        tokenizer: Any = None,
        *,
        separator_token: str = "<extra_0>",
        positive_label: int = 1,
        delimiter: str = "\n",
        max_batch: int = 16,
        device: Any = "auto",
        dtype: Any = "auto",
        cache_size: int = 1 << 17,
        system_prompt: str | None = None,
        run_in_thread: bool = True,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._load(path_or_model, tokenizer, device, dtype)
        labels = getattr(self.model.config, "num_labels", None)
        if labels is not None and not 0 <= positive_label < labels:
            raise ValueError(f"positive_label {positive_label} is not one of the model's {labels} labels")
        self.encoder = PRMEncoder(self.tokenizer, separator_token, "", delimiter=delimiter,
                                  system_prompt=system_prompt, what="the separator token")
        self.separator_id = self.encoder.mark_id
        self.positive_label, self.delimiter = int(positive_label), delimiter
        self.max_batch, self.cache_size = int(max_batch), int(cache_size)
        self.system_prompt, self.run_in_thread = system_prompt, run_in_thread
        self._scores = PrefixScores(self.cache_size)

    def clear_cache(self) -> None:
        self._scores.clear()

    def input_ids(self, request: ScoreRequest) -> tuple[list[int], list[int]]:
        """The full token ids of a request and the index of every separator."""
        encoded = self.encoder.encode(request.problem.prompt, request.steps)
        return encoded.ids, encoded.marks

    def _score(self, requests: list[ScoreRequest]) -> list[StepScores]:
        out, cached = self._scores.score_whole(requests, self._read)
        self.stats.cached_steps += cached
        return out

    def _read(self, todo: dict) -> dict:
        """Scores and tokens read for each uncached request (``PrefixScores.score_whole``)."""
        keys = sorted(todo, key=lambda k: len(k[0]) + sum(map(len, k[1])))  # similar lengths share a batch
        out = {}
        for start in range(0, len(keys), self.max_batch):
            chunk = keys[start:start + self.max_batch]
            results = self._forward([ScoreRequest(todo[k].problem, k[1]) for k in chunk])
            out.update((key, ([clip_probability(s) for s in scores], n_tokens))
                       for key, (scores, n_tokens) in zip(chunk, results))
        return out

    def _forward(self, requests: list[ScoreRequest]) -> list[tuple[list[float], int]]:
        """One right-padded batch; the positive-label probability at every separator."""
        encoded = [self.input_ids(r) for r in requests]
        B, L = len(encoded), max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for b, (ids, _) in enumerate(encoded):
            input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[b, : len(ids)] = 1
        logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
        probs = torch.softmax(logits.to(torch.float64), dim=-1)[..., self.positive_label]
        self.stats.forward_passes += 1
        self.stats.sequences += B
        self.stats.tokens += sum(len(ids) for ids, _ in encoded)
        out = []
        for b, (ids, seps) in enumerate(encoded):
            self.stats.scored_steps += len(seps)
            out.append((probs[b, seps].tolist(), len(ids)))
        return out


class HFJudgePRM(HFScorer):
    """A local chat model as an LLM judge (:mod:`itscale.rewards.judge`): step t scores
    ``p(yes) / (p(yes) + p(no))`` for the judge's first answer token to a question about it.

    ``path_or_model``, ``tokenizer``, ``device``, ``dtype`` as for :class:`HFTagPRM`;
    ``template`` as for :func:`~itscale.rewards.judge.load_template`; ``yes`` / ``no`` the
    answer words; ``delimiter`` the policy's step delimiter; ``max_batch`` questions per
    forward pass. Scores are cached by step prefix; a question longer than the model's
    positions scores NaN (that particle dies)."""

    kind = "causal_lm"

    def __init__(self, path_or_model: Any, tokenizer: Any = None, *, template: str | None = None,
                 yes: str = "Yes", no: str = "No", delimiter: str = "\n\n", max_batch: int = 16,
                 device: Any = "auto", dtype: Any = "auto", cache_size: int = 1 << 17,
                 system_prompt: str | None = None, run_in_thread: bool = True):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._load(path_or_model, tokenizer, device, dtype)
        self.prompt = JudgePrompt(self.tokenizer, template, delimiter=delimiter, system_prompt=system_prompt)
        self.yes_ids, self.no_ids = answer_ids(self.tokenizer, yes, no)
        self.max_batch, self.run_in_thread = int(max_batch), run_in_thread
        self._scores = PrefixScores(cache_size)

    def clear_cache(self) -> None:
        self._scores.clear()

    def _score(self, requests: list[ScoreRequest]) -> list[StepScores]:
        plan = StepUnits(self._scores, requests, self.prompt.ids)
        self.stats.cached_steps += plan.cached_steps
        fits = lambda k: not self.max_positions or len(plan.units[k]) <= self.max_positions  # noqa: E731
        scored = {k: float("nan") for k in plan.units if not fits(k)}
        keys = sorted((k for k in plan.units if fits(k)), key=lambda k: len(plan.units[k]))  # similar lengths
        for start in range(0, len(keys), self.max_batch):
            chunk = keys[start:start + self.max_batch]
            rows = [plan.units[k] for k in chunk]
            z = tail_logits(self.model, rows, 1, self.pad_id, self.device)[:, -1].to(torch.float64)
            verdict = torch.sigmoid(torch.logsumexp(z[:, self.yes_ids], -1) - torch.logsumexp(z[:, self.no_ids], -1))
            scored.update((k, clip_probability(s)) for k, s in zip(chunk, verdict.tolist()))
            self.stats.forward_passes += 1
            self.stats.sequences += len(rows)
            self.stats.tokens += sum(map(len, rows))
            self.stats.scored_steps += len(rows)
        return plan.finish(scored, len)
