r"""Bench grading: fast-path keys, math-verify equivalence, threads, event loops, timeouts."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from itscale.bench.grading import Grader, GraderStartError

pytest.importorskip("math_verify")


def slow_compare(prediction: str, reference: str) -> bool:
    """Injected comparison (module level, so it pickles): hangs on ``"slow"``, else ignores case."""
    if prediction == "slow":
        time.sleep(60)
    return prediction.lower() == reference.lower()


def failing_compare(prediction: str, reference: str) -> bool:
    raise RuntimeError("boom")


def dying_compare(prediction: str, reference: str) -> bool:
    """Kills its worker process on ``"die"``, else ignores case."""
    if prediction == "die":
        os._exit(3)
    return prediction.lower() == reference.lower()


@pytest.fixture(scope="module")
def grader():
    with Grader() as g:
        yield g


@pytest.mark.parametrize("prediction,reference", [
    ("42", "42"), ("42.0", "42"), ("-7", "-7.00"), ("1,000", "1000"), ("0.50", "0.5"),
    ("\\boxed{17}", "17"), ("$3$", "3"), ("12.", "12"), (" 5 ", "5"),
])
def test_fast_path_needs_no_worker(prediction, reference):
    g = Grader(compare=failing_compare)  # would count a failure if the worker were used
    assert g.grade(prediction, reference) and g.failures == 0 and g._pool is None


@pytest.mark.parametrize("prediction,reference", [("41", "42"), (None, "42"), ("", "42"), ("  ", "1")])
def test_fast_negatives(prediction, reference):
    g = Grader(compare=failing_compare)
    assert not g.grade(prediction, reference) and g._pool is None


@pytest.mark.parametrize("prediction,reference", [
    ("\\frac{1}{2}", "0.5"), ("0.5", "\\frac{1}{2}"), ("\\dfrac{3}{4}", "3/4"), ("2\\sqrt{2}", "\\sqrt{8}"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"), ("\\boxed{\\frac12}", "1/2"), ("x+1", "1+x"),
])
def test_latex_equivalences(grader, prediction, reference):
    assert grader.grade(prediction, reference)


@pytest.mark.parametrize("prediction,reference", [
    ("\\frac{1}{3}", "0.5"), ("\\sqrt{2}", "2"), ("3/4", "4/3"), ("x+1", "x-1"), ("\\pi", "3.14"),
])
def test_non_equivalent_pairs(grader, prediction, reference):
    assert not grader.grade(prediction, reference)


def test_extract_then_grade(grader):
    text = "First, 1/4 + 1/4.\n\nSo the answer is $\\boxed{\\dfrac{1}{2}}$."
    assert grader.extract(text) == "\\dfrac{1}{2}" and grader.grade(grader.extract(text), "0.5")
    assert grader.extract("no answer here") is None


def test_grading_from_a_worker_thread(grader):
    results: list[object] = []

    def work():
        try:
            results.append(grader.grade("\\frac{6}{8}", "0.75"))
        except Exception as e:  # noqa: BLE001 - the failure being guarded against
            results.append(e)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert results == [True]


def test_grading_inside_an_event_loop(grader):
    async def main():
        in_loop = grader.grade("\\frac{1}{8}", "0.125")
        off_loop = await grader.agrade("\\frac{3}{8}", "0.375")
        gathered = await asyncio.gather(*(grader.agrade(f"\\frac{{1}}{{{d}}}", str(1 / d)) for d in (16, 32)))
        return in_loop, off_loop, gathered

    assert asyncio.run(main()) == (True, True, [True, True])
    assert grader.failures == 0 and grader.timeouts == 0


def test_results_are_cached(grader):
    assert grader.grade("\\frac{1}{10}", "0.1")
    pool, grader._pool = grader._pool, None  # a cached pair must not need the worker
    try:
        assert grader.grade("$\\frac{1}{10}$", "0.10")
    finally:
        grader._pool = pool


def test_timeout_returns_false_and_replaces_the_worker():
    with Grader(compare=slow_compare, timeout=0.5) as g:
        start = time.monotonic()
        assert not g.grade("slow", "x")
        assert time.monotonic() - start < 30 and g.timeouts == 1 and g._pool is None
        assert g.grade("ABC", "abc") and not g.grade("a", "b")  # a fresh worker answers
        assert g._pool is not None and g.timeouts == 1 and g.failures == 0


def test_exceptions_in_the_comparison_grade_false():
    with Grader(compare=failing_compare) as g:
        assert not g.grade("x", "y") and g.failures == 1


def test_a_dead_worker_is_replaced_and_not_cached():
    with Grader(compare=dying_compare) as g:
        assert not g.grade("die", "x") and g.failures == 1 and g._pool is None and not g._cache
        assert g.grade("ABC", "abc") and g._pool is not None  # a fresh worker answers
        assert g.failures == 1


def test_worker_start_up_timeout_is_a_clear_error():
    with Grader(compare=failing_compare, startup_timeout=1e-4) as g:
        with pytest.raises(GraderStartError, match="startup_timeout"):
            g.grade("x", "y")
        assert g._pool is None
