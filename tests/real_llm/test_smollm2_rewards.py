"""Rewards without a trained PRM on a real model: SmolLM2-135M-Instruct as an LLM judge and as its
own confidence, with its byte-level BPE tokenizer and chat template."""

from __future__ import annotations

import math

import pytest

from itscale.types import Problem, SamplingParams, ScoreRequest, StepRequest

pytestmark = [pytest.mark.real_llm, pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("smollm2")]

APPLES = Problem("apples", "Tom has 3 apples and buys 4 more. How many apples does he have now?")


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def test_the_judge_finds_every_spelling_of_yes_and_no_and_reads_the_chat_template_the_model_was_tuned_on(smollm2,
                                                                                                       torch):
    from itscale.rewards import HFJudgePRM

    judge = HFJudgePRM(smollm2.model, smollm2.tokenizer, run_in_thread=False)
    tok = smollm2.tokenizer
    assert sorted(tok.decode([i]) for i in judge.yes_ids) == [" Yes", " yes", "Yes", "yes"]
    assert sorted(tok.decode([i]) for i in judge.no_ids) == [" No", " no", "No", "no"]
    request = ScoreRequest(APPLES, ("3 + 4 = 7.\n\n", "The answer is 7."))
    scores = judge.score_steps_sync([request])[0].scores
    for t in range(2):  # a direct computation: the tokenizer's own chat template, one forward pass
        question = judge.prompt.question(APPLES.prompt, request.steps, t)
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                      return_dict=False)
        with torch.no_grad():
            p = torch.softmax(smollm2.model(torch.tensor([list(ids)])).logits[0, -1].double(), -1)
        yes, no = p[judge.yes_ids].sum(), p[judge.no_ids].sum()
        assert scores[t] == pytest.approx(float(yes / (yes + no)), abs=1e-5)
        assert float(yes + no) > 0.05  # the question makes it answer yes or no, not something else
    assert "system" in tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)  # its default


def test_the_confidence_read_back_equals_the_log_probabilities_the_policy_sampled_with(smollm2):
    """Mean-logprob scores s_t = σ(mean log p) over steps 1..t must match the generator's own
    Step.logprob / Step.tokens: the steps are tokenized again one by one, and this checks that
    re-tokenizing a step cut at a delimiter gives the tokens the model sampled."""
    from itscale.rewards import HFConfidencePRM

    prm = HFConfidencePRM(smollm2.model, smollm2.tokenizer, measure="mean-logprob", run_in_thread=False)
    params = SamplingParams(temperature=0.7, max_step_tokens=40, seed=5)
    steps = ()
    for _ in range(3):
        (step,) = smollm2.generate_steps_sync([StepRequest(APPLES, steps, 1, params, ("\n",))])[0]
        if step.finish_reason != "stop":
            break
        steps += (step,)
    assert len(steps) >= 2, [s.text for s in steps]
    scores = prm.score_steps_sync([ScoreRequest(APPLES, tuple(s.text for s in steps))])[0].scores
    logprob = tokens = 0.0
    for step, score in zip(steps, scores):
        logprob, tokens = logprob + step.logprob, tokens + step.tokens
        assert score == pytest.approx(1 / (1 + math.exp(-logprob / tokens)), abs=2e-4), [s.text for s in steps]


def test_self_certainty_ranks_a_rambling_answer_below_a_direct_one(smollm2):
    """Measured on SmolLM2 (not a law): a direct answer reads with higher self-certainty than a
    wandering one, which is what best-of-N with self-certainty relies on."""
    from itscale.rewards import HFConfidencePRM

    prm = HFConfidencePRM(smollm2.model, smollm2.tokenizer, run_in_thread=False)
    direct = ("Tom has 3 + 4 = 7 apples.\n", "The answer is 7.")
    wander = ("Apples are fruit that grow in orchards, zebra purple quantum.\n", "The answer is 7.")
    a, b = prm.score_steps_sync([ScoreRequest(APPLES, direct), ScoreRequest(APPLES, wander)])
    assert a.scores[-1] > b.scores[-1], (a.scores, b.scores)
