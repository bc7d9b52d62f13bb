"""The Hugging Face backends under real strategies: plumbing and cost accounting."""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest_models import tiny_causal_lm  # noqa: E402
from itscale.lm import HFGenerator  # noqa: E402
from itscale.rewards import HFTagPRM  # noqa: E402
from itscale.strategies import StepFormat, make_strategy, run_many  # noqa: E402
from itscale.types import Problem  # noqa: E402

FORMAT = StepFormat(delimiter="\n", answer_markers=("Answer:",), max_steps=4)
PROBLEM = Problem("p", "3+4*2=", answer="11")


@pytest.fixture(scope="module")
def prm_model(char_tokenizer):
    return tiny_causal_lm(char_tokenizer, seed=7, biases={"+": 1.0})


def test_particle_filtering_end_to_end(char_tokenizer, tiny_lm, prm_model):
    policy, prm = HFGenerator(tiny_lm, char_tokenizer), HFTagPRM(prm_model, char_tokenizer)
    result = make_strategy("particle_filtering", policy, prm, format=FORMAT).solve(PROBLEM, 4, seed=0)
    assert result.status == "ok" and result.candidates
    cost = result.cost
    assert cost.generated_tokens > 0 and cost.policy_calls >= 2 and cost.prm_calls >= 2
    assert cost.prefilled_tokens is not None and 0 < cost.prefilled_tokens < cost.prompt_tokens
    assert cost.policy_flops == 2.0 * policy.capabilities.n_parameters * (cost.generated_tokens + cost.prefilled_tokens)
    assert cost.prm_tokens > 0 and cost.prm_flops > 0
    # the same run without any cache gives the same particles
    plain = make_strategy("particle_filtering", HFGenerator(tiny_lm, char_tokenizer, reuse_cache=False),
                          HFTagPRM(prm_model, char_tokenizer, reuse_cache=False), format=FORMAT)
    again = plain.solve(PROBLEM, 4, seed=0)
    assert [c.text for c in again.candidates] == [c.text for c in result.candidates]
    assert again.cost.prefilled_tokens == again.cost.prompt_tokens > cost.prefilled_tokens
    assert again.cost.prm_tokens > cost.prm_tokens


def test_population_batching_across_problems(char_tokenizer, tiny_lm, prm_model):
    policy, prm = HFGenerator(tiny_lm, char_tokenizer), HFTagPRM(prm_model, char_tokenizer)
    problems = [Problem(f"q{i}", f"{i}+{i}*3=") for i in range(3)]
    strategy = make_strategy("particle_filtering", policy, prm, format=FORMAT)
    results = asyncio.run(run_many(strategy, problems, 4, seed=1))
    assert [r.problem.id for r in results] == ["q0", "q1", "q2"] and all(r.ok for r in results)
    # one backend call per round serves all problems
    assert policy.stats.calls < sum(r.cost.policy_calls for r in results)
    assert policy.stats.prefilled_tokens == sum(r.cost.prefilled_tokens for r in results)


def test_best_of_n_whole_solutions(char_tokenizer, tiny_lm, prm_model):
    policy, prm = HFGenerator(tiny_lm, char_tokenizer), HFTagPRM(prm_model, char_tokenizer)
    result = make_strategy("best_of_n", policy, prm, format=FORMAT).solve(PROBLEM, 4, seed=0)
    assert result.ok and len(result.candidates) >= 1
    assert result.cost.prefilled_tokens == result.cost.prompt_tokens  # one prompt, read once
