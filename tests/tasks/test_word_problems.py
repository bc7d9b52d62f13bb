"""The shipped word-problem set (``word_problems:v1``) of the real-model tier."""

from __future__ import annotations

import json
import re
from fractions import Fraction

import pytest

from itscale.bench.config import BenchConfig
from itscale.bench.problems import BUNDLED_SETS, load_problems
from itscale.tasks import word_problems as W
from itscale.tasks.answers import answer_key, extract_answer

SHIPPED = [json.loads(line) for line in W.data_path().read_text(encoding="utf-8").splitlines()]


def _ratio(a, b):
    """a / b, which must come out even."""
    q = Fraction(a, b)
    assert q.denominator == 1, f"{a} / {b} is not a whole number"
    return q


#: Each template's answer derived again from its wording, independently of the generator's
#: expressions (a template whose expression drifts from its story fails here).
RECOMPUTE = {
    "buy_total": lambda n: n["a"] * n["p"],
    "buy_change": lambda n: n["bill"] - n["a"] * n["p"],
    "buy_afford": lambda n: _ratio(n["m"], n["p"]),
    "buy_left": lambda n: n["m"] - n["a"] * n["p"],
    "buy_two_kinds": lambda n: n["a"] * n["p"] + n["b"] * n["q"],
    "buy_tickets": lambda n: n["a"] * n["n"] + n["c"] * n["k"],
    "share_equal": lambda n: _ratio(n["n"], n["k"]),
    "share_after_eating": lambda n: _ratio(n["n"] - n["e"], n["k"]),
    "share_bags": lambda n: _ratio(n["n"], n["k"]),
    "share_tables": lambda n: n["g"] * n["k"],
    "share_pooled": lambda n: _ratio(n["a"] + n["b"], 2),
    "share_boxes_left": lambda n: n["n"] - n["k"] * n["f"],
    "age_older": lambda n: n["x"] + n["d"],
    "age_future": lambda n: n["x"] + n["d"] + n["y"],
    "age_times": lambda n: n["x"] * n["k"],
    "age_sum": lambda n: 2 * n["x"] - n["d"],
    "age_past": lambda n: n["x"] - n["y"],
    "age_born": lambda n: n["d"] + n["x"] + n["y"],
    "speed_distance": lambda n: n["v"] * n["t"],
    "speed_time": lambda n: _ratio(n["d"], n["v"]),
    "speed_bike_walk": lambda n: n["v"] * n["t"] + n["w"],
    "speed_round_trip": lambda n: 2 * n["d"] + n["e"],
    "speed_remaining": lambda n: n["D"] - n["v"] * n["t"],
    "speed_average": lambda n: _ratio(n["a"] + n["b"] + n["c"], 3),
    "money_save": lambda n: n["s"] * n["w"],
    "money_earn_spend": lambda n: n["e"] + n["f"] - n["g"],
    "money_goal": lambda n: _ratio(n["c"] - n["h"], n["s"]),
    "money_allowance": lambda n: n["a"] * n["w"] - n["b"] + n["g"],
    "money_split_bill": lambda n: _ratio(n["B"] + n["t"], n["k"]),
    "money_coins": lambda n: 5 * n["q"] + 10 * n["d"],
    "time_daily": lambda n: n["m"] * n["d"],
    "time_three_tasks": lambda n: n["a"] + n["b"] + n["c"],
    "time_movie": lambda n: 60 * n["h"] + n["m"],
    "time_baking": lambda n: n["t"] * n["n"] + n["c"],
    "time_weeks_days": lambda n: 7 * n["w"] + n["d"],
    "time_left": lambda n: n["h"] - n["a"] - n["b"],
    "count_more": lambda n: n["a"] + n["b"],
    "count_gave": lambda n: n["a"] - n["b"],
    "count_compare": lambda n: n["a"] - n["b"],
    "count_boxes": lambda n: n["b"] * n["k"] + n["l"],
    "count_garden": lambda n: n["r"] * n["k"] - n["d"],
    "count_changes": lambda n: n["a"] + n["b"] - n["c"] + n["e"],
}


def test_the_shipped_file_is_exactly_the_generator_output():
    rebuilt = W.build_rows()
    assert SHIPPED == rebuilt
    assert W.data_path().read_text(encoding="utf-8") == "\n".join(W.to_jsonl(rebuilt)) + "\n"  # byte for byte


def test_regeneration_is_deterministic_and_depends_on_the_seed():
    assert W.build_rows(20) == W.build_rows(20) == W.build_rows()[:20]
    assert W.build_rows(20, seed=W.SEED + 1) != W.build_rows(20)


def test_size_ids_and_prompts_are_unique():
    assert len(SHIPPED) == W.SIZE == 100
    assert len({r["id"] for r in SHIPPED}) == len(SHIPPED)
    assert len({r["problem"] for r in SHIPPED}) == len(SHIPPED)
    assert len({" ".join(r["problem"].lower().split()) for r in SHIPPED}) == len(SHIPPED)


def _literals(text: str) -> list[int]:
    """The numbers written in a template's text or expression (placeholders left out)."""
    return [int(x) for x in re.findall(r"\d+", re.sub(r"\{[^}]*\}", "", text))]


TEMPLATES = {t.id: t for t in W.TEMPLATES}


def check_row(r: dict) -> None:
    """The row's answer is what its numbers give, and the numbers are the question's."""
    numbers = r["numbers"]
    assert RECOMPUTE[r["template"]](numbers) == int(r["answer"]), r
    assert r["answer"] == str(int(r["answer"])) and 1 <= int(r["answer"]) <= W.MAX_ANSWER, r
    for value in numbers.values():  # every number the answer uses is in the question
        assert re.search(rf"(?<![\d.]){value}(?![\d.])", r["problem"]), (value, r["problem"])
    stated = sorted(int(x) for x in re.findall(r"\d+", r["problem"]))  # and the question states no other
    assert stated == sorted(list(numbers.values()) + _literals(TEMPLATES[r["template"]].text)), r


def test_every_answer_is_recomputed_from_the_numbers_the_prompt_states():
    assert set(RECOMPUTE) == set(TEMPLATES)
    for r in SHIPPED:
        check_row(r)


def test_the_recomputation_catches_a_wrong_row():
    row = SHIPPED[0]
    with pytest.raises(AssertionError):
        check_row({**row, "answer": str(int(row["answer"]) + 1)})
    swapped = next(r for r in SHIPPED if r["template"] == "count_more")
    with pytest.raises(AssertionError):  # a story that subtracts, with an answer that adds
        check_row({**swapped, "template": "count_gave"})


def test_shape_steps_and_topics():
    templates = TEMPLATES
    assert len(templates) == len(W.TEMPLATES) >= 36
    assert {t.topic for t in W.TEMPLATES} >= {"buying", "sharing", "ages", "speeds", "money", "time"}
    assert {r["template"] for r in SHIPPED} == set(templates)  # every template is used
    for r in SHIPPED:
        assert r["steps"] == templates[r["template"]].steps in (1, 2, 3)
        assert r["topic"] == templates[r["template"]].topic
        assert r["problem"].endswith("?") and r["problem"][0].isupper()
        assert r["id"].startswith("word-v1-")
    assert {r["steps"] for r in SHIPPED} == {1, 2, 3}
    assert len({name for r in SHIPPED for name in W.NAMES if name in r["problem"]}) >= 20


def test_the_stored_expression_is_the_answer():
    for r in SHIPPED:
        assert W.evaluate(r["expression"], {}) == int(r["answer"])
        assert set(_literals(r["expression"])) == set(r["numbers"].values()) | set(
            _literals(TEMPLATES[r["template"]].answer))


@pytest.mark.parametrize("written", ["The answer is {}.", "So the total is 3 + 4.\n#### {}",
                                     "Adding them gives \\boxed{{{}}}.", "Answer: {}"])
def test_answers_are_extracted_from_what_a_model_writes(written):
    for r in SHIPPED:
        text = "First, I read the question. " + written.format(r["answer"])
        assert answer_key(extract_answer(text)) == answer_key(r["answer"]) == r["answer"]


def test_loadable_by_name_through_the_bench_loader():
    assert W.NAME == "word_problems:v1" and W.NAME in BUNDLED_SETS
    pset = load_problems(W.NAME)
    assert pset.name == W.NAME and len(pset) == 100 and pset.template == "boxed"
    first = pset.problems[0]
    assert first.id == SHIPPED[0]["id"] and first.answer == SHIPPED[0]["answer"]
    assert first.prompt.startswith(SHIPPED[0]["problem"]) and "\\boxed{}" in first.prompt
    assert first.meta["problem"] == SHIPPED[0]["problem"]
    assert first.meta["steps"] == SHIPPED[0]["steps"] and first.meta["numbers"] == SHIPPED[0]["numbers"]
    plain = load_problems(W.NAME, template="plain", limit=5)
    assert [p.prompt for p in plain] == [r["problem"] for r in SHIPPED[:5]]
    assert [p.prompt for p in W.problems()] == [r["problem"] for r in SHIPPED]


def test_a_bench_config_names_it():
    config = BenchConfig(problems={"source": "word_problems:v1", "limit": 3}, methods=[{"name": "greedy"}],
                         policy={"model": "embedded"})
    assert config.problems.source == "word_problems:v1"
    assert config.problem_template() == "plain"  # the embedded policy gets the bare question (and a warning)
    other = BenchConfig(problems={"source": "word_problems:v1"}, methods=[{"name": "greedy"}],
                        policy={"model": "http://localhost:1/v1"})
    assert other.problem_template() is None  # the loader's default for files: boxed
