"""The LLM judge: its question, its verdict p(yes)/(p(yes)+p(no)) against a direct forward pass,
its prefix cache, the same scores over HTTP, and errors that name the setting."""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
pytest.importorskip("transformers")

from conftest_models import make_tokenizer, save_model, tiny_causal_lm  # noqa: E402
from .test_remote_prm import NextTokenServer, pool  # noqa: E402

import itscale  # noqa: E402
from itscale.rewards import HFJudgePRM, RemoteJudgePRM  # noqa: E402
from itscale.rewards.judge import DEFAULT_TEMPLATE, JudgePrompt, load_template  # noqa: E402
from itscale.testing.contracts import PRMContract  # noqa: E402
from itscale.types import Problem, ScoreRequest  # noqa: E402

P1, P2 = Problem("p1", "3+4*2="), Problem("p2", "Compute 17-5*3.")
STEPS = ("4*2=8\n\n", "3+8=11\n\n", "Answer: 11")
TEMPLATE = "Q: {question}\nSo far:\n{previous_steps}\nStep: {step}\nRight? Y or N."


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def judge_model(tok):
    return tiny_causal_lm(tok, seed=11, biases={"Y": 1.0, "N": 1.0, "y": 0.5})


def requests():
    return [ScoreRequest(P1, STEPS), ScoreRequest(P1, STEPS[:1]), ScoreRequest(P2, ("17-15=2\n\n", "Answer: 2")),
            ScoreRequest(P1, ("4*2=9\n\n", "3+9=12\n\n")), ScoreRequest(P1, STEPS), ScoreRequest(P2, ())]


def direct_verdict(model, tok, problem: Problem, steps, t: int) -> float:
    """Written out from the definition: the chat turn about step t, one forward pass, the
    probability of every single-token spelling of Y and of N (here Y, y and N, n)."""
    previous = "\n".join(s.strip() for s in steps[:t]) or "(none)"
    question = TEMPLATE.format(question=problem.prompt, previous_steps=previous, step=steps[t].strip())
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([tok.encode(text, add_special_tokens=False)])).logits[0, -1].double(), -1)
    yes = sum(p[tok.convert_tokens_to_ids(c)] for c in "Yy")
    no = sum(p[tok.convert_tokens_to_ids(c)] for c in "Nn")
    return float(yes / (yes + no))


def test_the_verdict_is_p_yes_over_p_yes_plus_no_of_the_question_about_each_step(tok, judge_model):
    judge = HFJudgePRM(judge_model, tok, template=TEMPLATE, yes="Y", no="N", run_in_thread=False, max_batch=3)
    assert judge.yes_ids == sorted(tok.convert_tokens_to_ids(list("Yy")))  # " Y" is two tokens here: not a spelling
    out = judge.score_steps_sync(requests())
    for req, got in zip(requests(), out):
        want = [direct_verdict(judge_model, tok, req.problem, req.steps, t) for t in range(len(req.steps))]
        assert got.scores == pytest.approx(want, abs=1e-6)  # left-padded batches vs one row alone
    assert len({round(s, 6) for r in out for s in r.scores}) > 4  # the verdict depends on the step


def test_each_step_is_judged_once_and_a_copy_costs_nothing(tok, judge_model):
    judge = HFJudgePRM(judge_model, tok, template=TEMPLATE, yes="Y", no="N", run_in_thread=False)
    first = judge.score_steps_sync([ScoreRequest(P1, STEPS[:2]), ScoreRequest(P1, STEPS[:2])])
    assert judge.stats.sequences == 2 and first[0].tokens > 0 and first[1].tokens == 0  # the copy shares the work
    longer = judge.score_steps_sync([ScoreRequest(P1, STEPS)])[0]
    assert judge.stats.sequences == 3 and judge.stats.cached_steps == 2  # only the new step is asked about
    assert longer.scores[:2] == first[0].scores
    again = judge.score_steps_sync([ScoreRequest(P1, STEPS)])[0]
    assert again.tokens == 0 and again.scores == longer.scores
    other = judge.score_steps_sync([ScoreRequest(P1, STEPS, cache_namespace="alice")])[0]
    assert other.tokens > 0 and other.scores == pytest.approx(longer.scores)  # another namespace reads its own


def test_the_remote_judge_sends_the_same_questions_and_gets_the_same_verdicts(tok, judge_model):
    hf = HFJudgePRM(judge_model, tok, template=TEMPLATE, yes="Y", no="N", run_in_thread=False)
    server = NextTokenServer(judge_model, tok)
    remote = RemoteJudgePRM(pool(server), "judge", tokenizer=tok, template=TEMPLATE, yes="Y", no="N",
                            top_logprobs=len(tok))
    got = asyncio.run(remote.score_steps(requests()))
    want = hf.score_steps_sync(requests())
    for g, w in zip(got, want):
        assert g.scores == pytest.approx(w.scores, abs=1e-6)
        assert g.tokens == w.tokens  # the same questions, counted with the same tokenizer
    (body,) = server.bodies
    assert body["prompt"][0] == hf.prompt.text(requests()[0], 0)[0] and body["max_tokens"] == 1
    assert len(body["prompt"]) == 3 + 2 + 2  # every distinct step once


def test_a_judge_that_never_answers_yes_or_no_in_its_top_k_kills_the_step_and_says_why(tok, judge_model):
    remote = RemoteJudgePRM(pool(NextTokenServer(judge_model, tok)), "judge", tokenizer=tok, template=TEMPLATE,
                            yes="Y", no="N", top_logprobs=1)
    out = asyncio.run(remote.score_steps([ScoreRequest(P1, STEPS)]))[0].scores
    top = {tok.decode([int(torch.argmax(judge_model(torch.tensor([ids])).logits[0, -1]))])
           for ids in (tok.encode(remote.prompt.text(ScoreRequest(P1, STEPS), t)[0], add_special_tokens=False)
                       for t in range(3))}
    if top & set("YyNn"):
        pytest.fail(f"the fixture's judge answers {top} first; choose a seed where it does not")
    assert all(s != s for s in out)  # NaN
    assert "as the judge's first answer token" in remote.stats.last_error and "'Y'" in remote.stats.last_error


def test_the_default_template_and_the_question_it_asks():
    tok = make_tokenizer()
    prompt = JudgePrompt(tok, delimiter="\n\n")
    q = prompt.question("What is 2+3?", ("2+3=5\n\n", "Answer: 5"), 1)
    assert prompt.template == DEFAULT_TEMPLATE
    assert "Problem: What is 2+3?" in q and "Earlier steps:\n2+3=5\n" in q and "Latest step:\nAnswer: 5" in q
    assert "Earlier steps:\n(none)" in prompt.question("What is 2+3?", ("2+3=5\n\n",), 0)


@pytest.mark.parametrize("template, message", [
    ("Is {stepp} right?", "neither a template"),
    ("{question} {step} {answer}", "unknown field(s) ['answer']"),
    ("{question {step}", "not a format string"),
])
def test_a_bad_template_is_refused_naming_the_field(template, message):
    with pytest.raises(ValueError, match="template: ") as err:
        load_template(template)
    assert message in str(err.value)


def test_a_template_may_be_a_file(tmp_path):
    path = tmp_path / "judge.txt"
    path.write_text("Step: {step}\nOK?", encoding="utf-8")
    assert load_template(str(path)) == "Step: {step}\nOK?"
    path.write_text("no field", encoding="utf-8")
    with pytest.raises(ValueError, match=r"must contain \{step\}"):
        load_template(str(path))


def test_load_prm_makes_a_judge_from_a_spec_and_names_bad_settings(tmp_path, tok, judge_model):
    folder = save_model(judge_model, tok, tmp_path / "judge")
    judge = itscale.load_prm(str(folder), kind="judge", template=TEMPLATE, good_token="Y", bad_token="N",
                             device="cpu", delimiter="\n\n")
    assert isinstance(judge, HFJudgePRM)
    assert judge.score_steps_sync([ScoreRequest(P1, STEPS)])[0].scores == pytest.approx(
        [direct_verdict(judge.model, tok, P1, STEPS, t) for t in range(3)], abs=1e-6)  # (saving drops the bias)
    with pytest.raises(ValueError, match=r"prm.good_token: yes 'Yes' is not a single token"):
        itscale.load_prm(str(folder), kind="judge", good_token="Yes", device="cpu")
    with pytest.raises(ValueError, match="template: only a judge"):
        itscale.load_prm(str(folder), kind="tag", template=TEMPLATE)
    with pytest.raises(ValueError, match="neither a template"):
        itscale.load_prm(str(folder), kind="judge", template="missing.txt")
    with pytest.raises(ValueError, match="share a token"):
        itscale.load_prm(str(folder), kind="judge", good_token="Y", bad_token="y", device="cpu")


class TestJudgeContract(PRMContract):
    @pytest.fixture
    def prm(self, tok, judge_model):
        return HFJudgePRM(judge_model, tok, template=TEMPLATE, yes="Y", no="N")


class TestRemoteJudgeContract(PRMContract):
    @pytest.fixture
    def prm(self, tok, judge_model):
        return RemoteJudgePRM(pool(NextTokenServer(judge_model, tok)), "judge", tokenizer=tok, template=TEMPLATE,
                              yes="Y", no="N", top_logprobs=len(tok))
