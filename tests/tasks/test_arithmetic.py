"""The synthetic arithmetic task of the embedded model pair."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest

from itscale.tasks import arithmetic as A
from itscale.types import Problem


@pytest.mark.parametrize("level", sorted(A.LEVELS))
def test_shipped_eval_sets_are_exactly_the_generator_output(level):
    shipped = A.eval_set(level)
    rebuilt = A.build_eval_set(level)
    assert len(shipped) == A.EVAL_SIZE == 500
    assert [(p.id, p.prompt, p.answer, dict(p.meta)) for p in shipped] == \
           [(p.id, p.prompt, p.answer, dict(p.meta)) for p in rebuilt]
    path = resources.files("itscale.tasks") / "data" / f"arithmetic_{A.DATA_VERSION}_{level}.jsonl"
    assert path.read_text() == "\n".join(A.to_jsonl(rebuilt)) + "\n"  # byte-for-byte: the set is versioned


@pytest.mark.parametrize("level", sorted(A.LEVELS))
def test_eval_sets_have_the_level_shape_and_correct_answers(level):
    lo, hi = A.LEVELS[level]
    items = A.eval_set(level)
    assert len({p.id for p in items}) == len(items)
    for p in items:
        start, ops = A.parse_prompt(p.prompt)
        assert lo <= len(ops) == p.meta["n_ops"] <= hi
        assert p.meta["level"] == level
        ref = A.reference_steps(start, ops)
        assert ref[-1] == f"{A.ANSWER_PREFIX}{p.answer}"
        assert A.is_correct(p, A.solution_text(p))
        assert all(A.is_well_formed_step(s) for s in ref)


def test_eval_sets_differ_between_levels():
    prompts = [{p.prompt for p in A.eval_set(level)} for level in A.LEVELS]
    assert all(len(s) > 450 for s in prompts)  # few duplicates inside a set


def test_reference_solution_of_the_docstring_example():
    p = A.make_problem(7, [("+", 5), ("*", 3), ("-", 4)], "x")
    assert p.prompt == "Start at 7. Apply in order: +5, *3, -4."
    assert p.answer == "32"
    assert A.solution_text(p) == "7+5=12\n12*3=36\n36-4=32\nAnswer: 32"
    assert A.STEP_FORMAT.delimiter == A.DELIMITER == "\n"


def test_generated_values_stay_bounded_and_problems_are_seeded():
    d = A.Difficulty()
    rng = np.random.default_rng(0)
    for _ in range(2000):
        start, ops = A.generate(rng, d)
        assert 1 <= start <= d.max_operand
        assert d.min_ops <= len(ops) <= d.max_ops
        value = start
        for op, x in ops:
            assert op in "+-*"
            assert (2 <= x <= d.max_factor) if op == "*" else (1 <= x <= d.max_operand)
            value = A.apply(value, op, x)
            assert abs(value) <= d.max_value
    assert A.problems(5, seed=3) == A.problems(5, seed=3)
    assert A.problems(5, seed=3) != A.problems(5, seed=4)


def test_prompt_round_trip():
    rng = np.random.default_rng(1)
    for _ in range(500):
        start, ops = A.generate(rng)
        assert A.parse_prompt(A.prompt_text(start, ops)) == (start, ops)
    with pytest.raises(ValueError):
        A.parse_prompt("What is 2+2?")
    with pytest.raises(ValueError):
        A.level_difficulty("impossible")
    with pytest.raises(ValueError):
        A.Difficulty(min_ops=3, max_ops=2)


def test_negative_values_round_trip():
    p = A.make_problem(3, [("-", 10), ("*", 2)], "neg")
    assert A.solution_text(p) == "3-10=-7\n-7*2=-14\nAnswer: -14"
    assert A.parse_prompt(p.prompt) == (3, [("-", 10), ("*", 2)])
    assert A.is_correct(p, A.solution_text(p))


def test_step_labels_are_prefix_labels():
    p = A.make_problem(7, [("+", 5), ("*", 3), ("-", 4)], "x")
    ref = A.solution_text(p).split("\n")
    assert A.step_labels(p, ref) == [True, True, True, True]
    assert A.step_labels(p, [s + "\n" for s in ref[:2]]) == [True, True]  # delimiters are ignored
    # a wrong step makes it and every later step wrong, even a locally correct continuation
    wrong = ["7+5=12", "12*3=35", "35-4=31", "Answer: 31"]
    assert A.step_labels(p, wrong) == [True, False, False, False]
    # a correct line after a wrong one is still wrong (prefix label)
    assert A.step_labels(p, ["7+5=13", "12*3=36", "36-4=32", "Answer: 32"]) == [False] * 4
    # extra steps past the reference are wrong; an empty solution has no labels
    assert A.step_labels(p, ref + ["Answer: 32"]) == [True] * 4 + [False]
    assert A.step_labels(p, []) == []
    # an early answer is wrong even when the value happens to be right
    assert A.step_labels(p, ["7+5=12", "Answer: 12"]) == [True, False]


def test_local_labels_judge_each_line_given_the_lines_shown():
    p = A.make_problem(7, [("+", 5), ("*", 3), ("-", 4)], "x")
    ref = A.solution_text(p).split("\n")
    assert A.local_step_labels(p, ref) == [True] * 4
    # a slip is wrong where it happens; lines computed on from the slipped value are right
    assert A.local_step_labels(p, ["7+5=12", "12*3=35", "35-4=31", "Answer: 31"]) == [True, False, True, True]
    # a line that does not copy the previous result is wrong, as is the wrong operation
    assert A.local_step_labels(p, ["7+5=13", "12*3=36", "36+4=40", "Answer: 40"]) == [False, False, False, True]
    # after a malformed line nothing is defined; after the answer nothing is right
    assert A.local_step_labels(p, ["7+5=12", "twelve", "36-4=32"]) == [True, False, None]
    assert A.local_step_labels(p, ref + ["Answer: 32"]) == [True] * 4 + [False]
    assert A.local_step_labels(p, ["7+5=12", "Answer: 12"]) == [True, False]  # early answer
    assert A.local_step_labels(p, []) == []


def test_running_and_of_local_labels_is_the_prefix_label():
    from itscale.zoo.slips import training_solution

    rng = np.random.default_rng(0)
    problems = A.problems(400, seed=11)
    policy_like = [["7+5=12", "12*3=36", "oops", "Answer: 3"], ["Answer: 32"], ["7+5=12\n", "12*3=36\n"]]
    cases = [(p, training_solution(p, rng)) for p in problems]
    cases += [(A.make_problem(7, [("+", 5), ("*", 3), ("-", 4)], "x"), s) for s in policy_like]
    wrong_lines = 0
    for p, steps in cases:
        running, ok = [], True
        for label in A.local_step_labels(p, steps):
            ok = ok and bool(label)
            running.append(ok)
        assert running == A.step_labels(p, steps), (p.prompt, steps)
        wrong_lines += A.local_step_labels(p, steps).count(False)
    assert wrong_lines > 300  # the synthetic solutions do carry slips


def test_is_correct_grades_the_last_answer_line_only():
    p = A.make_problem(7, [("+", 5), ("*", 3), ("-", 4)], "x")
    assert A.is_correct(p, "Answer: 32")
    assert A.is_correct(p, "7+5=13\nnonsense\nAnswer: 32")  # a lucky derivation still counts
    assert not A.is_correct(p, "7+5=12\n12*3=36\n36-4=32")
    assert not A.is_correct(p, "Answer: 32\nAnswer: 31")
    assert not A.is_correct(p, "")
    assert A.extract_answer("x\nAnswer: -5\n") == "-5"
    assert A.extract_answer("Answer: five") is None


def test_well_formed_steps():
    for good in ["7+5=12", "12*3=36\n", "-7-10=-17", "Answer: -3", "Answer:4"]:
        assert A.is_well_formed_step(good), good
    for bad in ["", "7+5=", "7+=12", "Answer:", "12 * 3 = 36", "7/5=1"]:
        assert not A.is_well_formed_step(bad), bad


def test_jsonl_rows_carry_the_fields_bench_reads():
    p = A.eval_set("easy")[0]
    row = json.loads(next(A.to_jsonl([p])))
    assert set(row) == {"id", "problem", "answer", "level", "n_ops"}
    assert A._from_json(json.dumps(row)) == Problem(p.id, p.prompt, p.answer)
