"""Cache namespaces in the PRMs (``ScoreRequest.cache_namespace``): HFTagPRM's KV tree,
HFClassifierPRM's and the remote PRMs' prefix score caches, and vLLM's ``cache_salt`` in what
the remote PRMs send. A request of one namespace is never served another namespace's work."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

torch = pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
pytest.importorskip("transformers")

from conftest_models import make_tokenizer, tiny_causal_lm, tiny_token_classifier  # noqa: E402
from itscale.lm.completions import cache_salt  # noqa: E402
from itscale.lm.http import EndpointPool  # noqa: E402
from itscale.rewards import HFClassifierPRM, HFTagPRM, RemoteRewardPRM, RemoteTagPRM  # noqa: E402
from itscale.rewards.prefix_cache import PrefixScores  # noqa: E402
from itscale.types import Problem, ScoreRequest  # noqa: E402

P = Problem("p", "3+4*2=")
STEPS = ("4*2=8\n", "3+8=11\n")
URL = "http://prm:8000/v1"


def req(namespace, steps=STEPS):
    return ScoreRequest(P, steps, cache_namespace=namespace)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_prefix_scores_are_found_in_their_own_namespace_only():
    cache = PrefixScores(capacity=10)
    cache.put(P.prompt, STEPS, [0.25, 0.75], namespace="a")
    assert cache.get(P.prompt, STEPS, "a") == (0.25, 0.75)
    assert cache.get(P.prompt, STEPS, "b") is None and cache.get(P.prompt, STEPS) is None
    assert cache.leading(P.prompt, STEPS, "b") == ()
    hits, todo = cache.lookup([req("a"), req("b"), req(None), req("b")])
    assert hits == [(0.25, 0.75), None, None, None]
    assert todo == {(P.prompt, STEPS, "b"): [1, 3], (P.prompt, STEPS, None): [2]}
    for t in range(20):  # one capacity for every namespace
        cache.put(P.prompt, (f"{t}\n",), [0.5], namespace=str(t))
    assert len(cache) == 10 and cache.get(P.prompt, STEPS, "a") is None


def test_hf_tag_prm_scores_another_namespace_afresh(tok):
    prm = HFTagPRM(tiny_causal_lm(tok, seed=7), tok, run_in_thread=False)
    (a,) = prm.score_steps_sync([req("a")])
    full = len(prm.input_ids(req("a"))[0])
    assert a.tokens == full  # a cold cache: the whole input
    (b,) = prm.score_steps_sync([req("b")])
    assert b.tokens == full and b.scores == pytest.approx(a.scores, abs=1e-6)  # none of a's states read
    assert prm.score_steps_sync([req("a")])[0].tokens == 0  # a's own are
    assert prm.score_steps_sync([req(None)])[0].tokens == full  # so is the shared namespace apart
    # one call with two namespaces: each computes its own prompt and steps
    c, d, c_again = prm.score_steps_sync([req("c"), req("d"), req("c")])
    assert (c.tokens, d.tokens, c_again.tokens) == (full, full, 0)
    assert set(prm.store.namespaces) >= {None, "a", "b", "c", "d"}


def test_hf_classifier_prm_caches_scores_per_namespace(tok):
    prm = HFClassifierPRM(tiny_token_classifier(tok), tok, separator_token="§", run_in_thread=False)
    full = len(prm.input_ids(req("a"))[0])
    assert prm.score_steps_sync([req("a")])[0].tokens == full
    assert prm.score_steps_sync([req("b")])[0].tokens == full
    assert prm.score_steps_sync([req("a")])[0].tokens == 0


def pool(handler):
    return EndpointPool(URL, transport=httpx.MockTransport(handler), backoff_base=0.001, rng=random.Random(0))


def test_remote_tag_prm_salts_its_requests_and_keeps_scores_per_namespace(tok):
    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        choices = [{"index": i, "text": "+", "finish_reason": "length",
                    "logprobs": {"tokens": ["+"], "token_logprobs": [-0.2], "top_logprobs": [{"+": -0.2, "-": -1.8}]}}
                   for i in range(len(body["prompt"]))]
        return httpx.Response(200, json={"choices": choices, "usage": {"prompt_tokens": 1}})

    prm = RemoteTagPRM(pool(handler), "prm", tokenizer=tok)
    (a,) = asyncio.run(prm.score_steps([req("a")]))
    assert bodies[-1]["cache_salt"] == cache_salt("a") and len(bodies[-1]["prompt"]) == 2 and a.tokens > 0
    (b,) = asyncio.run(prm.score_steps([req("b")]))
    assert len(bodies) == 2 and bodies[-1]["cache_salt"] == cache_salt("b") and b.tokens == a.tokens
    assert asyncio.run(prm.score_steps([req("a")]))[0].tokens == 0 and len(bodies) == 2
    # one call, two namespaces: one HTTP request (one salt) each; the shared namespace sends none
    asyncio.run(prm.score_steps([req("c"), req(None), req("c", STEPS[:1])]))
    sent = sorted((b.get("cache_salt") or "", len(b["prompt"])) for b in bodies[2:])
    assert sent == sorted([(cache_salt("c"), 2), ("", 2)])


def test_remote_reward_prm_salts_its_requests_and_keeps_scores_per_namespace(tok):
    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        rows = [[0.3, 0.7]] * body["input"].count(tok.convert_tokens_to_ids("§"))
        return httpx.Response(200, json={"data": [{"index": 0, "data": rows}],
                                         "usage": {"prompt_tokens": len(body["input"])}})

    prm = RemoteRewardPRM(pool(handler), "prm", tokenizer=tok, separator_token="§")
    (a,) = asyncio.run(prm.score_steps([req("a")]))
    assert bodies[-1]["cache_salt"] == cache_salt("a") and a.scores == pytest.approx((0.7, 0.7))
    asyncio.run(prm.score_steps([req("b")]))
    assert len(bodies) == 2 and bodies[-1]["cache_salt"] == cache_salt("b")
    asyncio.run(prm.score_steps([req("a")]))
    asyncio.run(prm.score_steps([req(None)]))
    assert len(bodies) == 3 and "cache_salt" not in bodies[-1]


def test_a_strict_pooling_server_gets_the_request_again_without_the_salt(tok):
    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        if "cache_salt" in body:
            return httpx.Response(400, json={"error": {"message": "extra field not permitted: cache_salt"}})
        return httpx.Response(200, json={"data": [{"index": 0, "data": [[0.3, 0.7]] * 2}]})

    prm = RemoteRewardPRM(pool(handler), "prm", tokenizer=tok, separator_token="§")
    (a,) = asyncio.run(prm.score_steps([req("a")]))
    assert a.scores == pytest.approx((0.7, 0.7)) and len(bodies) == 2 and prm.extensions is False
