"""SmolLM2-135M-Instruct (a byte-level BPE model with a chat template and a system prompt) through
the Hugging Face backend: loading the GGUF file, cutting steps where merged tokens hold the
delimiter, end of sequence, the context limit, and key/value-cache reuse."""

from __future__ import annotations

import math

import pytest

from itscale.types import Problem, SamplingParams, Step, StepRequest

pytestmark = [pytest.mark.real_llm, pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("smollm2")]

NATALIA = Problem("gsm8k-1", "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                             "in May. How many clips did Natalia sell altogether in April and May? Think step by step.")
TOKENS = 120  # per solution: enough for several lines and a blank line on this problem


def greedy(tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_step_tokens=tokens, seed=0)


def stepwise(gen, problem: Problem, stop: tuple[str, ...], budget: int = TOKENS) -> list[Step]:
    """Greedy steps one request at a time, each continuing the text of the ones before."""
    steps: list[Step] = []
    used = 0
    while used < budget:
        (step,) = gen.generate_steps_sync([StepRequest(problem, tuple(steps), 1, greedy(budget - used), stop)])[0]
        steps.append(step)
        used += step.tokens
        if step.finish_reason != "stop":
            break
    return steps


def test_the_gguf_file_loads_with_its_tokenizer_chat_template_and_system_prompt(smollm2):
    from itscale.lm import HFGenerator

    assert isinstance(smollm2, HFGenerator) and str(smollm2.device) == "cpu"
    assert smollm2.capabilities.n_parameters == 134_515_008  # the 135M model, de-quantized
    context = smollm2.context_text(NATALIA.prompt)
    assert context.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert context.endswith(f"<|im_start|>user\n{NATALIA.prompt}<|im_end|>\n<|im_start|>assistant\n")
    assert smollm2.max_positions == 8192


@pytest.fixture(scope="module")
def uninterrupted(smollm2):
    (whole,) = smollm2.generate_steps_sync([StepRequest(NATALIA, (), 1, greedy(TOKENS), ())])[0]
    assert whole.finish_reason in ("length", "eos") and whole.tokens > 60
    return whole


@pytest.mark.parametrize("stop", [("\n\n",), ("\n",), (".",)])
def test_steps_cut_at_a_delimiter_concatenate_to_the_uninterrupted_generation(smollm2, uninterrupted, stop):
    """Here SmolLM2 writes a blank line as two "\\n" tokens (though "\\n\\n" alone encodes as one), so
    with stop "\\n" the blank line is a step of its own; with the prefix cache the ids the model
    generated are kept, so the concatenation is exact (a server re-tokenizing the text reads the
    one-token "\\n\\n" instead: see tests/real_llm/test_smollm2_server.py)."""
    steps = stepwise(smollm2, NATALIA, stop)
    assert "".join(s.text for s in steps) == uninterrupted.text
    assert sum(s.tokens for s in steps) >= uninterrupted.tokens
    cut = [s for s in steps if s.finish_reason == "stop"]
    assert cut and all(s.text.endswith(stop[0]) and s.text.count(stop[0]) == 1 for s in cut)
    if stop == ("\n",):  # the blank line is a step of its own
        ids = smollm2.tokenizer.encode("\n\n", add_special_tokens=False)
        assert len(ids) == 1 and "\n\n" in uninterrupted.text and "\n" in [s.text for s in steps]


def test_a_token_holding_the_delimiter_and_more_carries_the_rest_into_the_next_step(smollm2):
    """In code SmolLM2 writes "\\n\\n   " (a blank line and the next line's indent) as one token: the
    step ends at "\\n\\n", the three spaces are its carry, and the next step begins with them, so
    the steps concatenate to the uninterrupted generation and nothing is lost."""
    code = Problem("counter", "Write a Python class named Counter with an increment method.")
    merged = smollm2.tokenizer.encode("\n\n   ", add_special_tokens=False)
    assert len(merged) == 1
    (whole,) = smollm2.generate_steps_sync([StepRequest(code, (), 1, greedy(TOKENS), ())])[0]
    assert merged[0] in smollm2.tokenizer.encode(whole.text, add_special_tokens=False)
    steps = stepwise(smollm2, code, ("\n\n",))
    carried = [s for s in steps if s.carry]
    assert carried and all(s.text.endswith("\n\n") and s.carry == "   " for s in carried)
    after = [steps[i + 1] for i, s in enumerate(steps[:-1]) if s.carry]
    assert after and all(nxt.text.startswith("   ") for nxt in after)
    assert "".join(s.text for s in steps) == whole.text


def test_a_stop_string_spanning_several_tokens_ends_the_step_right_after_it(smollm2, uninterrupted):
    stop = "clips sold in"  # four tokens
    assert len(smollm2.tokenizer.encode(stop, add_special_tokens=False)) > 1
    (step,) = smollm2.generate_steps_sync([StepRequest(NATALIA, (), 1, greedy(TOKENS), (stop,))])[0]
    end = uninterrupted.text.index(stop) + len(stop)
    assert step.finish_reason == "stop" and step.text == uninterrupted.text[:end]


def test_an_answer_ends_at_end_of_sequence_without_the_end_token_in_its_text(smollm2):
    short = Problem("short", "What is 2 + 3? Answer with the number only.")
    (step,) = smollm2.generate_steps_sync([StepRequest(short, (), 1, greedy(32), ())])[0]
    assert step.finish_reason == "eos" and step.text.strip() and "<|im_end|>" not in step.text
    assert step.tokens == len(smollm2.tokenizer.encode(step.text, add_special_tokens=False)) + 1  # + the EOS


def test_a_prompt_longer_than_the_context_is_a_clear_error(smollm2):
    long = Problem("long", "Add these numbers: " + " + ".join(["17"] * 4000) + ".")
    assert smollm2.context_room(long.prompt) < 1
    (step,) = smollm2.generate_steps_sync([StepRequest(long, (), 1, greedy(8), ("\n",))])[0]
    assert step.finish_reason == "error" and "8192 positions" in step.error, step.error


def test_reusing_the_key_value_cache_gives_the_log_probabilities_of_recomputation(smollm2):
    """Two rounds of seeded sampling, continuing the first round's steps: with the prefix cache
    and with every context recomputed from scratch (the same weights)."""
    from itscale.lm import HFGenerator

    fresh = HFGenerator(smollm2.model, smollm2.tokenizer, device="cpu", reuse_cache=False, run_in_thread=False)
    sampling = SamplingParams(temperature=0.8, max_step_tokens=40, seed=7)
    first = [StepRequest(NATALIA, (), 3, sampling, ("\n",))]
    a, b = smollm2.generate_steps_sync(first)[0], fresh.generate_steps_sync(first)[0]
    assert [s.text for s in a] == [s.text for s in b]
    second = [StepRequest(NATALIA, (s,), 1, SamplingParams(temperature=0.8, max_step_tokens=40, seed=8 + i), ("\n",))
              for i, s in enumerate(a)]
    c, d = smollm2.generate_steps_sync(second), fresh.generate_steps_sync(second)
    assert [o[0].text for o in c] == [o[0].text for o in d]
    worst = max(abs(x.logprob - y.logprob) for x, y in zip(a + [o[0] for o in c], b + [o[0] for o in d]))
    assert worst < 1e-3 and all(math.isfinite(x.logprob) for x in a)
    assert sum(o[0].prefilled_tokens for o in c) < sum(o[0].prefilled_tokens for o in d) / 2  # the cache was used
