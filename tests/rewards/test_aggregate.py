import math

import pytest

from itscale.rewards.aggregate import aggregate, aggregate_prefixes, score_request_steps


def test_aggregations():
    s = [0.9, 0.5, 0.8]
    assert aggregate(s, "last") == 0.8 and aggregate(s, "model") == 0.8
    assert aggregate(s, "min") == 0.5
    assert aggregate(s, "prod") == pytest.approx(0.36)
    assert aggregate(s, "mean") == pytest.approx(2.2 / 3)
    assert aggregate_prefixes(s, "min") == [0.9, 0.5, 0.5]
    assert math.isnan(aggregate([], "last"))


def test_model_aggregation_sends_the_joined_text_as_one_step():
    assert score_request_steps(["a\n\n", "b\n\n"], "model") == ("a\n\nb\n\n",)
    assert score_request_steps(["a\n\n", "b\n\n"], "min") == ("a\n\n", "b\n\n")


def test_unknown_aggregation_is_named():
    with pytest.raises(ValueError, match="aggregation must be one of"):
        aggregate([0.5], "median")
