"""Cache namespaces in the policy backends (``StepRequest.cache_namespace``): the KV prefix tree,
HFGenerator, the look-ahead, and vLLM's ``cache_salt`` in the HTTP bodies. A request of one
namespace never reuses what another namespace's requests left in a cache."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

torch = pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
pytest.importorskip("transformers")

from itscale.lm import EndpointPool, HFGenerator, Lookahead, OpenAIGenerator  # noqa: E402
from itscale.lm.completions import VLLM_EXTENSIONS, CompletionsClient, Sampling, cache_salt  # noqa: E402
from itscale.lm.http import BackendError  # noqa: E402
from itscale.lm.kv_cache import KVNode, KVStore  # noqa: E402
from itscale.types import Problem, SamplingParams, Step, StepRequest  # noqa: E402

P = Problem("p", "3+4*2=")
URL = "http://vllm:8000/v1"


def node(parent, key, n, logits=False):
    kv = tuple((torch.zeros(1, n, 2), torch.zeros(1, n, 2)) for _ in range(2))
    return KVNode(key, parent, torch.arange(n), kv, logits=torch.zeros(4) if logits else None)


# -- the KV prefix tree -----------------------------------------------------------------------------

def test_a_namespace_only_finds_what_was_stored_in_it():
    store = KVStore(max_tokens=1000)
    a = store.insert(node(store.root_of("a"), "prompt", 4))
    store.insert(node(a, " one", 3))
    every = lambda n, pos: True  # noqa: E731
    assert store.match_text("prompt one", every, namespace="a")[1] == len("prompt one")
    for other in ("b", None):  # another key, and the shared namespace
        found, covered = store.match_text("prompt one", every, namespace=other)
        assert covered == 0 and found is store.root_of(other) and found is not store.root_of("a")
        assert store.match_keys(["prompt", " one"], other) == []
    assert [n.key for n in store.match_keys(["prompt", " one"], "a")] == ["prompt", " one"]
    # the same text stored under the shared root is another node
    shared = store.insert(node(store.root, "prompt", 4))
    assert shared is not a and store.match_text("prompt", every)[0] is shared
    assert store.match_text("prompt", every, namespace="a")[0] is a
    assert store.tokens == 11 and store.nodes == 3


def test_the_memory_bound_is_shared_by_every_namespace():
    store = KVStore(max_tokens=10)
    store.insert(node(store.root_of("a"), "old", 6))
    store.insert(node(store.root_of("b"), "new", 6))  # 12 > 10: the least recently used leaf goes
    assert store.trim() == 6 and store.tokens == 6
    every = lambda n, pos: True  # noqa: E731
    assert store.match_text("old", every, namespace="a")[1] == 0
    assert store.match_text("new", every, namespace="b")[1] == 3
    assert "a" not in store.namespaces or not store.root_of("a").children  # an emptied namespace is dropped
    store.clear()
    assert store.tokens == store.size == store.nodes == 0 and store.namespaces == ()


def test_a_node_built_on_a_root_that_was_cleared_stays_detached():
    store = KVStore(max_tokens=100)
    old_root = store.root_of("a")
    store.clear()
    detached = store.insert(node(old_root, "x", 2))
    assert not detached.in_store and store.tokens == 0


# -- HFGenerator ------------------------------------------------------------------------------------

def step_request(namespace, seed=5):
    return StepRequest(P, (), 2, SamplingParams(temperature=1.0, max_step_tokens=6, seed=seed), ("\n",),
                       cache_namespace=namespace)


def test_hf_generator_reuses_states_only_within_a_namespace(char_tokenizer, tiny_lm):
    gen = HFGenerator(tiny_lm, char_tokenizer, run_in_thread=False, device="cpu")
    prompt = len(char_tokenizer.encode(gen.context_text(P.prompt), add_special_tokens=False))
    (a,) = gen.generate_steps_sync([step_request("a")])
    assert a[0].prefilled_tokens == a[0].prompt_tokens == prompt  # a cold cache
    (b,) = gen.generate_steps_sync([step_request("b")])
    assert b[0].prefilled_tokens == prompt and gen.stats.cache_hits == 0  # nothing of a's is read
    assert [s.text for s in b] == [s.text for s in a]  # (the same sampling either way)
    (again,) = gen.generate_steps_sync([step_request("a")])
    assert again[0].prefilled_tokens == 0 and gen.stats.cache_hits == 1  # a's own entries are
    # one call with both namespaces: the same context is prefilled once per namespace
    shared, mine = gen.generate_steps_sync([step_request(None), step_request("c")])
    assert shared[0].prefilled_tokens == prompt and mine[0].prefilled_tokens == prompt
    # a continuation is found after the step stored in its own namespace only
    cont = lambda ns: StepRequest(P, (a[0],), 1, SamplingParams(max_step_tokens=4, seed=1), ("\n",),  # noqa: E731
                                  cache_namespace=ns)
    hits = gen.stats.cache_hits
    gen.generate_steps_sync([cont("a")])
    assert gen.stats.cache_hits == hits + 1
    ((other,),) = gen.generate_steps_sync([cont("d")])
    assert gen.stats.cache_hits == hits + 1 and other.prefilled_tokens == other.prompt_tokens


# -- HTTP: cache_salt -------------------------------------------------------------------------------


class Recorder:
    """A mocked completions server: ``n`` (or one per prompt) choices of the step ``1\\n``."""

    def __init__(self, reject: str | None = None):
        self.bodies: list[dict] = []
        self.reject = reject

    def __call__(self, req: httpx.Request) -> httpx.Response:
        body = json.loads(req.content)
        self.bodies.append(body)
        if self.reject and self.reject in body:
            return httpx.Response(400, json={"error": {"message": f"Unrecognized request argument supplied: "
                                                                  f"{self.reject}"}})
        count = len(body["prompt"]) if isinstance(body["prompt"], list) else body.get("n", 1)
        choices = [{"index": i, "text": "1\n", "finish_reason": "stop", "stop_reason": "\n",
                    "logprobs": {"tokens": ["1", "\n"], "token_logprobs": [-0.1, -0.1]}} for i in range(count)]
        usage = {"prompt_tokens": 10, "completion_tokens": 2 * count, "prompt_tokens_details": {"cached_tokens": 8}}
        return httpx.Response(200, json={"choices": choices, "usage": usage})


def pool(server):
    return EndpointPool(URL, transport=httpx.MockTransport(server), backoff_base=0.001, rng=random.Random(0))


def test_the_salt_is_per_namespace_stable_and_not_the_name():
    assert cache_salt("alice") == cache_salt("alice") != cache_salt("bob")
    assert len(cache_salt("alice")) == 64 and "alice" not in cache_salt("alice")
    assert "cache_salt" in VLLM_EXTENSIONS


def test_a_namespaced_request_carries_its_salt_and_a_shared_one_none(tokenizer):
    client = CompletionsClient(URL, "policy", tokenizer=tokenizer)
    sampling = Sampling(8, 0.7, cache_namespace="alice")
    assert client.completions_body("x", sampling)["cache_salt"] == cache_salt("alice")
    assert client.chat_body("x", "", sampling)["cache_salt"] == cache_salt("alice")
    assert "cache_salt" not in client.completions_body("x", Sampling(8, 0.7))
    plain = CompletionsClient(URL, "policy", tokenizer=tokenizer, extensions=False)
    assert "cache_salt" not in plain.completions_body("x", sampling)


def test_openai_generator_sends_the_salt_and_never_merges_two_namespaces(tokenizer):
    server = Recorder()
    gen = OpenAIGenerator(pool(server), "policy", tokenizer=tokenizer, merge_prompts=1)
    (steps,) = asyncio.run(gen.generate_steps([step_request("alice")]))
    assert server.bodies[-1]["cache_salt"] == cache_salt("alice") and steps[0].prefilled_tokens == 2
    asyncio.run(gen.generate_steps([step_request(None)]))
    assert "cache_salt" not in server.bodies[-1]

    server = Recorder()
    merged = OpenAIGenerator(pool(server), "policy", tokenizer=tokenizer)  # merges a call's requests
    out = asyncio.run(merged.generate_steps([step_request("alice"), step_request("bob"), step_request("alice")]))
    assert all(len(s) == 2 and not s[0].failed for s in out)
    continuations = [len(b["prompt"]) if isinstance(b["prompt"], list) else b["n"] for b in server.bodies]
    salts = sorted(zip((b.get("cache_salt") for b in server.bodies), continuations))
    assert salts == sorted([(cache_salt("alice"), 4), (cache_salt("bob"), 2)])  # alice's two merged, bob alone


def test_a_strict_server_drops_the_salt_and_its_cached_tokens_are_not_reported(tokenizer):
    server = Recorder(reject="cache_salt")
    gen = OpenAIGenerator(pool(server), "policy", tokenizer=tokenizer, merge_prompts=1)
    (steps,) = asyncio.run(gen.generate_steps([step_request("alice")]))
    assert not steps[0].failed and gen.extensions is False and "cache_salt" not in server.bodies[-1]
    assert steps[0].prefilled_tokens is None  # the server's cache was not split: its hits are not ours to report
    (shared,) = asyncio.run(gen.generate_steps([step_request(None)]))
    assert shared[0].prefilled_tokens == 2
    client = CompletionsClient(URL, "policy", tokenizer=tokenizer)
    assert client.drop_extensions(BackendError(URL, 400, "Unrecognized request argument supplied: cache_salt"))


def test_look_ahead_is_kept_per_namespace(tokenizer):
    class Server(Recorder):
        def __call__(self, req):
            body = json.loads(req.content)
            self.bodies.append(body)
            text = ("1+1=2\n" * 20)[: body["max_tokens"]]
            choices = [{"index": i, "text": text, "finish_reason": "length", "stop_reason": None,
                        "logprobs": {"tokens": list(text), "token_logprobs": [-0.1] * len(text)}}
                       for i in range(len(body["prompt"]))]
            return httpx.Response(200, json={"choices": choices, "usage": {"prompt_tokens": 1}})

    server = Server()
    gen = Lookahead(OpenAIGenerator(pool(server), "policy", tokenizer=tokenizer), 32)

    def req(ns, steps=()):
        return StepRequest(P, tuple(Step(s) for s in steps), 1, SamplingParams(max_step_tokens=12), ("\n",),
                           cache_namespace=ns)

    async def go():
        first = await gen.generate_steps([req("alice")])
        sent = len(server.bodies)
        assert server.bodies[-1]["cache_salt"] == cache_salt("alice")
        step = first[0][0].text
        other = await gen.generate_steps([req("bob", [step])])  # bob continues the same text: no look-ahead
        assert len(server.bodies) == sent + 1 and server.bodies[-1]["cache_salt"] == cache_salt("bob")
        again = await gen.generate_steps([req("alice", [step])])  # alice's own look-ahead holds the step
        assert len(server.bodies) == sent + 1 and again[0][0].text == other[0][0].text
        return gen.stats

    stats = asyncio.run(go())
    assert stats["reused"] == 1
