"""Near-miss solutions of the arithmetic task: the slips a PRM must catch.

A *slip* replaces the result ``c`` of one operation line ``a op x = c`` by a nearby wrong
value; the later lines compute correctly from the slipped value, as the policy does
after a mistake, so the error is visible on that one line only. The slip test of the
model card (:func:`slipped_solution`) pairs the reference solution with such a
solution, one line slipped by one of :data:`SLIP_KINDS`:

======================  =============================================================
``off_by_1``            c ± 1
``off_by_2_3``          c ± 2 or ± 3
``off_by_10``           c ± 10
``swapped_digits``      two adjacent, different digits of c swapped (c has ≥ 2 digits)
``sign``                −c (c ≠ 0)
======================  =============================================================

:func:`training_solution` draws the PRM's synthetic training solutions: a fifth are
clean, the rest carry one or more corrupted lines, where a corruption is a slip of the kinds
above or of two broader ones (``digit``: one digit of c replaced; ``off_by_4_20``), a
wrong operand or operation, a wrong copy of the previous result, a skipped operation,
a premature ``Answer:`` line or a wrong answer line. Labels always come from the text
(:func:`~itscale.tasks.arithmetic.step_labels`, :func:`~itscale.tasks.arithmetic.local_step_labels`),
never from the generator's bookkeeping.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..tasks import arithmetic
from ..types import Problem

#: The slip kinds of the model card's slip test.
SLIP_KINDS = ("off_by_1", "off_by_2_3", "off_by_10", "swapped_digits", "sign")

#: Result slips drawn for training, with their probabilities.
#: Most change a digit other than the units (the policy's usual slip, and the hard one to check).
TRAIN_SLIPS = {"off_by_1": 0.12, "off_by_2_3": 0.10, "off_by_10": 0.20, "swapped_digits": 0.10, "sign": 0.05,
               "digit": 0.33, "off_by_4_20": 0.10}

#: Corruptions of one line drawn for training (a result slip is the policy's typical error).
TRAIN_CORRUPTIONS = {"slip": 0.82, "operand": 0.06, "copy": 0.05, "skip": 0.04, "early_answer": 0.03}


def slip_value(value: int, kind: str, rng: np.random.Generator) -> int | None:
    """``value`` slipped by ``kind``; None when the kind cannot apply (e.g. ``sign`` of 0)."""
    sign = 1 if rng.random() < 0.5 else -1
    if kind == "off_by_1":
        return value + sign
    if kind == "off_by_2_3":
        return value + sign * int(rng.integers(2, 4))
    if kind == "off_by_10":
        return value + 10 * sign
    if kind == "off_by_4_20":
        return value + sign * int(rng.integers(4, 21))
    if kind == "sign":
        return -value if value else None
    digits = str(abs(value))
    neg = -1 if value < 0 else 1
    if kind == "swapped_digits":
        spots = [i for i in range(len(digits) - 1)  # no leading zero: 60 does not become 06
                 if digits[i] != digits[i + 1] and not (i == 0 and digits[1] == "0")]
        if not spots:
            return None
        i = spots[int(rng.integers(len(spots)))]
        return neg * int(digits[:i] + digits[i + 1] + digits[i] + digits[i + 2:])
    if kind == "digit":
        i = int(rng.integers(len(digits)))
        choices = [d for d in "0123456789" if d != digits[i] and not (i == 0 and d == "0" and len(digits) > 1)]
        return neg * int(digits[:i] + choices[int(rng.integers(len(choices)))] + digits[i + 1:])
    raise ValueError(f"unknown slip kind {kind!r}; choose one of {SLIP_KINDS + ('digit', 'off_by_4_20')}")


def _as_steps(lines: Sequence[str]) -> list[str]:
    """Lines as strategies cut them: every step but the last keeps its delimiter."""
    return [line + arithmetic.DELIMITER for line in lines[:-1]] + list(lines[-1:])


def slipped_solution(problem: Problem, kind: str, rng: np.random.Generator,
                     line: int | None = None) -> tuple[list[str], int] | None:
    """The reference solution with one operation line's result slipped by ``kind``.

    The line is ``line`` or, if None, drawn uniformly among the lines the kind applies
    to; later lines compute correctly from the slipped value (so is the answer). Returns
    (steps, slipped line index), or None when the kind applies to no line.
    """
    start, ops = arithmetic.parse_prompt(problem.prompt)
    values = [start]
    for op, x in ops:
        values.append(arithmetic.apply(values[-1], op, x))
    candidates = [i for i in range(len(ops)) if line in (None, i)]
    order = rng.permutation(candidates) if line is None else candidates
    for k in order:
        k = int(k)
        wrong = slip_value(values[k + 1], kind, rng)
        if wrong is None or wrong == values[k + 1]:
            continue
        lines, value = [], start
        for i, (op, x) in enumerate(ops):
            result = wrong if i == k else arithmetic.apply(value, op, x)
            lines.append(f"{value}{op}{x}={result}")
            value = result
        lines.append(f"{arithmetic.ANSWER_PREFIX}{value}")
        return _as_steps(lines), k
    return None


def _draw(table: dict[str, float], rng: np.random.Generator) -> str:
    names = list(table)
    return names[int(rng.choice(len(names), p=np.array([table[n] for n in names])))]


def _wrong_operand(op: str, x: int, rng: np.random.Generator) -> tuple[str, int]:
    if rng.random() < 0.3:
        return ({"+": "-", "-": "+", "*": "+"}[op], x)
    shifted = x + int(rng.choice([-3, -2, -1, 1, 2, 3]))
    return op, shifted if shifted >= (2 if op == "*" else 1) else x + int(rng.integers(1, 4))


def training_solution(problem: Problem, rng: np.random.Generator, p_clean: float = 0.2,
                      p_line: float = 0.3) -> list[str]:
    """A synthetic solution for PRM training: clean with probability ``p_clean``, else with
    one corrupted line plus each other line corrupted with probability ``p_line``, each
    corruption drawn from :data:`TRAIN_CORRUPTIONS`.

    Lines after a corruption continue from the values written (as the policy does), so
    every line is a fresh check of its own arithmetic (its local label).
    """
    start, ops = arithmetic.parse_prompt(problem.prompt)
    n_lines = len(ops) + 1
    bad: dict[int, str] = {}
    if rng.random() >= p_clean:
        n_bad = 1 + int(rng.binomial(n_lines - 1, p_line))
        for k in rng.choice(n_lines, size=n_bad, replace=False):
            bad[int(k)] = "answer" if k == len(ops) else _draw(TRAIN_CORRUPTIONS, rng)
    lines, value, i = [], start, 0
    while i < len(ops):
        op, x = ops[i]
        kind = bad.get(len(lines))
        if kind == "early_answer":
            lines.append(f"{arithmetic.ANSWER_PREFIX}{value}")
            return _as_steps(lines)
        if kind == "skip" and i + 1 < len(ops):
            i += 1
            op, x = ops[i]
        shown = value
        if kind == "copy":
            shown = slip_value(value, _draw(TRAIN_SLIPS, rng), rng)
            shown = value + 1 if shown is None else shown
        if kind == "operand":
            op, x = _wrong_operand(op, x, rng)
        result = arithmetic.apply(shown, op, x)
        if kind == "slip":
            slipped = slip_value(result, _draw(TRAIN_SLIPS, rng), rng)
            result = slipped if slipped is not None else result + 1
        lines.append(f"{shown}{op}{x}={result}")
        value, i = result, i + 1
    if bad.get(len(lines)) == "answer":
        wrong = slip_value(value, _draw(TRAIN_SLIPS, rng), rng)
        value = wrong if wrong is not None else value + 1
    lines.append(f"{arithmetic.ANSWER_PREFIX}{value}")
    return _as_steps(lines)
