"""HFGenerator: step boundaries, EOS, length, k continuations, greedy, seeds, log-probabilities."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest_models import tiny_causal_lm  # noqa: E402
from itscale.lm import HFGenerator  # noqa: E402
from itscale.types import Problem, SamplingParams, Step, StepRequest  # noqa: E402

P1 = Problem("p1", "3+4*2=")
P2 = Problem("p2", "Compute 17-5*3 step by step.")


def params(seed=0, temperature=1.0, max_tokens=40, top_p=1.0):
    return SamplingParams(temperature=temperature, top_p=top_p, max_step_tokens=max_tokens, seed=seed)


def gen(model, tok, **kw):
    return HFGenerator(model, tok, run_in_thread=False, **kw)


def full_ids(g: HFGenerator, problem: Problem, steps: tuple[Step, ...], step: Step) -> tuple[list[int], int]:
    """Teacher-forcing ids (context + generated step, EOS included) and where the step starts."""
    text = g.context_text(problem.prompt, "".join(s.text for s in steps))
    ctx = g.tokenizer.encode(text, add_special_tokens=False)
    new = g.tokenizer.encode(step.text, add_special_tokens=False)
    if step.finish_reason == "eos":
        new.append(g.tokenizer.eos_token_id)
    return ctx + new, len(ctx)


def teacher_forced_logprob(model, ids: list[int], start: int) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].to(torch.float64)
    lp = torch.log_softmax(logits, dim=-1)
    return float(sum(lp[i - 1, ids[i]] for i in range(start, len(ids))))


def test_steps_end_right_after_the_stop_string(char_tokenizer, tiny_lm):
    g = gen(tiny_lm, char_tokenizer)
    (steps,) = g.generate_steps_sync([StepRequest(P1, (), 16, params(1), ("\n",))])
    stopped = [s for s in steps if s.finish_reason == "stop"]
    assert len(stopped) >= 8
    for s in stopped:
        assert s.text.endswith("\n") and s.text.count("\n") == 1
        assert s.tokens == len(s.text)  # character-level: one token per character
    # several stop strings: the continuation ends at the first one to appear
    (steps,) = g.generate_steps_sync([StepRequest(P1, (), 16, params(2), ("\n", "a", "e", "1"))])
    for s in steps:
        if s.finish_reason == "stop":
            hits = [s.text.find(x) for x in ("\n", "a", "e", "1") if x in s.text]
            assert min(hits) == len(s.text) - 1 and sum(s.text.count(x) for x in "\nae1") == 1


def test_eos_and_length_finish_reasons(char_tokenizer):
    eosy = tiny_causal_lm(char_tokenizer, seed=0, biases={"<|end|>": 5.0})
    g = gen(eosy, char_tokenizer)
    (steps,) = g.generate_steps_sync([StepRequest(P1, (), 8, params(3, max_tokens=50), ())])
    eos = [s for s in steps if s.finish_reason == "eos"]
    assert len(eos) >= 6
    for s in eos:
        assert "<|end|>" not in s.text and s.tokens == len(s.text) + 1  # EOS counted, not in the text
    never = tiny_causal_lm(char_tokenizer, seed=0, biases={"<|end|>": -50.0})
    g = gen(never, char_tokenizer)
    (steps,) = g.generate_steps_sync([StepRequest(P1, (), 3, params(4, max_tokens=7), ("\n\n\n",))])
    for s in steps:
        assert s.finish_reason == "length" and s.tokens == 7 and len(s.text) == 7


def test_k_continuations_per_request_and_prompt_accounting(char_tokenizer, tiny_lm):
    g = gen(tiny_lm, char_tokenizer, max_batch=4)
    first = g.generate_steps_sync([StepRequest(P1, (), 1, params(5), ("\n",))])[0][0]
    reqs = [
        StepRequest(P1, (), 3, params(6), ("\n",)),
        StepRequest(P2, (), 1, params(7), ("\n",)),
        StepRequest(P1, (first,), 5, params(8), ("\n",)),
    ]
    out = g.generate_steps_sync(reqs)
    assert [len(o) for o in out] == [3, 1, 5]
    for req, steps in zip(reqs, out):
        n_ctx = len(char_tokenizer.encode(g.context_text(req.problem.prompt, req.prefix), add_special_tokens=False))
        assert steps[0].prompt_tokens == n_ctx
        assert all(s.prompt_tokens == 0 and s.prefilled_tokens == 0 for s in steps[1:])
    assert out[0][0].prefilled_tokens == 0  # P1's prompt was cached by the first call
    assert out[1][0].prefilled_tokens == out[1][0].prompt_tokens  # P2 is new
    assert out[2][0].prefilled_tokens == 0  # continues right after a generated step
    assert g.stats.rows == 10 and g.stats.calls == 2


def test_temperature_zero_is_the_argmax_loop(char_tokenizer):
    tiny_lm = tiny_causal_lm(char_tokenizer, seed=1, biases={})  # greedy text that does not collapse at once
    g = gen(tiny_lm, char_tokenizer)
    (steps,) = g.generate_steps_sync([StepRequest(P2, (), 2, params(0, temperature=0.0, max_tokens=30), ())])
    assert steps[0].text == steps[1].text and abs(steps[0].logprob - steps[1].logprob) < 1e-6
    ids = char_tokenizer.encode(g.context_text(P2.prompt), add_special_tokens=False)
    text, logprob = "", 0.0
    with torch.no_grad():
        for _ in range(30):
            logits = tiny_lm(torch.tensor([ids])).logits[0, -1].to(torch.float64)
            tok = int(torch.argmax(logits))
            logprob += float(torch.log_softmax(logits, -1)[tok])
            if tok == char_tokenizer.eos_token_id:
                break
            ids.append(tok)
            text += char_tokenizer.decode([tok])
    assert steps[0].text == text and steps[0].tokens >= 10
    assert abs(steps[0].logprob - logprob) < 1e-4


def test_seeds_determine_samples(char_tokenizer, tiny_lm):
    g = gen(tiny_lm, char_tokenizer)
    req = StepRequest(P1, (), 4, params(11, max_tokens=20), ())
    a = g.generate_steps_sync([req])[0]
    b = gen(tiny_lm, char_tokenizer).generate_steps_sync([req])[0]
    assert [s.text for s in a] == [s.text for s in b]
    c = g.generate_steps_sync([StepRequest(P1, (), 4, params(12, max_tokens=20), ())])[0]
    assert [s.text for s in a] != [s.text for s in c]
    assert len({s.text for s in a}) > 1  # continuations of one request differ too


def test_results_do_not_depend_on_batch_composition(char_tokenizer, tiny_lm):
    req = StepRequest(P2, (), 3, params(21, max_tokens=25), ("\n",))
    alone = gen(tiny_lm, char_tokenizer, reuse_cache=False).generate_steps_sync([req])[0]
    others = [StepRequest(P1, (), 4, params(s, max_tokens=25), ("\n",)) for s in (1, 2)]
    g = gen(tiny_lm, char_tokenizer, reuse_cache=False, max_batch=5)
    mixed = g.generate_steps_sync([others[0], req, others[1]])[1]
    assert [s.text for s in alone] == [s.text for s in mixed]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(alone, mixed)) < 1e-4


def test_logprobs_match_teacher_forcing(char_tokenizer, tiny_lm):
    g = gen(tiny_lm, char_tokenizer)
    errors = []
    steps: tuple[Step, ...] = ()
    for round_ in range(3):
        out = g.generate_steps_sync([StepRequest(P1, steps, 4, params(30 + round_), ("\n",))])[0]
        for s in out:
            ids, start = full_ids(g, P1, steps, s)
            errors.append(abs(teacher_forced_logprob(tiny_lm, ids, start) - s.logprob))
        nxt = next((s for s in out if s.finish_reason != "eos"), None)
        if nxt is None:
            break
        steps = steps + (nxt,)
    assert len(errors) >= 8 and max(errors) < 1e-4


def test_top_p_keeps_samples_in_the_nucleus(char_tokenizer, tiny_lm):
    g = gen(tiny_lm, char_tokenizer)
    (steps,) = g.generate_steps_sync([StepRequest(P1, (), 16, params(40, max_tokens=1, top_p=0.3), ())])
    ids = char_tokenizer.encode(g.context_text(P1.prompt), add_special_tokens=False)
    with torch.no_grad():
        probs = torch.softmax(tiny_lm(torch.tensor([ids])).logits[0, -1].double(), -1)
    order = torch.argsort(probs, descending=True, stable=True)
    mass, nucleus = 0.0, set()
    for tok in order.tolist():
        nucleus.add("" if tok == char_tokenizer.eos_token_id else char_tokenizer.decode([tok]))
        mass += float(probs[tok])
        if mass >= 0.3:
            break
    assert {s.text for s in steps} <= nucleus
    assert all(math.isfinite(s.logprob) for s in steps)


def test_generation_stops_at_the_models_last_position(char_tokenizer):
    model = tiny_causal_lm(char_tokenizer, seed=0, biases={"<|end|>": -50.0}, max_position_embeddings=40)
    g = gen(model, char_tokenizer)
    (steps,) = g.generate_steps_sync([StepRequest(P1, (), 2, params(1, max_tokens=100), ())])
    room = 40 - steps[0].prompt_tokens
    assert all(s.finish_reason == "length" and s.tokens == room for s in steps)
    (more,) = g.generate_steps_sync([StepRequest(P1, (steps[0],), 2, params(2), ())])
    assert all(s.failed and "40 positions" in s.error for s in more)
