"""The demo's and the scaling study's configurations say what the README says they run."""

from __future__ import annotations

from pathlib import Path

import pytest

from itscale.bench.config import load_config
from itscale.bench.demo import demo_config
from itscale.strategies.base import STRATEGIES

SCALING = Path(__file__).resolve().parents[2] / "benchmarks" / "configs" / "scaling.yaml"


def _prm_guided(config):
    return [m for m in config.methods if STRATEGIES[m.name].needs_prm]


@pytest.mark.parametrize("config", [demo_config(), load_config(SCALING)], ids=["demo", "scaling"])
def test_every_prm_guided_method_reads_the_prm_the_same_way(config):
    guided = _prm_guided(config)
    assert len(guided) >= 5
    assert {m.params.get("aggregation") for m in guided} == {"min"}  # MODEL_CARD.md: min is this PRM's reading
    assert config.policy.temperature == 0.8


def _needs_a_learnt_policy(name: str) -> bool:
    """A method with a required parameter, such as compute_optimal's ``allocation`` (the policy a
    bench run with an ``allocation:`` section learns from this very study): it cannot be swept
    before that policy exists, so the study learns it (``allocation:``) rather than runs it."""
    return any(f.is_required() for f in STRATEGIES[name].Params.model_fields.values())


def test_the_scaling_study_covers_every_method_at_budgets_1_to_64():
    config = load_config(SCALING)
    assert config.problems.limit >= 300 and config.problems.source == "arithmetic:medium"
    runnable = {name for name in STRATEGIES if not _needs_a_learnt_policy(name)
                and STRATEGIES[name].prm_kind in (None, config.prm.kind)}
    # compute_optimal needs a learnt policy; self_certainty reads the confidence PRM, not this study's tag PRM
    assert runnable == set(STRATEGIES) - {"compute_optimal", "self_certainty"}
    assert {m.name for m in config.methods} == runnable  # every registered method this study's models can run
    for m in config.methods:
        budgets = m.budgets or config.budgets
        assert max(budgets) == 64, m.key
        assert min(budgets) <= 4, m.key  # the smallest budget the method's shape allows
