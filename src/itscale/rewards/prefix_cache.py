"""Step scores cached by step prefix, so an unchanged prefix is never scored twice.

A PRM's score of step t depends only on the problem and steps 1..t, so it is stored under
``(namespace, prompt, steps[:t])``. A request hits the cache only when every one of its
prefixes is there; least recently used entries go first once ``capacity`` is exceeded
(one bound for every namespace). NaN scores (a failed request) are never stored, so the
next call retries them.

``namespace`` is the request's ``ScoreRequest.cache_namespace`` (``None``: shared): a
lookup only finds scores stored under the same namespace.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

Key = tuple[str | None, str, tuple[str, ...]]  # (namespace, prompt, steps)


class PrefixScores:
    def __init__(self, capacity: int = 1 << 17):
        self.capacity = int(capacity)
        self._scores: OrderedDict[Key, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._scores)

    def get(self, prompt: str, steps: tuple[str, ...], namespace: str | None = None) -> tuple[float, ...] | None:
        """The scores of every step, or None unless all of them are cached."""
        out = self.leading(prompt, steps, namespace)
        return out if len(out) == len(steps) else None

    def lookup(self, requests) -> tuple[list[tuple[float, ...] | None],
                                        dict[tuple[str, tuple[str, ...], str | None], list[int]]]:
        """For ``ScoreRequest``s: each one's cached scores (None unless every step is cached in
        its namespace), and the others grouped by ``(prompt, steps, namespace)`` (identical
        requests of one namespace scored once)."""
        hits: list[tuple[float, ...] | None] = []
        todo: dict[tuple[str, tuple[str, ...], str | None], list[int]] = {}
        for i, r in enumerate(requests):
            key = (r.problem.prompt, tuple(r.steps), r.cache_namespace)
            hits.append(self.get(*key))
            if hits[-1] is None:
                todo.setdefault(key, []).append(i)
        return hits, todo

    def leading(self, prompt: str, steps: tuple[str, ...], namespace: str | None = None) -> tuple[float, ...]:
        """The scores of the longest run of leading steps that are all cached (maybe none)."""
        out = []
        for t in range(1, len(steps) + 1):
            key = (namespace, prompt, steps[:t])
            score = self._scores.get(key)
            if score is None:
                break
            self._scores.move_to_end(key)
            out.append(score)
        return tuple(out)

    def put(self, prompt: str, steps: tuple[str, ...], scores: Sequence[float], namespace: str | None = None) -> None:
        for t, s in enumerate(scores):
            if not math.isnan(s):
                key = (namespace, prompt, steps[: t + 1])
                self._scores[key] = s
                self._scores.move_to_end(key)
        while len(self._scores) > self.capacity:
            self._scores.popitem(last=False)

    def clear(self) -> None:
        self._scores.clear()

    def score_whole(self, requests, run) -> tuple[list, int]:
        """For a scorer that reads a request's whole sequence at once: ``(StepScores per request,
        steps served from the cache)``. A request whose every prefix is cached costs nothing;
        the others, identical ones grouped, go to ``run({key: a request}) -> {key: (scores,
        tokens)}`` (``key`` is ``(prompt, steps, namespace)``; scores clipped, NaN for a failure);
        a prefix already cached keeps its score, so a prefix's score never changes, and the
        copies of a request report 0 tokens."""
        from ..types import StepScores

        hits, todo = self.lookup(requests)
        out = [None if hit is None else StepScores(hit, 0) for hit in hits]
        for key, (scores, tokens) in run({key: requests[rows[0]] for key, rows in todo.items()}).items():
            known = self.leading(*key)
            scores = tuple(known) + tuple(scores[len(known):])
            self.put(key[0], key[1], scores, namespace=key[2])
            first, *rest = todo[key]
            out[first] = StepScores(scores, tokens)
            for i in rest:
                out[i] = StepScores(scores, 0)
        return out, sum(len(hit) for hit in hits if hit is not None)


Prefix = tuple[str | None, str, tuple[str, ...]]  # (namespace, prompt, steps[:t])


class StepUnits:
    """A call's uncached steps for a scorer that reads each step *separately* (a unit per step).

    A tag PRM behind a completions server reads step t from the text up to its t-th tag; an
    LLM judge reads a question about step t. Either way step t's score depends only on
    ``(prompt, steps[:t])``, so only the steps past each request's cached leading run are
    read, and a prefix shared by several requests of one namespace is read once (its tokens
    are charged to the first request that needs it). Use::

        plan = StepUnits(cache, requests, unit)   # unit(request, t) -> what to send for step t
        scores = {key: ... for key in plan.units}  # NaN for a unit that failed
        out = plan.finish(scores, tokens)          # StepScores per request; NaN never cached
    """

    def __init__(self, cache: PrefixScores, requests, unit):
        self.cache, self.requests = cache, list(requests)
        self.known: list[tuple[float, ...]] = []
        self.units: dict[Prefix, object] = {}  # prefix -> what reads it
        self.owner: dict[Prefix, int] = {}  # prefix -> the request its tokens are charged to
        self.cached_steps = 0
        for i, r in enumerate(self.requests):
            steps = tuple(r.steps)
            cached = cache.leading(r.problem.prompt, steps, r.cache_namespace)
            self.cached_steps += len(cached)
            self.known.append(cached)
            for t in range(len(cached), len(steps)):
                key = (r.cache_namespace, r.problem.prompt, steps[: t + 1])
                if key not in self.units:
                    self.units[key], self.owner[key] = unit(r, t), i

    def by_namespace(self) -> dict[str | None, list[Prefix]]:
        out: dict[str | None, list[Prefix]] = {}
        for key in self.units:
            out.setdefault(key[0], []).append(key)
        return out

    def finish(self, scored: dict[Prefix, float], tokens_of) -> list:
        """Store the new scores and build each request's ``StepScores``; ``tokens_of(unit)`` is
        what reading a unit cost (a failed unit is charged nothing and read again next time)."""
        from ..types import StepScores

        tokens = [0] * len(self.requests)
        for key, unit in self.units.items():
            if not math.isnan(scored[key]):
                tokens[self.owner[key]] += tokens_of(unit)
            self.cache.put(key[1], key[2], [math.nan] * (len(key[2]) - 1) + [scored[key]], namespace=key[0])
        out = []
        for i, r in enumerate(self.requests):
            steps = tuple(r.steps)
            scores = self.known[i] + tuple(scored[(r.cache_namespace, r.problem.prompt, steps[: t + 1])]
                                           for t in range(len(self.known[i]), len(steps)))
            out.append(StepScores(scores, tokens[i]))
        return out
