"""KV-cache reuse: the same tokens and log-probabilities as recomputing, far fewer prefilled tokens."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest_models import make_tokenizer, tiny_causal_lm  # noqa: E402
from itscale.lm import HFGenerator  # noqa: E402
from itscale.types import Particle, Problem, SamplingParams, Step, StepRequest  # noqa: E402

PROBLEMS = [Problem("a", "3+4*2="), Problem("b", "Compute 17-5*3 step by step."), Problem("c", "9*9-1")]


def gen(model, tok, **kw):
    return HFGenerator(model, tok, run_in_thread=False, **kw)


def requests_for(particles: list[Particle], seed: int, stop=("\n",), max_tokens=24) -> list[StepRequest]:
    """Group copies of one particle into one k>1 request, like RunContext.propose."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(particles):
        groups.setdefault(id(p), []).append(i)
    return [
        StepRequest(particles[idx[0]].problem, particles[idx[0]].steps, len(idx),
                    SamplingParams(temperature=1.0, max_step_tokens=max_tokens, seed=seed * 1000 + n), stop)
        for n, idx in enumerate(groups.values())
    ]


def run_rounds(reuse: HFGenerator, plain: HFGenerator, rounds: int, n: int, seed: int, foreign_round: int | None = None):
    """A particle filter with random resampling; each round goes to both generators.

    Returns the largest log-probability difference, the number of texts compared, and
    the number of prompt tokens the reuse generator should have prefilled exactly.
    """
    rng = np.random.default_rng(seed)
    particles = [Particle(p) for p in PROBLEMS for _ in range(n)]
    expected_prefill, worst, compared = 0, 0.0, 0
    seen_prompts: set[str] = set()
    for r in range(rounds):
        live = [p for p in particles if not p.finished]
        if not live:
            break
        if r == foreign_round:  # steps written by someone else: their text must be prefilled
            live = [Particle(p.problem, p.steps + (Step(f"{i}+1={i + 1}\n"),)) if i % 2 == 0 else p
                    for i, p in enumerate(live)]
        reqs = requests_for(live, seed=100 * seed + r)
        for req in reqs:
            if not req.steps and req.problem.prompt not in seen_prompts:
                seen_prompts.add(req.problem.prompt)
                expected_prefill += len(reuse.tokenizer.encode(reuse.context_text(req.problem.prompt), add_special_tokens=False))
            if req.steps and req.steps[-1].tokens == 0:  # the foreign step
                expected_prefill += len(reuse.tokenizer.encode(req.steps[-1].text, add_special_tokens=False))
        a = reuse.generate_steps_sync(reqs)
        b = plain.generate_steps_sync(reqs)
        for req, xs, ys in zip(reqs, a, b):
            assert [x.text for x in xs] == [y.text for y in ys]
            assert [x.finish_reason for x in xs] == [y.finish_reason for y in ys]
            assert [x.tokens for x in xs] == [y.tokens for y in ys]
            assert xs[0].prompt_tokens == ys[0].prompt_tokens
            worst = max([worst] + [abs(x.logprob - y.logprob) for x, y in zip(xs, ys)])
            compared += len(xs)
        # extend, then resample: some particles continue twice, others are dropped
        children = [Particle(req.problem, req.steps + (s,), s.finish_reason == "eos") for req, xs in zip(reqs, a) for s in xs]
        by_problem = {p.id: [c for c in children if c.problem.id == p.id] for p in PROBLEMS}
        particles = []
        for kids in by_problem.values():
            if kids:
                particles += [kids[i] for i in rng.integers(len(kids), size=n)]
    return worst, compared, expected_prefill


def test_reuse_equals_recomputation_over_resampling_rounds(char_tokenizer, tiny_lm, report_statistic):
    reuse, plain = gen(tiny_lm, char_tokenizer), gen(tiny_lm, char_tokenizer, reuse_cache=False)
    worst, compared, expected = run_rounds(reuse, plain, rounds=5, n=6, seed=1, foreign_round=2)
    report_statistic("reuse", "max |Δ logprob|", worst, "< 1e-4")
    assert compared >= 60 and worst < 1e-4
    # exact accounting: with reuse only the uncovered text (prompts, foreign steps) is prefilled
    assert reuse.stats.prefilled_tokens == expected
    assert plain.stats.prefilled_tokens == plain.stats.prompt_tokens == reuse.stats.prompt_tokens
    assert reuse.stats.prefilled_tokens < plain.stats.prefilled_tokens / 5
    assert reuse.capabilities.prefix_cache and not plain.capabilities.prefix_cache


def test_reuse_is_correct_under_eviction(char_tokenizer, tiny_lm):
    small = gen(tiny_lm, char_tokenizer, cache_tokens=60)
    plain = gen(tiny_lm, char_tokenizer, reuse_cache=False)
    worst, compared, _ = run_rounds(small, plain, rounds=4, n=4, seed=2)
    assert compared >= 30 and worst < 1e-4
    assert small.store.tokens <= small.store.size <= 60
    assert 0 < small.stats.prefilled_tokens < plain.stats.prefilled_tokens


def test_continuing_a_generated_step_prefills_nothing(char_tokenizer, tiny_lm):
    g = gen(tiny_lm, char_tokenizer)
    p = PROBLEMS[0]
    params = SamplingParams(temperature=1.0, max_step_tokens=30, seed=5)
    (steps,) = g.generate_steps_sync([StepRequest(p, (), 3, params, ("\n",))])
    assert steps[0].prefilled_tokens == steps[0].prompt_tokens > 0
    forwards = g.stats.forward_passes
    out = g.generate_steps_sync([StepRequest(p, (s,), 2, params, ("\n",)) for s in steps if s.finish_reason != "eos"])
    assert all(o[0].prefilled_tokens == 0 for o in out)
    assert g.stats.cache_hits == len(out)
    # no prefill pass: only the decode steps ran
    assert g.stats.forward_passes - forwards == max(o.tokens for os_ in out for o in os_)


def test_stop_inside_a_multi_character_token(tmp_path):
    """A token '.\nA' crosses the stop '\n': the step ends at '.\n' and carries 'A'; the next
    step begins with 'A' and continues from the cached states after the whole token (nothing
    prefilled), giving what recomputation from the text gives."""
    tok = make_tokenizer()
    tok.add_tokens([".\nA"])
    model = tiny_causal_lm(tok, seed=4, biases={".\nA": 4.0, "\n": -30.0, "<|end|>": -30.0})
    reuse, plain = gen(model, tok), gen(model, tok, reuse_cache=False)
    p = PROBLEMS[1]
    req = StepRequest(p, (), 8, SamplingParams(temperature=1.0, max_step_tokens=40, seed=3), ("\n",))
    (a,), (b,) = reuse.generate_steps_sync([req]), plain.generate_steps_sync([req])
    assert [(s.text, s.carry) for s in a] == [(s.text, s.carry) for s in b]
    stopped = [s for s in a if s.finish_reason == "stop"]
    assert stopped and all(s.text.endswith(".\n") and s.carry == "A" for s in stopped)
    assert all(s.tokens == len(s.text) - 1 for s in stopped)  # '.\nA' is one token, its 'A' carried
    before = reuse.stats.prefilled_tokens
    nxt = [StepRequest(p, (s,), 1, SamplingParams(temperature=1.0, max_step_tokens=10, seed=9), ("\n",)) for s in stopped]
    xs, ys = reuse.generate_steps_sync(nxt), plain.generate_steps_sync(nxt)
    assert all(x[0].text.startswith("A") for x in xs)  # the rest of the token begins the next step
    assert [x[0].text for x in xs] == [y[0].text for y in ys]
    assert max(abs(x[0].logprob - y[0].logprob) for x, y in zip(xs, ys)) < 1e-4
    assert reuse.stats.prefilled_tokens == before  # every continuation resumed after the whole token


def test_a_carry_that_holds_the_stop_string_is_a_step_of_its_own():
    """'.\n\n' as one token with the stop '\n': the step ends at the first '\n' and carries '\n', which
    is a whole step by itself (no token generated); the step after it goes on from the cached states."""
    tok = make_tokenizer()
    tok.add_tokens([".\n\n"])
    model = tiny_causal_lm(tok, seed=4, biases={".\n\n": 4.0, "\n": -30.0, "<|end|>": -30.0})
    g = gen(model, tok)
    p, params = PROBLEMS[1], SamplingParams(temperature=1.0, max_step_tokens=40, seed=3)
    (first,) = g.generate_steps_sync([StepRequest(p, (), 1, params, ("\n",))])[0]
    assert first.text.endswith(".\n") and first.carry == "\n"
    (blank,) = g.generate_steps_sync([StepRequest(p, (first,), 1, params, ("\n",))])[0]
    assert (blank.text, blank.carry, blank.tokens, blank.finish_reason) == ("\n", "", 0, "stop")
    before = g.stats.prefilled_tokens
    (third,) = g.generate_steps_sync([StepRequest(p, (first, blank), 1, params, ("\n",))])[0]
    assert third.tokens > 0 and g.stats.prefilled_tokens == before


@pytest.mark.slow
def test_reuse_equals_recomputation_on_a_larger_model(char_tokenizer):
    """The same check on a model of the embedded pair's size (~1M parameters), more particles."""
    model = tiny_causal_lm(char_tokenizer, seed=5, biases={"\n": 2.0, "<|end|>": -1.0}, hidden_size=128,
                           intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    reuse, plain = gen(model, char_tokenizer, max_batch=16), gen(model, char_tokenizer, reuse_cache=False)
    worst, compared, expected = run_rounds(reuse, plain, rounds=6, n=12, seed=3, foreign_round=3)
    assert compared >= 150 and worst < 1e-4
    assert reuse.stats.prefilled_tokens == expected
