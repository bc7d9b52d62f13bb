import pytest

from itscale.tasks.answers import answer_key, extract_answer, last_boxed


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{42}.", "42"),
    (r"\boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{a{b}c}", "a{b}c"),
    ("Step 1: 3+4=7\nAnswer: 7", "7"),
    ("A: -12", "-12"),
    ("we get 3 and then 17 apples", "17"),
    ("no numbers here", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_unbalanced_boxed_is_ignored():
    assert last_boxed(r"\boxed{12") is None
    assert extract_answer(r"\boxed{12") == "12"


@pytest.mark.parametrize("a, b", [("3", "3.0"), ("$1,000$", "1000"), (" 7. ", "7"), ("-0.5", "-.5")])
def test_equivalent_answers_share_a_key(a, b):
    assert answer_key(a) == answer_key(b)


def test_different_answers_differ_and_none_stays_none():
    assert answer_key("3") != answer_key("4")
    assert answer_key(r"\frac{1}{2}") == r"\frac{1}{2}"
    assert answer_key(None) is None
