"""Pooled methods share a pool only when their samples need the same things."""

from __future__ import annotations

from itscale.bench.config import MethodConfig
from itscale.bench.sweep import _pool_groups


def test_deepconf_draws_its_own_pool_with_top_logprobs_and_the_rest_share_theirs():
    methods = [MethodConfig(name="self_consistency", label="majority_vote"), MethodConfig(name="rpc"),
               MethodConfig(name="best_of_n", params={"aggregation": "min"}),
               MethodConfig(name="weighted_best_of_n", params={"aggregation": "min"}),
               MethodConfig(name="deepconf", params={"window": 8}),
               MethodConfig(name="deepconf", label="deepconf_k5", params={"top_k": 5})]
    groups = {key: [m.key for m in group] for key, group in _pool_groups(methods).items()}
    assert groups == {
        ("min", ""): ["majority_vote", "rpc", "best_of_n", "weighted_best_of_n"],  # as before: one pool
        ("last", "top_logprobs=20"): ["deepconf"],
        ("last", "top_logprobs=5"): ["deepconf_k5"],
    }
