"""Step scores cached by step prefix, so an unchanged prefix is never scored twice.

A PRM's score of step t depends only on the problem and steps 1..t, so it is stored under
``(prompt, steps[:t])``. A request hits the cache only when every one of its prefixes is
there; least recently used entries go first once ``capacity`` is exceeded. NaN scores
(a failed request) are never stored, so the next call retries them.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence


class PrefixScores:
    def __init__(self, capacity: int = 1 << 17):
        self.capacity = int(capacity)
        self._scores: OrderedDict[tuple[str, tuple[str, ...]], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._scores)

    def get(self, prompt: str, steps: tuple[str, ...]) -> tuple[float, ...] | None:
        """The scores of every step, or None unless all of them are cached."""
        out = self.leading(prompt, steps)
        return out if len(out) == len(steps) else None

    def lookup(self, requests) -> tuple[list[tuple[float, ...] | None], dict[tuple[str, tuple[str, ...]], list[int]]]:
        """For ``ScoreRequest``s: each one's cached scores (None unless every step is cached),
        and the others grouped by ``(prompt, steps)`` (identical requests scored once)."""
        hits: list[tuple[float, ...] | None] = []
        todo: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        for i, r in enumerate(requests):
            key = (r.problem.prompt, tuple(r.steps))
            hits.append(self.get(*key))
            if hits[-1] is None:
                todo.setdefault(key, []).append(i)
        return hits, todo

    def leading(self, prompt: str, steps: tuple[str, ...]) -> tuple[float, ...]:
        """The scores of the longest run of leading steps that are all cached (maybe none)."""
        out = []
        for t in range(1, len(steps) + 1):
            key = (prompt, steps[:t])
            score = self._scores.get(key)
            if score is None:
                break
            self._scores.move_to_end(key)
            out.append(score)
        return tuple(out)

    def put(self, prompt: str, steps: tuple[str, ...], scores: Sequence[float]) -> None:
        for t, s in enumerate(scores):
            if not math.isnan(s):
                key = (prompt, steps[: t + 1])
                self._scores[key] = s
                self._scores.move_to_end(key)
        while len(self._scores) > self.capacity:
            self._scores.popitem(last=False)

    def clear(self) -> None:
        self._scores.clear()
