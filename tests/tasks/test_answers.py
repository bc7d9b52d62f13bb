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
    # as GSM8K solutions and chat models write them
    ("She sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72", "72"),
    ("#### 1,200\nafter that, 7", "1,200"),
    ("So in total she sold 72 clips, and the answer is 72.", "72"),
    ("The final answer is 3/4 of the cake, 2 slices", "3/4"),
    ("so the answer is: 18 clips. That uses 3 steps.", "18"),
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
