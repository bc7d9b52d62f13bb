"""Hugging Face PRMs: scores equal a direct forward pass; cached prefixes are never re-scored."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest_models import make_tokenizer, tiny_causal_lm, tiny_token_classifier  # noqa: E402
from itscale.rewards import HFClassifierPRM, HFTagPRM  # noqa: E402
from itscale.rewards.formats import TagFormat  # noqa: E402
from itscale.types import Problem, ScoreRequest  # noqa: E402

P1, P2 = Problem("p1", "3+4*2="), Problem("p2", "Compute 17-5*3.")
STEPS = ("4*2=8\n", "3+8=11\n", "Answer: 11")
FORMAT = TagFormat()


@pytest.fixture(scope="module")
def char_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def prm_model(char_tokenizer):
    # make good/bad depend on the text: a bias keeps scores away from 0.5 on average
    return tiny_causal_lm(char_tokenizer, seed=7, biases={"+": 1.0})


def direct_tag_scores(model, tok, problem: Problem, steps, fmt=FORMAT, delimiter="\n") -> list[float]:
    """Render the text, tokenize it whole, one forward pass, read every tag position."""
    text = tok.apply_chat_template([{"role": "user", "content": problem.prompt}], tokenize=False,
                                   add_generation_prompt=True) + fmt.render_steps(steps, delimiter)
    ids = tok.encode(text, add_special_tokens=False)
    tag, good, bad = (tok.convert_tokens_to_ids(x) for x in (fmt.tag, fmt.good, fmt.bad))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].to(torch.float64)
    probs = [torch.softmax(logits[i, [good, bad]], -1)[0].item() for i, t in enumerate(ids) if t == tag]
    assert len(probs) == len(steps)
    return probs


def requests():
    return [
        ScoreRequest(P1, STEPS),
        ScoreRequest(P1, STEPS[:1]),
        ScoreRequest(P2, ("17-15=2\n", "Answer: 2\n")),
        ScoreRequest(P1, ("4*2=9\n", "3+9=12\n")),
        ScoreRequest(P1, STEPS),  # a duplicate (a resampled copy)
        ScoreRequest(P2, ()),
    ]


def test_tag_prm_matches_a_direct_forward_pass(char_tokenizer, prm_model, report_statistic):
    worst = 0.0
    for reuse in (True, False):
        prm = HFTagPRM(prm_model, char_tokenizer, reuse_cache=reuse, run_in_thread=False, max_batch=4)
        for _ in range(2):  # the second time from the cache
            out = prm.score_steps_sync(requests())
            for req, got in zip(requests(), out):
                want = direct_tag_scores(prm_model, char_tokenizer, req.problem, req.steps) if req.steps else []
                assert len(got.scores) == len(req.steps)
                worst = max([worst] + [abs(a - b) for a, b in zip(got.scores, want)])
    report_statistic("tag PRM", "max |Δ score|", worst, "< 1e-5")
    assert worst < 1e-5
    assert 0 < min(out[0].scores) and max(out[0].scores) < 1


def test_tag_prm_never_rescores_a_cached_prefix(char_tokenizer, prm_model):
    prm = HFTagPRM(prm_model, char_tokenizer, run_in_thread=False)
    prompt_tokens = len(prm.prompt(P1.prompt)[1])
    step_tokens = [len(prm.encoder.step(s)[0]) for s in STEPS]

    (first,) = prm.score_steps_sync([ScoreRequest(P1, STEPS[:2])])
    assert first.tokens == prompt_tokens + step_tokens[0] + step_tokens[1]
    # extending the prefix by one step runs only that step's tokens
    (second,) = prm.score_steps_sync([ScoreRequest(P1, STEPS)])
    assert second.tokens == step_tokens[2]
    assert second.scores[:2] == first.scores
    assert prm.stats.cached_steps == 2 and prm.stats.scored_steps == 3
    # a fully cached request costs no forward pass at all
    passes = prm.stats.forward_passes
    out = prm.score_steps_sync([ScoreRequest(P1, STEPS[:1]), ScoreRequest(P1, STEPS), ScoreRequest(P1, STEPS)])
    assert prm.stats.forward_passes == passes and [o.tokens for o in out] == [0, 0, 0]
    # many new particles of one new problem: its prompt is read once, each step once
    new = [ScoreRequest(P2, (f"{i}+1={i + 1}\n",)) for i in range(5)]
    out = prm.score_steps_sync(new)
    p2_prompt = len(prm.prompt(P2.prompt)[1])
    expected = p2_prompt + sum(len(prm.encoder.step(r.steps[0])[0]) for r in new)
    assert sum(o.tokens for o in out) == expected == prm.stats.tokens - (first.tokens + second.tokens)
    # the baseline reads everything every time
    base = HFTagPRM(prm_model, char_tokenizer, reuse_cache=False, run_in_thread=False)
    base.score_steps_sync([ScoreRequest(P1, STEPS[:2])])
    (again,) = base.score_steps_sync([ScoreRequest(P1, STEPS)])
    assert again.tokens == prompt_tokens + sum(step_tokens)


def test_tag_prm_cache_is_bounded(char_tokenizer, prm_model):
    prm = HFTagPRM(prm_model, char_tokenizer, run_in_thread=False, cache_tokens=50)
    for i in range(6):
        (got,) = prm.score_steps_sync([ScoreRequest(P1, (f"{i}*2={2 * i}\n", "x\n"))])
        want = direct_tag_scores(prm_model, char_tokenizer, P1, (f"{i}*2={2 * i}\n", "x\n"))
        assert max(abs(a - b) for a, b in zip(got.scores, want)) < 1e-5
        assert prm.store.tokens <= 50


def test_tag_prm_checks_its_format_tokens(char_tokenizer, prm_model):
    with pytest.raises(ValueError, match="single token"):
        HFTagPRM(prm_model, char_tokenizer, format=TagFormat(tag="ки"), run_in_thread=False)


def test_classifier_prm_matches_a_direct_forward_pass(char_tokenizer):
    model = tiny_token_classifier(char_tokenizer, seed=3)
    prm = HFClassifierPRM(model, char_tokenizer, separator_token="§", positive_label=1, run_in_thread=False, max_batch=2)
    sep = char_tokenizer.convert_tokens_to_ids("§")
    out = prm.score_steps_sync(requests())
    worst = 0.0
    for req, got in zip(requests(), out):
        text = char_tokenizer.apply_chat_template([{"role": "user", "content": req.problem.prompt}], tokenize=False,
                                                  add_generation_prompt=True)
        text += "".join(TagFormat.strip(s, "\n") + "§" for s in req.steps)
        ids = char_tokenizer.encode(text, add_special_tokens=False)
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([ids])).logits[0].double(), -1)[:, 1]
        want = [probs[i].item() for i, t in enumerate(ids) if t == sep]
        assert len(got.scores) == len(want) == len(req.steps)
        worst = max([worst] + [abs(a - b) for a, b in zip(got.scores, want)])
    assert worst < 1e-5
    # cached prefixes: a request whose every prefix was scored needs no forward pass
    passes = prm.stats.forward_passes
    again = prm.score_steps_sync([ScoreRequest(P1, STEPS[:2]), ScoreRequest(P1, STEPS)])
    assert prm.stats.forward_passes == passes and [a.tokens for a in again] == [0, 0]
    assert again[1].scores == out[0].scores
    assert out[4].tokens == 0 and out[0].tokens == len(prm.input_ids(requests()[0])[0])
    with pytest.raises(ValueError, match="positive_label"):
        HFClassifierPRM(model, char_tokenizer, separator_token="§", positive_label=2)
