"""Remote PRMs against mocked vLLM-shaped replies: the text sent, the positions read, the scores."""

from __future__ import annotations

import asyncio
import json
import math
import random

import pytest

httpx = pytest.importorskip("httpx")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest_models import make_tokenizer, tiny_causal_lm, tiny_token_classifier  # noqa: E402
from itscale.lm.http import EndpointPool  # noqa: E402
from itscale.rewards import HFClassifierPRM, HFTagPRM, RemoteRewardPRM, RemoteTagPRM  # noqa: E402
from itscale.rewards.formats import EMBEDDED_TAG_FORMAT  # noqa: E402
from itscale.rewards.remote import tag_score  # noqa: E402
from itscale.types import Problem, ScoreRequest  # noqa: E402

URL = "http://prm:8000/v1"
P1, P2 = Problem("p1", "3+4*2="), Problem("p2", "Compute 17-5*3.")
STEPS = ("4*2=8\n", "3+8=11\n", "Answer: 11")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def prm_model(tok):
    return tiny_causal_lm(tok, seed=7, biases={"+": 1.0})


def pool(handler, **kw):
    kw.setdefault("backoff_base", 0.001)
    return EndpointPool(URL, transport=httpx.MockTransport(handler), rng=random.Random(0), **kw)


class NextTokenServer:
    """A fake vLLM ``/v1/completions`` with ``max_tokens=1, logprobs=k`` over a list of prompts,
    computed by a real (tiny) model: each choice's ``top_logprobs[0]`` is the top-k next-token
    log-probabilities after its prompt."""

    def __init__(self, model, tokenizer):
        self.model, self.tok = model, tokenizer
        self.bodies: list[dict] = []

    def __call__(self, req: httpx.Request) -> httpx.Response:
        body = json.loads(req.content)
        self.bodies.append(body)
        choices, prompt_tokens = [], 0
        for i, prompt in enumerate(body["prompt"]):
            ids = self.tok.encode(prompt, add_special_tokens=body.get("add_special_tokens", True))
            prompt_tokens += len(ids)
            with torch.no_grad():
                logprobs = torch.log_softmax(self.model(torch.tensor([ids])).logits[0, -1].double(), -1)
            values, index = logprobs.topk(body["logprobs"])
            top = {self.tok.decode([int(j)]): float(v) for v, j in zip(values, index)}
            token = self.tok.decode([int(index[0])])
            choices.append({"index": i, "text": token, "finish_reason": "length", "stop_reason": None,
                            "logprobs": {"tokens": [token], "token_logprobs": [float(values[0])],
                                         "top_logprobs": [top], "text_offset": [len(prompt)]}})
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(choices)}
        return httpx.Response(200, json={"id": "cmpl-x", "object": "text_completion", "model": "prm",
                                         "choices": choices, "usage": usage})


def requests():
    return [ScoreRequest(P1, STEPS), ScoreRequest(P1, STEPS[:1]), ScoreRequest(P2, ("17-15=2\n", "Answer: 2\n")),
            ScoreRequest(P1, ("4*2=9\n", "3+9=12\n")), ScoreRequest(P1, STEPS), ScoreRequest(P2, ())]


def test_the_text_sent_is_what_hf_tag_prm_scores(tok, prm_model):
    hf = HFTagPRM(prm_model, tok, run_in_thread=False)
    remote = RemoteTagPRM(pool(NextTokenServer(prm_model, tok)), "prm", tokenizer=tok)
    for req in requests():
        text, ends = remote.text(req)
        assert text == hf.prompt(req.problem.prompt)[0] + EMBEDDED_TAG_FORMAT.render_steps(req.steps, hf.delimiter)
        ids, tags = hf.input_ids(req)
        assert tok.encode(text, add_special_tokens=False) == ids  # the same tokens (character-level tokenizer)
        assert [text[e - 1] for e in ends] == ["§"] * len(req.steps)
        assert [len(tok.decode(ids[: t + 1])) for t in tags] == ends  # each tag ends where HFTagPRM reads it


def test_remote_scores_equal_hf_tag_prm_scores(tok, prm_model):
    hf = HFTagPRM(prm_model, tok, run_in_thread=False, reuse_cache=False)
    server = NextTokenServer(prm_model, tok)
    remote = RemoteTagPRM(pool(server), "prm", tokenizer=tok, top_logprobs=len(tok))  # exact: whole vocabulary
    got = asyncio.run(remote.score_steps(requests()))
    want = hf.score_steps_sync(requests())
    for g, w in zip(got, want):
        assert g.scores == pytest.approx(w.scores, abs=1e-6)  # float32 model, batched vs not
    (body,) = server.bodies  # one merged request: every distinct step prefix once
    assert (body["max_tokens"], body["logprobs"], body["add_special_tokens"], body["temperature"]) == (1, len(tok), False, 0.0)
    text, ends = remote.text(requests()[0])
    assert body["prompt"][:3] == [text[:e] for e in ends]  # the text up to each tag
    assert len(body["prompt"]) == 3 + 2 + 2  # the duplicate request and prefix are sent once, the empty one not at all
    assert got[0].tokens == sum(len(tok.encode(t, add_special_tokens=False)) for t in body["prompt"][:3])
    assert got[1].tokens == got[4].tokens == got[5].tokens == 0
    assert remote.stats.bounded_steps == 0 and remote.stats.http_requests == 1


def test_only_new_steps_are_sent_and_prompts_are_merged_up_to_the_limit(tok, prm_model):
    server = NextTokenServer(prm_model, tok)
    remote = RemoteTagPRM(pool(server), "prm", tokenizer=tok, top_logprobs=len(tok), merge_prompts=2)
    asyncio.run(remote.score_steps([ScoreRequest(P1, STEPS[:2])]))
    assert [len(b["prompt"]) for b in server.bodies] == [2]
    (out,) = asyncio.run(remote.score_steps([ScoreRequest(P1, STEPS)]))  # one new step: one prompt
    assert [len(b["prompt"]) for b in server.bodies] == [2, 1]
    text, ends = remote.text(ScoreRequest(P1, STEPS))
    assert server.bodies[1]["prompt"] == [text[: ends[2]]]
    fresh = RemoteTagPRM(pool(NextTokenServer(prm_model, tok)), "prm", tokenizer=tok, top_logprobs=len(tok))
    (whole,) = asyncio.run(fresh.score_steps([ScoreRequest(P1, STEPS)]))
    assert out.scores == pytest.approx(whole.scores, abs=1e-12)  # incremental = all at once
    asyncio.run(remote.score_steps([ScoreRequest(P2, ("1\n", "2\n", "3\n", "4\n", "5\n"))]))
    assert [len(b["prompt"]) for b in server.bodies] == [2, 1, 2, 2, 1]  # at most merge_prompts per request


def test_scores_read_the_top_logprobs_right_after_each_tag(tok):
    """Hand-made reply: the prompt that ends at each tag gets its own top-k, replies out of order."""
    remote_ref = RemoteTagPRM(pool(lambda r: None), "prm", tokenizer=tok, top_logprobs=3)
    req = ScoreRequest(P1, ("4*2=8\n", "bad=1\n"))
    text, ends = remote_ref.text(req)
    after = {ends[0]: (math.log(0.6), math.log(0.2)), ends[1]: (math.log(0.3), None)}  # step 2: '-' not in top-3

    def handler(r):
        prompts = json.loads(r.content)["prompt"]
        choices = []
        for i, prompt in enumerate(prompts):
            good, bad = after[len(prompt)]
            top = {"+": good, "\n": math.log(0.15), "x": math.log(0.12)}
            if bad is not None:
                top["-"] = bad
            choices.append({"index": i, "text": "x", "finish_reason": "length",
                            "logprobs": {"tokens": ["x"], "token_logprobs": [math.log(0.12)], "top_logprobs": [top]}})
        return httpx.Response(200, json={"choices": choices[::-1], "usage": {"prompt_tokens": 0}})  # any order

    remote = RemoteTagPRM(pool(handler), "prm", tokenizer=tok, top_logprobs=3)
    (out,) = asyncio.run(remote.score_steps([req]))
    assert out.scores[0] == pytest.approx(0.6 / 0.8)
    # '-' missing: bounded by the 3rd largest probability there (0.12): a lower bound on the score
    assert out.scores[1] == pytest.approx(0.3 / (0.3 + 0.12))
    assert remote.stats.bounded_steps == 1
    assert out.tokens == sum(len(tok.encode(text[:e], add_special_tokens=False)) for e in ends)


def test_a_scoring_request_holds_only_the_scoring_fields(tok, prm_model):
    server = NextTokenServer(prm_model, tok)
    remote = RemoteTagPRM(pool(server), "prm", tokenizer=tok, top_logprobs=5, extra_body={"priority": 2})
    asyncio.run(remote.score_steps([ScoreRequest(P1, STEPS[:1])]))
    plain = RemoteTagPRM(pool(server), "prm", tokenizer=tok, top_logprobs=5, extensions=False)
    asyncio.run(plain.score_steps([ScoreRequest(P1, STEPS[:1])]))
    first, second = server.bodies
    assert set(first) == {"model", "prompt", "max_tokens", "temperature", "logprobs", "add_special_tokens", "priority"}
    assert set(second) == {"model", "prompt", "max_tokens", "temperature", "logprobs"}  # standard fields only
    assert plain.extensions is False and remote.http is remote.client.http


def test_tag_score_bounds_and_token_id_keys():
    top = {"+": math.log(0.5), "a": math.log(0.3), "-": math.log(0.1), "b": math.log(0.05)}
    assert tag_score(top, [["+"]], [["-"]], 4) == (pytest.approx(0.5 / 0.6), False)
    assert tag_score({"a": 0.0}, [["+"]], [["-"]], 1)[0] != tag_score({"a": 0.0}, [["+"]], [["-"]], 1)[0]  # NaN
    score, bounded = tag_score({"a": math.log(0.7), "-": math.log(0.2)}, [["+"]], [["-"]], 2)
    assert bounded and score == pytest.approx(0.2 / 0.4)  # good missing: an upper bound
    assert tag_score({"token_id:9": math.log(0.3), "token_id:8": math.log(0.1)}, [["+", "token_id:9"]],
                     [["-", "token_id:8"]], 2)[0] == pytest.approx(0.75)


def test_tag_score_sums_the_tokens_of_a_side_but_not_the_aliases_of_one_token():
    top = {"Yes": math.log(0.3), " Yes": math.log(0.2), "token_id:5": math.log(0.3), "No": math.log(0.25)}
    yes = [["Yes", "token_id:5"], [" Yes", "token_id:6"]]  # "Yes" is listed twice (text and id): counted once
    assert tag_score(top, yes, [["No"], [" No"]], 4) == (pytest.approx(0.5 / 0.75), False)


def test_step_prefixes_are_cached(tok, prm_model):
    server = NextTokenServer(prm_model, tok)
    remote = RemoteTagPRM(pool(server), "prm", tokenizer=tok, top_logprobs=len(tok))
    (first,) = asyncio.run(remote.score_steps([ScoreRequest(P1, STEPS)]))
    again = asyncio.run(remote.score_steps([ScoreRequest(P1, STEPS[:2]), ScoreRequest(P1, STEPS)]))
    assert len(server.bodies) == 1  # every prefix was scored: no request
    assert again[0].scores == first.scores[:2] and again[1].scores == first.scores
    assert again[0].tokens == again[1].tokens == 0
    assert remote.stats.cached_steps == 5


def test_a_failed_request_scores_nan_and_never_raises(tok):
    calls = []

    def handler(r):
        calls.append(r)
        return httpx.Response(500, json={"error": {"message": "CUDA out of memory"}})

    remote = RemoteTagPRM(pool(handler, retries=1), "prm", tokenizer=tok)
    (out,) = asyncio.run(remote.score_steps([ScoreRequest(P1, STEPS[:2])]))
    assert len(out.scores) == 2 and all(math.isnan(s) for s in out.scores) and out.tokens == 0
    assert len(calls) == 2  # one retry
    assert f"{URL}/completions" in remote.stats.last_error and "CUDA out of memory" in remote.stats.last_error
    asyncio.run(remote.score_steps([ScoreRequest(P1, STEPS[:2])]))
    assert len(calls) == 4  # failures are not cached


def test_a_tokenizer_is_required(tok):
    with pytest.raises(ValueError, match="tokenizer"):
        RemoteTagPRM(URL, "some/hub-prm")
    with pytest.raises(ValueError, match="single token"):
        RemoteTagPRM(URL, "prm", tokenizer=tok, format=EMBEDDED_TAG_FORMAT.__class__(good="++"))


# -- RemoteRewardPRM (vLLM /pooling) ---------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["all", "step", "logits"])
def test_reward_prm_reads_the_separator_rows(tok, pooling):
    classifier = tiny_token_classifier(tok)
    hf = HFClassifierPRM(classifier, tok, separator_token="§", run_in_thread=False)
    req = ScoreRequest(P1, STEPS)
    ids, seps = hf.input_ids(req)
    seen = []

    def handler(r):
        body = json.loads(r.content)
        seen.append((str(r.url), body))
        with torch.no_grad():
            logits = classifier(torch.tensor([body["input"]])).logits[0].double()
        rows = logits if pooling == "logits" else torch.softmax(logits, -1)
        rows = rows[seps] if pooling == "step" else rows
        return httpx.Response(200, json={"id": "pool-1", "object": "list", "model": "prm",
                                         "data": [{"index": 0, "object": "pooling", "data": rows.tolist()}],
                                         "usage": {"prompt_tokens": len(body["input"]), "total_tokens": len(ids)}})

    remote = RemoteRewardPRM(pool(handler), "prm", tokenizer=tok, separator_token="§")
    (out,) = asyncio.run(remote.score_steps([req]))
    url, body = seen[0]
    assert url == "http://prm:8000/pooling" and body["input"] == ids and body["model"] == "prm"
    assert out.scores == pytest.approx(hf.score_steps_sync([req])[0].scores, abs=1e-9)
    assert out.tokens == len(ids)


def test_reward_prm_with_an_unexpected_row_count_scores_nan(tok):
    handler = lambda r: httpx.Response(200, json={"data": [{"index": 0, "data": [[0.5, 0.5]]}]})  # noqa: E731
    remote = RemoteRewardPRM(pool(handler), "prm", tokenizer=tok, separator_token="§")
    (out,) = asyncio.run(remote.score_steps([ScoreRequest(P1, STEPS)]))
    assert all(math.isnan(s) for s in out.scores)
    assert "unexpected response shape" in remote.stats.last_error
