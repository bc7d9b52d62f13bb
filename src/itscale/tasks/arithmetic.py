"""The synthetic multi-step arithmetic task of the embedded model pair.

A problem is a start value and 2–6 operations applied left to right::

    prompt:   "Start at 7. Apply in order: +5, *3, -4."
    solution: "7+5=12\\n12*3=36\\n36-4=32\\nAnswer: 32"

One operation per line (the step delimiter is a single newline), then a final
answer line. Every intermediate value stays within ±``max_value`` so that a tiny
character-level model can learn the arithmetic but still makes mistakes.

Step labels are exact and free: step i of a solution is *correct* when it is
exactly the i-th line of the reference solution *and* every earlier step was
correct (a prefix label, Math-Shepherd style: it says whether the solution is
still on track). The answer line is correct when the whole solution is.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Iterator, Sequence

import numpy as np

from ..types import Problem, StepFormat

DELIMITER = "\n"
ANSWER_PREFIX = "Answer: "
DATA_VERSION = "v1"
LEVELS = {"easy": (2, 3), "medium": (4, 4), "hard": (5, 6)}
EVAL_SEEDS = {"easy": 1_000_001, "medium": 1_000_002, "hard": 1_000_003}
EVAL_SIZE = 500

# How strategies cut and finish solutions of this task (at most 6 operations + answer).
STEP_FORMAT = StepFormat(delimiter=DELIMITER, answer_markers=(ANSWER_PREFIX.strip(),), max_steps=10)

_OP = re.compile(r"^(-?\d+)([+\-*])(\d+)=(-?\d+)$")
_ANSWER = re.compile(r"^Answer:\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class Difficulty:
    """Knobs of the problem generator."""

    min_ops: int = 2
    max_ops: int = 6
    max_operand: int = 50  # for + and −
    max_factor: int = 9  # for ×
    max_value: int = 999  # |running value| bound
    p_multiply: float = 0.3

    def __post_init__(self) -> None:
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"need 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}")


def apply(value: int, op: str, operand: int) -> int:
    return value + operand if op == "+" else value - operand if op == "-" else value * operand


def generate(rng: np.random.Generator, difficulty: Difficulty = Difficulty()) -> tuple[int, list[tuple[str, int]]]:
    """A start value and a list of (op, operand) keeping |value| ≤ max_value."""
    d = difficulty
    n_ops = int(rng.integers(d.min_ops, d.max_ops + 1))
    value = int(rng.integers(1, d.max_operand + 1))
    start, ops = value, []
    while len(ops) < n_ops:
        if rng.random() < d.p_multiply:
            op, operand = "*", int(rng.integers(2, d.max_factor + 1))
        else:
            op, operand = ("+" if rng.random() < 0.5 else "-"), int(rng.integers(1, d.max_operand + 1))
        nxt = apply(value, op, operand)
        if abs(nxt) <= d.max_value:
            ops.append((op, operand))
            value = nxt
    return start, ops


def prompt_text(start: int, ops: Sequence[tuple[str, int]]) -> str:
    return f"Start at {start}. Apply in order: " + ", ".join(f"{op}{x}" for op, x in ops) + "."


_PROMPT = re.compile(r"^Start at (-?\d+)\. Apply in order: (.*)\.$")


def parse_prompt(prompt: str) -> tuple[int, list[tuple[str, int]]]:
    m = _PROMPT.match(prompt.strip())
    if not m:
        raise ValueError(f"not an arithmetic problem prompt: {prompt!r}")
    ops = [(tok[0], int(tok[1:])) for tok in m.group(2).split(", ")]
    return int(m.group(1)), ops


def reference_steps(start: int, ops: Sequence[tuple[str, int]]) -> list[str]:
    """The correct solution lines, without delimiters: operations then the answer line."""
    lines, value = [], start
    for op, x in ops:
        nxt = apply(value, op, x)
        lines.append(f"{value}{op}{x}={nxt}")
        value = nxt
    return lines + [f"{ANSWER_PREFIX}{value}"]


def make_problem(start: int, ops: Sequence[tuple[str, int]], problem_id: str, level: str | None = None) -> Problem:
    answer = reference_steps(start, ops)[-1][len(ANSWER_PREFIX):]
    meta = {"n_ops": len(ops)} | ({"level": level} if level else {})
    return Problem(problem_id, prompt_text(start, ops), answer, meta)


def solution_text(problem: Problem) -> str:
    """The reference solution as the policy is trained to write it."""
    return DELIMITER.join(reference_steps(*parse_prompt(problem.prompt)))


def step_labels(problem: Problem, steps: Sequence[str]) -> list[bool]:
    """Prefix labels: step i is correct iff steps 0..i all equal the reference lines."""
    ref = reference_steps(*parse_prompt(problem.prompt))
    labels, ok = [], True
    for i, step in enumerate(steps):
        ok = ok and i < len(ref) and step.strip() == ref[i]
        labels.append(ok)
    return labels


def local_step_labels(problem: Problem, steps: Sequence[str]) -> list[bool | None]:
    """Local labels: step i is correct iff it is the right next line *given the lines shown*.

    An operation line must be ``{prev}{op_i}{x_i}={prev op_i x_i}`` where ``prev`` is the
    result written on the previous line (the start value for the first line) and
    ``(op_i, x_i)`` the i-th operation of the prompt; the line after the last operation
    must be ``Answer: {prev}``; nothing may follow it. A line after a malformed one has
    no defined ``prev`` and gets ``None``. A line computed correctly from a slipped
    value is locally correct, so the running AND of these labels is exactly
    :func:`step_labels` (the prefix labels): the first wrong line makes every later
    prefix wrong.
    """
    start, ops = parse_prompt(problem.prompt)
    prev: int | None = start
    out: list[bool | None] = []
    for i, step in enumerate(steps):
        s = step.strip()
        if i > len(ops):
            out.append(False)
            continue
        if prev is None:
            out.append(None)
            continue
        if i == len(ops):
            out.append(s == f"{ANSWER_PREFIX}{prev}")
            continue
        op, x = ops[i]
        out.append(s == f"{prev}{op}{x}={apply(prev, op, x)}")
        m = _OP.match(s)
        prev = int(m.group(4)) if m else None
    return out


def calculator_check(problem: str, steps: Sequence[str]) -> float:
    """A programmatic verifier for this task (:class:`itscale.rewards.verifier.CallablePRM`;
    ``prm: {kind: verifier, model: "itscale.tasks.arithmetic:calculator_check"}``): 1.0 when
    the latest step is the right next line given the lines before it (the prompt's next
    operation applied to the previous result, recomputed), else 0.0. A prompt that is not
    of this task raises ValueError."""
    labels = local_step_labels(Problem("check", problem), steps)
    return 1.0 if labels and labels[-1] else 0.0


def extract_answer(text: str) -> str | None:
    """The value on the last ``Answer:`` line, or None."""
    for line in reversed(text.strip().split(DELIMITER)):
        m = _ANSWER.match(line.strip())
        if m:
            return m.group(1)
    return None


def is_correct(problem: Problem, text: str) -> bool:
    """Graded by the final answer only (a lucky wrong derivation still counts)."""
    answer = extract_answer(text)
    return answer is not None and int(answer) == int(problem.answer)


def is_well_formed_step(step: str) -> bool:
    s = step.strip()
    return bool(_OP.match(s) or _ANSWER.match(s))


def problems(n: int, seed: int, difficulty: Difficulty = Difficulty(), prefix: str = "arith",
             level: str | None = None) -> list[Problem]:
    """n seeded problems (deterministic for a seed and difficulty)."""
    rng = np.random.default_rng(seed)
    return [make_problem(*generate(rng, difficulty), f"{prefix}-{seed}-{i}", level) for i in range(n)]


def level_difficulty(level: str) -> Difficulty:
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; choose one of {sorted(LEVELS)}")
    lo, hi = LEVELS[level]
    return Difficulty(min_ops=lo, max_ops=hi)


def build_eval_set(level: str) -> list[Problem]:
    """Regenerate a held-out set exactly as shipped (tests check they agree)."""
    return problems(EVAL_SIZE, EVAL_SEEDS[level], level_difficulty(level), prefix=f"eval-{level}", level=level)


def eval_set(level: str = "medium") -> list[Problem]:
    """The shipped, versioned held-out set for a difficulty level (500 problems)."""
    level_difficulty(level)
    path = resources.files("itscale.tasks") / "data" / f"arithmetic_{DATA_VERSION}_{level}.jsonl"
    return [_from_json(line) for line in path.read_text().splitlines() if line.strip()]


def _from_json(line: str) -> Problem:
    row = json.loads(line)
    return Problem(row["id"], row["problem"], row["answer"], {"n_ops": row["n_ops"], "level": row["level"]})


def to_jsonl(items: Sequence[Problem]) -> Iterator[str]:
    for p in items:
        yield json.dumps({"id": p.id, "problem": p.prompt, "answer": p.answer, "level": p.meta.get("level"),
                          "n_ops": p.meta["n_ops"]})


def write_eval_sets(folder) -> None:
    """(Re)write the shipped eval sets; run by ``python -m itscale.tasks.arithmetic``."""
    from pathlib import Path

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for level in LEVELS:
        (out / f"arithmetic_{DATA_VERSION}_{level}.jsonl").write_text("\n".join(to_jsonl(build_eval_set(level))) + "\n")


if __name__ == "__main__":
    from pathlib import Path

    write_eval_sets(Path(__file__).parent / "data")
