"""A Python function as a process reward model: semantics, failures, loading, bench and server."""

from __future__ import annotations

import asyncio
import math

import pytest
from pydantic import ValidationError

from itscale.backends import PRMSpec, load_prm
from itscale.rewards import CallablePRM
from itscale.tasks import arithmetic
from itscale.types import Problem, ScoreRequest

from .bench_cli import bench_metrics

CHECK = "itscale.tasks.arithmetic:calculator_check"
PROBLEM = arithmetic.make_problem(7, [("+", 5), ("*", 3)], "v")


def score(prm, *requests):
    return asyncio.new_event_loop().run_until_complete(prm.score_steps(list(requests)))


def test_the_function_scores_the_latest_step_given_the_ones_before():
    prm = load_prm(CHECK, kind="verifier")
    assert isinstance(prm, CallablePRM)
    right, slipped, after = "7+5=12\n", "12*3=35\n", "Answer: 35"  # a slip, then a line right *given* it
    (out,) = score(prm, ScoreRequest(PROBLEM, (right, slipped, after)))
    assert out.scores == pytest.approx((1 - 1e-6, 1e-6, 1 - 1e-6)) and out.tokens == 0
    assert prm.stats.evaluated == 3
    (again,) = score(prm, ScoreRequest(PROBLEM, (right, slipped)))  # every prefix is cached
    assert again.scores == out.scores[:2] and prm.stats.evaluated == 3 and prm.stats.cached == 2


def test_a_function_that_fails_or_returns_nonsense_kills_only_that_step():
    calls = []

    def picky(problem, steps):
        calls.append(len(steps))
        if "boom" in steps[-1]:
            raise RuntimeError("cannot read this line")
        return 2.0 if "big" in steps[-1] else True

    prm = CallablePRM(picky, name="tests:picky")
    ok, boom, big = score(prm, ScoreRequest(PROBLEM, ("a\n",)), ScoreRequest(PROBLEM, ("a\n", "boom\n")),
                          ScoreRequest(PROBLEM, ("big\n",)))
    assert ok.scores[0] == 1 - 1e-6 and math.isnan(boom.scores[1]) and math.isnan(big.scores[0])
    assert prm.stats.failed == 2 and "must be a number in [0, 1]" in prm.stats.last_error
    score(prm, ScoreRequest(PROBLEM, ("a\n", "boom\n")))  # a failed score is not cached: tried again
    assert calls.count(2) == 2
    assert math.isnan(score(CallablePRM(arithmetic.calculator_check), ScoreRequest(Problem("x", "Hi"), ("1\n",)))[0]
                      .scores[0])  # not a prompt of the task: the function raises, the step scores NaN


def test_a_verifier_is_named_like_any_model_and_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"^prm.model: 'no_such_module:check': cannot import"):
        load_prm("no_such_module:check", kind="verifier")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        load_prm("itscale.tasks.arithmetic:nope", kind="verifier")
    with pytest.raises(ValidationError, match="set kind: verifier"):
        PRMSpec(model=CHECK)
    with pytest.raises(ValidationError, match="give it as module.path:function"):
        PRMSpec(model="embedded", kind="verifier")


def test_particle_filtering_with_a_calculator_verifier_in_the_bench(tmp_path):
    """The embedded policy guided by the task's calculator check, through itscale bench."""
    pytest.importorskip("torch")
    rows = bench_metrics(tmp_path, f"problems: {{source: 'arithmetic:hard', limit: 30}}\n"
                                   f"prm: {{kind: verifier, model: '{CHECK}'}}\n"
                                   "methods: [{name: greedy}, {name: particle_filtering}]\nbudgets: [8]\n")
    accuracy = {method: float(r["accuracy"]) for method, r in rows.items()}
    # measured on these 30 hard problems: greedy 11/30, particle filtering at budget 8 with the check 20/30
    assert accuracy["particle_filtering"] >= accuracy["greedy"] + 0.2, accuracy
