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


class EchoServer:
    """A fake vLLM ``/v1/completions`` with ``echo=true, logprobs=k, max_tokens=1``, computed by a real
    (tiny) model: every prompt position gets its top-k next-token log-probabilities."""

    def __init__(self, model, tokenizer):
        self.model, self.tok = model, tokenizer
        self.bodies: list[dict] = []

    def __call__(self, req: httpx.Request) -> httpx.Response:
        body = json.loads(req.content)
        self.bodies.append(body)
        ids = self.tok.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
        with torch.no_grad():
            logprobs = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].double(), -1)
        ids = ids + [int(logprobs[-1].argmax())]  # the one generated token (greedy)
        tokens = [self.tok.decode([i]) for i in ids]
        top = [None]
        for pos in range(1, len(ids)):
            values, index = logprobs[pos - 1].topk(body["logprobs"])
            entry = {self.tok.decode([ids[pos]]): float(logprobs[pos - 1, ids[pos]])}
            entry.update({self.tok.decode([int(i)]): float(v) for v, i in zip(values, index)})
            top.append(entry)
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        choice = {"index": 0, "text": body["prompt"] + tokens[-1], "finish_reason": "length", "stop_reason": None,
                  "logprobs": {"tokens": tokens, "token_logprobs": [None] + [float(logprobs[p - 1, ids[p]])
                                                                            for p in range(1, len(ids))],
                               "top_logprobs": top, "text_offset": offsets}}
        usage = {"prompt_tokens": len(ids) - 1, "completion_tokens": 1, "total_tokens": len(ids)}
        return httpx.Response(200, json={"id": "cmpl-x", "object": "text_completion", "model": "prm",
                                         "choices": [choice], "usage": usage})


def requests():
    return [ScoreRequest(P1, STEPS), ScoreRequest(P1, STEPS[:1]), ScoreRequest(P2, ("17-15=2\n", "Answer: 2\n")),
            ScoreRequest(P1, ("4*2=9\n", "3+9=12\n")), ScoreRequest(P1, STEPS), ScoreRequest(P2, ())]


def test_the_text_sent_is_what_hf_tag_prm_scores(tok, prm_model):
    hf = HFTagPRM(prm_model, tok, run_in_thread=False)
    remote = RemoteTagPRM(pool(EchoServer(prm_model, tok)), "prm", tokenizer=tok)
    for req in requests():
        text, ends = remote.text(req)
        assert text == hf.prompt(req.problem.prompt)[0] + EMBEDDED_TAG_FORMAT.render_steps(req.steps, hf.delimiter)
        ids, tags = hf.input_ids(req)
        assert tok.encode(text, add_special_tokens=False) == ids  # the same tokens (character-level tokenizer)
        assert [text[e - 1] for e in ends] == ["§"] * len(req.steps)
        assert [len(tok.decode(ids[: t + 1])) for t in tags] == ends  # each tag ends where HFTagPRM reads it


def test_remote_scores_equal_hf_tag_prm_scores(tok, prm_model):
    hf = HFTagPRM(prm_model, tok, run_in_thread=False, reuse_cache=False)
    server = EchoServer(prm_model, tok)
    remote = RemoteTagPRM(pool(server), "prm", tokenizer=tok, top_logprobs=len(tok))  # exact: whole vocabulary
    got = asyncio.run(remote.score_steps(requests()))
    want = hf.score_steps_sync(requests())
    for g, w in zip(got, want):
        assert g.scores == pytest.approx(w.scores, abs=1e-6)  # float32 model, batched vs not
    body = server.bodies[0]
    assert (body["max_tokens"], body["echo"], body["logprobs"], body["add_special_tokens"]) == (1, True, len(tok), False)
    assert len(server.bodies) == 4  # the duplicate is sent once, the empty request not at all
    assert got[0].tokens == len(hf.input_ids(requests()[0])[0]) and got[4].tokens == 0
    assert remote.stats.bounded_steps == 0


def test_scores_read_the_top_logprobs_right_after_each_tag(tok):
    """Hand-made reply: decoys everywhere except at the token after each tag."""
    remote_ref = RemoteTagPRM(pool(lambda r: None), "prm", tokenizer=tok, top_logprobs=3)
    req = ScoreRequest(P1, ("4*2=8\n", "bad=1\n"))
    text, ends = remote_ref.text(req)
    after = {ends[0]: (math.log(0.6), math.log(0.2)), ends[1]: (math.log(0.3), None)}  # step 2: '-' not in top-3

    def handler(r):
        ids = tok.encode(text, add_special_tokens=False) + [tok.convert_tokens_to_ids("x")]
        tokens = [tok.decode([i]) for i in ids]
        offsets = [len(tok.decode(ids[:i])) for i in range(len(ids))]
        top = [None]
        for i in range(1, len(ids)):
            if offsets[i] in after:
                good, bad = after[offsets[i]]
                entry = {"+": good, "\n": math.log(0.15), "x": math.log(0.12)}
                if bad is not None:
                    entry["-"] = bad
            else:
                entry = {"+": math.log(0.01), "-": math.log(0.9), "7": math.log(0.05)}  # decoys
            top.append(entry)
        choice = {"index": 0, "text": text + "x", "finish_reason": "length",
                  "logprobs": {"tokens": tokens, "token_logprobs": [None] * len(ids), "top_logprobs": top,
                               "text_offset": offsets}}
        return httpx.Response(200, json={"choices": [choice], "usage": {"prompt_tokens": len(ids) - 1}})

    remote = RemoteTagPRM(pool(handler), "prm", tokenizer=tok, top_logprobs=3)
    (out,) = asyncio.run(remote.score_steps([req]))
    assert out.scores[0] == pytest.approx(0.6 / 0.8)
    # '-' missing: bounded by the 3rd largest probability there (0.12): a lower bound on the score
    assert out.scores[1] == pytest.approx(0.3 / (0.3 + 0.12))
    assert remote.stats.bounded_steps == 1
    assert out.tokens == len(tok.encode(text, add_special_tokens=False))


def test_tag_score_bounds_and_token_id_keys():
    top = {"+": math.log(0.5), "a": math.log(0.3), "-": math.log(0.1), "b": math.log(0.05)}
    assert tag_score(top, ["+"], ["-"], 4) == (pytest.approx(0.5 / 0.6), False)
    assert tag_score({"a": 0.0}, ["+"], ["-"], 1)[0] != tag_score({"a": 0.0}, ["+"], ["-"], 1)[0]  # NaN
    score, bounded = tag_score({"a": math.log(0.7), "-": math.log(0.2)}, ["+"], ["-"], 2)
    assert bounded and score == pytest.approx(0.2 / 0.4)  # good missing: an upper bound
    assert tag_score({"token_id:9": math.log(0.3), "token_id:8": math.log(0.1)}, ["+", "token_id:9"],
                     ["-", "token_id:8"], 2)[0] == pytest.approx(0.75)


def test_step_prefixes_are_cached(tok, prm_model):
    server = EchoServer(prm_model, tok)
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


def test_server_offsets_are_used_when_the_local_tokenization_does_not_line_up(tok):
    remote = RemoteTagPRM(pool(lambda r: None), "prm", tokenizer=tok)
    # two server tokens only: fewer than the local tokenizer's, so the server's offsets are used
    after = remote.token_after("ab§\n", False, ["ab§", "\n"], None)
    assert after == {3: 1}


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
