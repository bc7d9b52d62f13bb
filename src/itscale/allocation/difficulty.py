"""Difficulty scores of a problem from k whole samples, and the samples' own answer.

Two scores, both in [0, 1], higher = harder:

``agreement``
    d = 1 − m/k, where m is the size of the largest group of samples with the same answer
    (answers grouped by :func:`itscale.tasks.answers.answer_key`; a sample without an answer
    joins no group). All k agree: d = 0; no two agree (or none has an answer): d = 1 − 1/k
    (d = 1 when no sample has an answer). It needs no reward model.

``prm``
    d = 1 − (1/k) Σ_i r_i, with r_i the aggregated PRM score of sample i (a failed sample, or
    one whose scoring failed, counts r_i = 0: a sample that failed is no evidence of ease).

:func:`vote` is the answer the k samples give by themselves (the allocation's cheapest
option, "answer from the probe"): the largest answer group; ties broken by the larger summed
PRM score when there are scores, then by the group seen first. Deterministic, so the bench
(which grades it when learning) and the server (which returns it) agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from ..tasks.answers import answer_key as default_answer_key

SCORES = ("agreement", "prm")


def _groups(answers: Sequence[str | None], key: Callable[[str | None], Any]) -> dict[Any, list[int]]:
    groups: dict[Any, list[int]] = {}
    for i, a in enumerate(answers):
        k = key(a) if a is not None else None
        if k is not None:
            groups.setdefault(k, []).append(i)
    return groups


def agreement_difficulty(answers: Sequence[str | None], key: Callable[[str | None], Any] = default_answer_key) -> float:
    """1 − (share of the modal answer among the k answers); ``None`` answers join no group."""
    if not answers:
        raise ValueError("agreement difficulty needs at least one sample")
    groups = _groups(answers, key)
    modal = max((len(g) for g in groups.values()), default=0)
    return 1.0 - modal / len(answers)


def prm_difficulty(scores: Sequence[float]) -> float:
    """1 − the mean of the k aggregated PRM scores (NaN, a failed sample or score, counts 0)."""
    if not scores:
        raise ValueError("PRM difficulty needs at least one sample")
    clean = [0.0 if s is None or math.isnan(float(s)) else float(s) for s in scores]
    return 1.0 - sum(clean) / len(clean)


def difficulty(score: str, answers: Sequence[str | None], scores: Sequence[float] | None,
               key: Callable[[str | None], Any] = default_answer_key) -> float:
    """The ``score`` difficulty (``agreement`` or ``prm``) of one problem's samples."""
    if score == "agreement":
        return agreement_difficulty(answers, key)
    if score == "prm":
        if scores is None:
            raise ValueError("the 'prm' difficulty needs the samples' PRM scores")
        return prm_difficulty(scores)
    raise ValueError(f"unknown difficulty score {score!r}; choose one of {', '.join(SCORES)}")


def vote(answers: Sequence[str | None], scores: Sequence[float] | None = None,
         key: Callable[[str | None], Any] = default_answer_key) -> int | None:
    """The index of the sample that answers for the k samples (see the module docstring), or
    ``None`` when no sample has an answer."""
    groups = _groups(answers, key)
    if not groups:
        return None

    def weight(members: list[int]) -> float:
        if scores is None:
            return 0.0
        return sum(0.0 if math.isnan(float(scores[i])) else float(scores[i]) for i in members)

    order = list(groups.values())  # first seen first; max() keeps the first of equals
    best = max(order, key=lambda g: (len(g), weight(g)))
    return best[0]
