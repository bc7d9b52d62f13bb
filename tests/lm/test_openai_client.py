"""OpenAIGenerator and EndpointPool against mocked vLLM-shaped HTTP replies (no real server)."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("transformers")

from itscale import zoo  # noqa: E402
from itscale.lm import BackendError, EndpointPool, OpenAIGenerator  # noqa: E402
from itscale.lm.loading import chat_prompt  # noqa: E402
from itscale.types import Problem, SamplingParams, Step, StepRequest  # noqa: E402

P1, P2 = Problem("p1", "3+4*2="), Problem("p2", "bad 17-5*3=")
URL, URL2 = "http://vllm-a:8000/v1", "http://vllm-b:8000/v1"
MODEL = "policy"



def request(problem=P1, steps=(), k=1, seed=7, stop=("\n",), max_tokens=16, temperature=0.7):
    params = SamplingParams(temperature=temperature, top_p=0.9, max_step_tokens=max_tokens, seed=seed)
    return StepRequest(problem, tuple(Step(s) for s in steps), k, params, stop)


def vllm_choice(index, text, finish="stop", stop_reason=None, logprobs=None):
    """One ``choices[i]`` of a vLLM /v1/completions reply (logprobs=1 shape)."""
    lps = logprobs if logprobs is not None else [-0.5] * max(len(text), 1)
    tokens = list(text) if len(text) == len(lps) else [f"t{j}" for j in range(len(lps))]
    offsets = list(np.cumsum([0] + [len(t) for t in tokens[:-1]]).tolist())
    return {
        "index": index, "text": text, "finish_reason": finish, "stop_reason": stop_reason,
        "prompt_logprobs": None,
        "logprobs": {"tokens": tokens, "token_logprobs": lps, "text_offset": offsets,
                     "top_logprobs": [{t: lp} for t, lp in zip(tokens, lps)]},
    }


def vllm_reply(choices, prompt_tokens=11, cached=None):
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": sum(len(c["logprobs"]["tokens"]) if c.get("logprobs")
                                                                       else 1 for c in choices),
             "total_tokens": 0}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    usage["prompt_tokens_details"] = None if cached is None else {"cached_tokens": cached}
    return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": MODEL, "choices": choices,
            "usage": usage, "kv_transfer_params": None}


class FakeServer:
    """An httpx MockTransport handler that records every request and answers via ``respond``."""

    def __init__(self, respond, delay=0.0):
        self.respond, self.delay = respond, delay
        self.seen: list[tuple[str, dict]] = []
        self.in_flight = self.max_in_flight = 0

    async def __call__(self, req: httpx.Request) -> httpx.Response:
        body = json.loads(req.content) if req.content else {}
        self.seen.append((str(req.url), body))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            out = self.respond(req, body, len(self.seen))
        finally:
            self.in_flight -= 1
        return out if isinstance(out, httpx.Response) else httpx.Response(200, json=out)

    @property
    def bodies(self) -> list[dict]:
        return [b for _, b in self.seen]


def echo_steps(req, body, attempt):
    """n choices, each the step 'x\\n' (stop string included, as with include_stop_str_in_output)."""
    return vllm_reply([vllm_choice(j, f"{j}+1=\n", stop_reason="\n") for j in range(body["n"])])


def pool(server, urls=(URL,), **kw):
    kw.setdefault("backoff_base", 0.001)
    return EndpointPool(list(urls), transport=httpx.MockTransport(server), rng=random.Random(0), **kw)


def generator(server, tokenizer, urls=(URL,), pool_kw=None, **kw):
    """One HTTP request per StepRequest unless ``merge_prompts`` is given (merging: its own tests)."""
    kw.setdefault("merge_prompts", 1)
    return OpenAIGenerator(pool(server, urls, **(pool_kw or {})), MODEL, tokenizer=tokenizer, **kw)


def list_steps(req, body, attempt):
    """A reply to a merged request: choice i continues prompt i with '<i>\n'; out of order."""
    choices = [vllm_choice(i, f"{i}\n", stop_reason="\n") for i in range(len(body["prompt"]))]
    return vllm_reply(choices[::-1], prompt_tokens=99)


def run(coro):
    return asyncio.run(coro)


# -- request bodies and replies --------------------------------------------------------------
def test_request_body_is_the_chat_templated_context_with_sampling_fields(tokenizer):
    server = FakeServer(echo_steps)
    gen = generator(server, tokenizer)
    (out,) = run(gen.generate_steps([request(steps=("4*2=8\n",), k=3, seed=11)]))
    assert len(out) == 3
    ((url, body),) = server.seen
    assert url == f"{URL}/completions"
    assert body["prompt"] == chat_prompt(tokenizer, P1.prompt)[0] + "4*2=8\n"
    assert body["prompt"] == "<|user|>3+4*2=<|end|><|assistant|>4*2=8\n" == gen.context_text(P1.prompt, "4*2=8\n")
    assert body["model"] == MODEL
    assert (body["n"], body["seed"], body["max_tokens"], body["stop"]) == (3, 11, 16, ["\n"])
    assert (body["temperature"], body["top_p"], body["logprobs"]) == (0.7, 0.9, 1)
    assert body["include_stop_str_in_output"] is True
    assert body["add_special_tokens"] is False  # the chat template wrote the special tokens


def test_one_token_stop_strings_also_go_as_stop_token_ids(tokenizer):
    """vLLM ends a sequence at a stop token inside its scheduler (a stop string only later, in
    its detokenizer); the step must come back exactly as with the stop string."""
    newline = tokenizer.encode("\n", add_special_tokens=False)[0]
    server = FakeServer(lambda req, body, n: vllm_reply([vllm_choice(0, "3+4=7\n", stop_reason=newline)]))
    gen = generator(server, tokenizer)
    (out,) = run(gen.generate_steps([request(stop=("\n", "Answer: 7"))]))
    body = server.bodies[0]
    assert body["stop"] == ["\n", "Answer: 7"] and body["stop_token_ids"] == [newline]  # only the one-token stop
    assert (out[0].text, out[0].finish_reason) == ("3+4=7\n", "stop")
    eos = FakeServer(lambda req, body, n: vllm_reply([vllm_choice(0, "Answer: 7", stop_reason=2)]))
    (out,) = run(generator(eos, tokenizer).generate_steps([request()]))
    assert out[0].finish_reason == "eos"  # any other token id is an end-of-sequence token
    other = FakeServer(lambda req, body, n: vllm_reply([vllm_choice(0, "3+4=7", stop_reason=newline)]))
    (out,) = run(generator(other, tokenizer).generate_steps([request()]))
    assert out[0].failed and "not the server's" in out[0].error  # the server's id means another token
    plain = FakeServer(echo_steps)
    run(generator(plain, tokenizer, extensions=False).generate_steps([request()]))
    assert "stop_token_ids" not in plain.bodies[0]


def test_optional_fields_are_left_out_when_unset(tokenizer):
    server = FakeServer(lambda req, body, n: vllm_reply([vllm_choice(0, "Answer: 11", stop_reason=None)]))
    gen = generator(server, tokenizer, extensions=False)
    (out,) = run(gen.generate_steps([request(seed=None, stop=())]))
    body = server.bodies[0]
    assert not {"seed", "stop", "include_stop_str_in_output", "add_special_tokens"} & set(body)
    assert out[0].finish_reason == "eos"


def test_tokenizer_is_loaded_from_a_local_model_folder():
    server = FakeServer(echo_steps)
    gen = OpenAIGenerator(pool(server), str(zoo.policy_path()))
    assert gen.api == "completions" and gen.tokenizer is not None
    run(gen.generate_steps([request()]))
    assert server.bodies[0]["prompt"].startswith("<|user|>3+4*2=")


def test_steps_keep_their_stop_string_and_map_finish_reasons(tokenizer):
    choices = [
        vllm_choice(0, "4*2=8\n", stop_reason="\n", logprobs=[-0.1] * 6),  # stop string included
        vllm_choice(1, "4*2=9", stop_reason="\n", logprobs=[-0.2] * 6),  # stripped: re-appended
        vllm_choice(2, "Answer: 11", stop_reason=None, logprobs=[-0.3] * 11),  # EOS (token counted)
        vllm_choice(3, "1234", finish="length", logprobs=[-1.0] * 4),
        vllm_choice(4, "7", stop_reason=2, logprobs=[-0.5] * 2),  # a stop *token* (int): EOS
    ]
    server = FakeServer(lambda req, body, n: vllm_reply(choices, prompt_tokens=20, cached=16))
    (out,) = run(generator(server, tokenizer).generate_steps([request(k=5)]))
    assert [s.text for s in out] == ["4*2=8\n", "4*2=9\n", "Answer: 11", "1234", "7"]
    assert [s.finish_reason for s in out] == ["stop", "stop", "eos", "length", "eos"]
    assert [s.tokens for s in out] == [6, 6, 11, 4, 2]
    assert out[0].logprob == pytest.approx(-0.6) and out[3].logprob == pytest.approx(-4.0)
    assert [s.prompt_tokens for s in out] == [20, 0, 0, 0, 0]  # on the first continuation only
    assert [s.prefilled_tokens for s in out] == [4, 0, 0, 0, 0]  # prompt − cached
    assert not any(s.failed for s in out)


def test_a_generic_server_without_stop_reason_or_logprobs(tokenizer):
    """No ``stop_reason`` and stripped stops (OpenAI-style): the single stop string is re-appended."""
    def respond(req, body, n):
        choices = [{"index": 0, "text": "4*2=8", "finish_reason": "stop", "logprobs": None},
                   {"index": 1, "text": "4*2=8\n", "finish_reason": "stop", "logprobs": None},
                   {"index": 2, "text": "12", "finish_reason": "length", "logprobs": None}]
        return {"choices": choices, "usage": {"prompt_tokens": 9, "completion_tokens": 13}}

    (out,) = run(generator(FakeServer(respond), tokenizer).generate_steps([request(k=3)]))
    assert [s.text for s in out] == ["4*2=8\n", "4*2=8\n", "12"]
    assert [s.finish_reason for s in out] == ["stop", "stop", "length"]
    assert [s.tokens for s in out] == [5, 4, 4]  # usage.completion_tokens split evenly
    assert all(s.logprob is None for s in out)
    assert out[0].prompt_tokens == 9 and out[0].prefilled_tokens is None


def test_unknown_finish_reason_is_an_error_step(tokenizer):
    server = FakeServer(lambda req, body, n: vllm_reply([vllm_choice(0, "4*", finish="abort")]))
    ((step,),) = run(generator(server, tokenizer).generate_steps([request()]))
    assert step.failed and "abort" in step.error and URL in step.error


# -- n > 1 and its fallbacks ---------------------------------------------------------------
def test_n_per_request_falls_back_to_parallel_requests_when_the_server_rejects_n(tokenizer):
    def respond(req, body, attempt):
        if body["n"] > 1:
            return httpx.Response(400, json={"object": "error", "message": "n must be 1 for this server",
                                             "type": "BadRequestError", "code": 400})
        return vllm_reply([vllm_choice(0, f"{body['seed']}\n", stop_reason="\n")], prompt_tokens=10)

    server = FakeServer(respond)
    gen = generator(server, tokenizer)
    assert gen.capabilities.n_per_request is True  # assumed until shown otherwise
    (out,) = run(gen.generate_steps([request(k=3, seed=100)]))
    assert [s.text for s in out] == ["100\n", "101\n", "102\n"]  # seeds seed + j
    assert gen.capabilities.n_per_request is False and gen.n_per_request is False
    assert [b["n"] for b in server.bodies] == [3, 1, 1, 1]
    assert [s.prompt_tokens for s in out] == [30, 0, 0]  # prompt tokens sent, summed over the requests
    run(gen.generate_steps([request(k=2, seed=5)]))
    assert [b["n"] for b in server.bodies[4:]] == [1, 1]  # no second probe


def test_a_server_that_ignores_n_gets_the_rest_in_parallel(tokenizer):
    """llama.cpp answers n=3 with one choice."""
    server = FakeServer(lambda req, body, n: vllm_reply([vllm_choice(0, f"{body['seed']}\n", stop_reason="\n")]))
    gen = generator(server, tokenizer)
    (out,) = run(gen.generate_steps([request(k=3, seed=0)]))
    assert [s.text for s in out] == ["0\n", "1\n", "2\n"]
    assert [(b["n"], b["seed"]) for b in server.bodies] == [(3, 0), (1, 1), (1, 2)]
    assert gen.capabilities.n_per_request is False


def test_n_per_request_false_sends_parallel_requests_from_the_start(tokenizer):
    server = FakeServer(echo_steps)
    (out,) = run(generator(server, tokenizer, n_per_request=False).generate_steps([request(k=4, seed=None)]))
    assert len(out) == 4 and [b["n"] for b in server.bodies] == [1, 1, 1, 1]
    assert all("seed" not in b for b in server.bodies)


def test_vllm_extensions_are_dropped_when_a_strict_server_rejects_them(tokenizer):
    def respond(req, body, attempt):
        if "include_stop_str_in_output" in body:
            return httpx.Response(400, json={"error": {"message": "Unrecognized request argument supplied: "
                                                       "include_stop_str_in_output", "type": "invalid_request_error"}})
        return vllm_reply([vllm_choice(0, "4*2=8", stop_reason=None)])

    server = FakeServer(respond)
    gen = generator(server, tokenizer)
    ((step,),) = run(gen.generate_steps([request()]))
    assert not step.failed and gen.extensions is False
    assert "add_special_tokens" not in server.bodies[1]


def test_chat_endpoint_without_a_tokenizer_continues_the_assistant_turn():
    def respond(req, body, attempt):
        content = [{"token": c, "logprob": -0.25, "bytes": list(c.encode()), "top_logprobs": []} for c in "3+8=11\n"]
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "3+8=11\n"},
                             "logprobs": {"content": content}, "finish_reason": "stop", "stop_reason": "\n"}],
                "usage": {"prompt_tokens": 15, "completion_tokens": 7}}

    server = FakeServer(respond)
    gen = OpenAIGenerator(pool(server), "some/hub-model", system_prompt="Be brief.")
    assert gen.tokenizer is None and gen.api == "chat"
    ((step,),) = run(gen.generate_steps([request(steps=("4*2=8\n",))]))
    url, body = server.seen[0]
    assert url == f"{URL}/chat/completions"
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": P1.prompt},
                                {"role": "assistant", "content": "4*2=8\n"}]
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert (step.text, step.tokens, step.finish_reason) == ("3+8=11\n", 7, "stop")
    assert step.logprob == pytest.approx(-1.75)


# -- load balancing, concurrency, retries -------------------------------------------------------
def test_load_balancing_across_two_base_urls(tokenizer):
    server = FakeServer(echo_steps, delay=0.02)
    gen = generator(server, tokenizer, urls=(URL, URL2))
    for _ in range(4):  # one at a time: round-robin
        run(gen.generate_steps([request()]))
    hosts = [httpx.URL(u).host for u, _ in server.seen]
    assert hosts == ["vllm-a", "vllm-b", "vllm-a", "vllm-b"]
    server.seen.clear()
    run(gen.generate_steps([request(seed=s) for s in range(10)]))  # concurrently: least in flight
    hosts = [httpx.URL(u).host for u, _ in server.seen]
    assert hosts.count("vllm-a") == hosts.count("vllm-b") == 5


def test_concurrency_limit_is_respected(tokenizer):
    server = FakeServer(echo_steps, delay=0.02)
    gen = generator(server, tokenizer, urls=(URL, URL2), pool_kw={"max_concurrency": 3})
    out = run(gen.generate_steps([request(seed=s) for s in range(12)]))
    assert len(out) == 12 and len(server.seen) == 12
    assert server.max_in_flight == 3


@pytest.mark.parametrize("failure", ["500", "429", "drop", "connect", "timeout"])
def test_retries_transient_failures_then_succeeds(tokenizer, failure):
    def respond(req, body, attempt):
        if attempt <= 2:
            if failure == "500":
                return httpx.Response(500, text="Internal Server Error")
            if failure == "429":
                return httpx.Response(429, headers={"Retry-After": "0.05"}, json={"error": {"message": "slow down"}})
            if failure == "drop":
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=req)
            if failure == "connect":
                raise httpx.ConnectError("[Errno 111] Connection refused", request=req)
            raise httpx.ReadTimeout("timed out", request=req)
        return echo_steps(req, body, attempt)

    server = FakeServer(respond)
    gen = generator(server, tokenizer)
    started = time.perf_counter()
    ((step,),) = run(gen.generate_steps([request()]))
    assert not step.failed and step.text == "0+1=\n"
    assert len(server.seen) == 3
    if failure == "429":  # Retry-After is a lower bound on the wait
        assert time.perf_counter() - started >= 0.1
    assert gen.http.usage.retries == 2 and gen.http.usage.requests == 1 and gen.http.usage.failures == 0


def test_no_retry_on_400_and_the_error_names_endpoint_status_and_message():
    server = FakeServer(lambda req, body, n: httpx.Response(
        400, json={"object": "error", "message": "This model's maximum context length is 256 tokens.",
                   "type": "BadRequestError", "param": None, "code": 400}))
    p = pool(server)
    with pytest.raises(BackendError) as info:
        run(p.post("completions", {"model": MODEL}))
    err = info.value
    assert len(server.seen) == 1
    assert (err.endpoint, err.status, err.attempts) == (f"{URL}/completions", 400, 1)
    assert "maximum context length is 256" in err.message
    text = str(err)
    assert f"{URL}/completions" in text and "HTTP 400" in text and "maximum context length" in text


def test_gives_up_after_the_retries_with_a_typed_error():
    server = FakeServer(lambda req, body, n: httpx.Response(503, json={"error": {"message": "engine is overloaded"}}))
    p = pool(server, retries=2)
    with pytest.raises(BackendError) as info:
        run(p.post("completions", {}))
    assert len(server.seen) == 3 and info.value.status == 503 and info.value.attempts == 3
    assert "after 3 attempts" in str(info.value) and "engine is overloaded" in str(info.value)


def test_a_failing_request_gives_error_steps_and_the_others_go_on(tokenizer):
    def respond(req, body, attempt):
        if "bad" in body["prompt"]:
            return httpx.Response(422, json={"detail": "prompt rejected"})
        return echo_steps(req, body, attempt)

    server = FakeServer(respond)
    good, bad = run(generator(server, tokenizer).generate_steps([request(k=2), request(problem=P2, k=3)]))
    assert [s.text for s in good] == ["0+1=\n", "1+1=\n"]
    assert len(bad) == 3 and all(s.failed and s.text == "" for s in bad)
    assert f"{URL}/completions" in bad[0].error and "422" in bad[0].error and "prompt rejected" in bad[0].error


def test_backoff_is_full_jitter_from_an_explicit_rng():
    a = EndpointPool(URL, rng=random.Random(3))
    b = EndpointPool(URL, rng=random.Random(3))
    c = EndpointPool(URL, rng=np.random.default_rng(3))
    delays = [a.backoff(i) for i in range(8)]
    assert delays == [b.backoff(i) for i in range(8)]
    for i, d in enumerate(delays):
        assert 0 <= d <= min(8.0, 0.25 * 2**i)
    assert all(0 <= c.backoff(i) <= min(8.0, 0.25 * 2**i) for i in range(8))


def test_base_urls_and_paths():
    p = EndpointPool(["http://h:8000", "http://h2:8000/v1/"])
    assert p.base_urls == ["http://h:8000/v1", "http://h2:8000/v1"]
    assert p.url(0, "completions") == "http://h:8000/v1/completions"
    assert p.url(1, "/pooling") == "http://h2:8000/pooling"
    with pytest.raises(ValueError, match="base URL"):
        EndpointPool("localhost:8000")


def test_the_pool_survives_successive_event_loops(tokenizer):
    server = FakeServer(echo_steps)
    gen = generator(server, tokenizer)
    for _ in range(3):  # e.g. a sync solve() wrapper calling asyncio.run each time
        ((step,),) = run(gen.generate_steps([request()]))
        assert not step.failed

    async def closing():
        async with gen:
            await gen.generate_steps([request()])
    run(closing())
    assert len(server.seen) == 4


# -- check() ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_fails_fast_on_an_unreachable_host():
    url = f"http://127.0.0.1:{free_port()}/v1"
    gen = OpenAIGenerator(url, MODEL, n_parameters=1)
    started = time.perf_counter()
    with pytest.raises(BackendError) as info:
        run(gen.check())
    assert time.perf_counter() - started < 2.0
    assert info.value.status is None and info.value.endpoint == f"{url}/models"
    assert f"{url}/models" in str(info.value) and "cannot reach" in str(info.value)


def test_check_lists_the_served_models_when_the_model_is_unknown(tokenizer):
    models = {"object": "list", "data": [{"id": "Qwen/Qwen2.5-0.5B", "object": "model", "owned_by": "vllm"},
                                         {"id": "policy", "object": "model", "owned_by": "vllm"}]}
    server = FakeServer(lambda req, body, n: models)
    assert run(generator(server, tokenizer, urls=(URL, URL2)).check()) == {URL: ["Qwen/Qwen2.5-0.5B", "policy"],
                                                                           URL2: ["Qwen/Qwen2.5-0.5B", "policy"]}
    wrong = OpenAIGenerator(pool(server), "polcy", tokenizer=tokenizer)
    with pytest.raises(BackendError, match=r"'polcy' is not served.*Qwen/Qwen2.5-0.5B.*policy"):
        run(wrong.check())


def test_capabilities_and_usage(tokenizer):
    server = FakeServer(lambda req, body, n: vllm_reply([vllm_choice(0, "1\n", stop_reason="\n")], prompt_tokens=12))
    gen = generator(server, tokenizer, n_parameters=1234)
    assert (gen.capabilities.logprobs, gen.capabilities.prefix_cache, gen.capabilities.n_parameters) == (True, False, 1234)
    run(gen.generate_steps([request(), request(problem=P2)]))
    assert gen.http.usage.prompt_tokens == 24 and gen.http.usage.completion_tokens == 4
    assert gen.http.usage.requests == 2


# -- merged requests ---------------------------------------------------------------------
def test_a_call_is_merged_into_one_prompt_list_without_seeds(tokenizer):
    server = FakeServer(list_steps)
    gen = generator(server, tokenizer, merge_prompts=256)
    reqs = [request(k=2, seed=1), request(problem=P2, steps=("1+1=2\n",), seed=2), request(k=0), request(seed=3)]
    a, b, none, c = run(gen.generate_steps(reqs))
    ((url, body),) = server.seen
    assert url == f"{URL}/completions" and "seed" not in body and body["n"] == 1
    assert body["prompt"] == [gen.context_text(P1.prompt)] * 2 + [gen.context_text(P2.prompt, "1+1=2\n"),
                                                                  gen.context_text(P1.prompt)]
    assert [s.text for s in a] == ["0\n", "1\n"] and [s.text for s in b] == ["2\n"] and [s.text for s in c] == ["3\n"]
    assert none == []
    # prompt tokens: the context's own count (local tokenizer), once per request; prefill unknown
    assert a[0].prompt_tokens == len(tokenizer.encode(body["prompt"][0], add_special_tokens=False)) and a[1].prompt_tokens == 0
    assert b[0].prompt_tokens == len(tokenizer.encode(body["prompt"][2], add_special_tokens=False))
    assert a[0].prefilled_tokens is None and a[0].logprob == pytest.approx(-1.0)


def test_merging_splits_by_sampling_fields_and_by_merge_prompts(tokenizer):
    server = FakeServer(list_steps)
    gen = generator(server, tokenizer, merge_prompts=3)
    reqs = [request(seed=j) for j in range(4)] + [request(temperature=0.2), request(temperature=0.2, max_tokens=5)]
    out = run(gen.generate_steps(reqs))
    assert all(len(o) == 1 and not o[0].failed for o in out)
    shapes = sorted((len(b["prompt"]) if isinstance(b["prompt"], list) else 0, b["temperature"], b["max_tokens"])
                    for b in server.bodies)
    # 4 alike: 3 merged + 1 alone (sent as a plain request); the two others differ
    assert shapes == [(0, 0.2, 5), (0, 0.2, 16), (0, 0.7, 16), (3, 0.7, 16)]
    assert not any("seed" in b for b in server.bodies)  # merging on: no request is seeded


def test_a_lone_request_is_sent_with_n_and_a_seed_only_without_merging(tokenizer):
    server = FakeServer(echo_steps)
    (out,) = run(generator(server, tokenizer, merge_prompts=256).generate_steps([request(k=4, seed=9)]))
    (body,) = server.bodies
    assert (body["n"], "seed" in body, isinstance(body["prompt"], str)) == (4, False, True) and len(out) == 4
    run(generator(server, tokenizer, merge_prompts=1).generate_steps([request(k=4, seed=9)]))
    assert (server.bodies[1]["n"], server.bodies[1]["seed"]) == (4, 9)


def test_a_rejected_merged_request_is_resent_one_by_one(tokenizer):
    def respond(req, body, attempt):
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        if any("bad" in p for p in prompts):
            return httpx.Response(400, json={"error": {"message": "prompt rejected"}})
        return list_steps(req, {"prompt": prompts}, attempt) if isinstance(body["prompt"], list) else echo_steps(req, body, attempt)

    server = FakeServer(respond)
    good, bad = run(generator(server, tokenizer, merge_prompts=256).generate_steps([request(), request(problem=P2)]))
    assert [isinstance(b["prompt"], list) for b in server.bodies] == [True, False, False]
    assert not good[0].failed and bad[0].failed and "prompt rejected" in bad[0].error


def test_a_failed_merged_request_kills_its_particles_only(tokenizer):
    def respond(req, body, attempt):
        return httpx.Response(503, json={"error": {"message": "overloaded"}})

    server = FakeServer(respond)
    gen = generator(server, tokenizer, merge_prompts=256, pool_kw={"retries": 1})
    out = run(gen.generate_steps([request(k=2), request(problem=P2)]))
    assert [len(o) for o in out] == [2, 1] and all(s.failed and "overloaded" in s.error for o in out for s in o)
    assert len(server.seen) == 2  # one merged request, retried once; no per-request storm after a 5xx


def test_merged_steps_without_logprobs_share_the_replys_completion_tokens(tokenizer):
    def respond(req, body, attempt):
        choices = [{"index": i, "text": f"{i}\n", "finish_reason": "stop", "stop_reason": "\n"}
                   for i in range(len(body["prompt"]))]
        return {"choices": choices, "usage": {"prompt_tokens": 30, "completion_tokens": 7}}

    a, b = run(generator(FakeServer(respond), tokenizer, merge_prompts=256).generate_steps(
        [request(k=2), request(problem=P2)]))
    assert [s.tokens for s in a + b] == [3, 2, 2] and all(s.logprob is None for s in a + b)


# -- the server's context length ------------------------------------------------------------------
def too_long(tokenizer):
    """A vLLM 0.32 server with a 64-token context: a request whose prompt + max_tokens does not fit is a 400."""
    def respond(req, body, attempt):
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        longest = max(len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts)
        if longest + body["max_tokens"] > 64:
            return httpx.Response(400, json={"object": "error", "type": "BadRequestError", "code": 400,
                                             "message": f"max_tokens={body['max_tokens']} cannot be greater than "
                                                        f"max_model_len=64 minus the prompt"})
        if isinstance(body["prompt"], list):
            return list_steps(req, body, attempt)
        return vllm_reply([vllm_choice(0, "1\n", finish="length")])

    return respond


def test_a_context_length_named_by_the_server_caps_max_tokens_from_then_on(tokenizer):
    server = FakeServer(too_long(tokenizer))
    gen = generator(server, tokenizer)
    ((step,),) = run(gen.generate_steps([request(max_tokens=500)]))
    assert not step.failed and gen.context_length == 64
    room = 64 - gen.context_tokens(P1.prompt)
    assert [b["max_tokens"] for b in server.bodies] == [500, room]  # learnt, then re-sent capped
    run(gen.generate_steps([request(max_tokens=500)]))
    assert server.bodies[-1]["max_tokens"] == room and len(server.bodies) == 3  # no second 400


def test_a_merged_request_past_the_context_is_resent_one_by_one_each_capped(tokenizer):
    server = FakeServer(too_long(tokenizer))
    gen = generator(server, tokenizer, merge_prompts=256)
    out = run(gen.generate_steps([request(max_tokens=500), request(problem=P2, max_tokens=500)]))
    assert all(not o[0].failed for o in out) and gen.context_length == 64
    first, *resent = server.bodies
    assert isinstance(first["prompt"], list) and [isinstance(b["prompt"], str) for b in resent] == [True, True]
    rooms = {64 - gen.context_tokens(p.prompt) for p in (P1, P2)}
    assert {b["max_tokens"] for b in resent} == rooms


# -- the client: one reply parser, bodies ---------------------------------------------------------
def test_the_reply_parser_reads_completions_and_chat_choices_in_index_order():
    from itscale.lm.completions import finish_of, parse_reply
    from itscale.lm.http import Reply

    reply = Reply(vllm_reply([vllm_choice(1, "b\n", stop_reason="\n"), vllm_choice(0, "a", finish="length")],
                             prompt_tokens=9, cached=4), URL)
    completion = parse_reply(reply, "completions", expected=2)
    a, b = completion.choices
    assert (a.text, a.finish_reason, b.text, b.stop_reason, b.stop_reported) == ("a", "length", "b\n", "\n", True)
    assert b.tokens == ("b", "\n") and b.token_logprobs == (-0.5, -0.5) and b.logprobs == [-0.5, -0.5]
    assert b.top_logprobs == ({"b": -0.5}, {"\n": -0.5})
    assert (completion.prompt_tokens, completion.cached_tokens, completion.endpoint) == (9, 4, URL)
    assert finish_of(b, ("\n",)) == ("b\n", "stop", None) and finish_of(a, ("\n",)) == ("a", "length", None)
    with pytest.raises(BackendError, match=r"unexpected response shape \(ValueError: 2 choices for 3 prompts\)"):
        parse_reply(reply, "completions", expected=3)
    with pytest.raises(BackendError, match="unexpected response shape"):
        parse_reply(Reply({"choices": [{"index": 0}]}, URL), "completions")
    chat = {"choices": [{"index": 0, "message": {"content": "x\n"}, "finish_reason": "stop",
                         "logprobs": {"content": [{"token": "x", "logprob": -1.0, "top_logprobs": []},
                                                  {"token": "\n", "logprob": -0.5, "top_logprobs": []}]}}]}
    (choice,) = parse_reply(Reply(chat, URL), "chat").choices
    assert (choice.text, choice.logprobs, choice.tokens, choice.stop_reported) == ("x\n", [-1.0, -0.5], ("x", "\n"), False)


def test_the_client_builds_bodies_and_leaves_unset_fields_out(tokenizer):
    from itscale.lm import CompletionsClient
    from itscale.lm.completions import Sampling

    client = CompletionsClient(URL, MODEL, tokenizer=tokenizer, extra_body={"priority": 1})
    body = client.completions_body(["a", "b"], Sampling(1, 0.0, logprobs=20, keep_stop_strings=False))
    assert body == {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 1, "temperature": 0.0, "logprobs": 20,
                    "add_special_tokens": False, "priority": 1}
    body = client.chat_body("q", "", Sampling(8, 0.5, top_p=0.9, n=2, seed=3, stop=("\n",)))
    assert body["messages"] == [{"role": "user", "content": "q"}] and "continue_final_message" not in body
    assert (body["n"], body["seed"], body["stop"], body["logprobs"]) == (2, 3, ["\n"], True)
    assert body["stop_token_ids"] == list(client.stop_token_ids(("\n",))) and body["include_stop_str_in_output"]


# -- module boundaries ---------------------------------------------------------------------------
def test_the_look_ahead_module_does_not_import_the_generator_module():
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import itscale.lm.lookahead as lookahead

    tree = ast.parse(Path(lookahead.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert not any(name and name.split(".")[-1] == "openai" for name in imported), imported  # not even for types
    code = "import sys, itscale.lm.lookahead; assert 'itscale.lm.openai' not in sys.modules, 'imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_no_module_of_lm_or_rewards_reaches_into_another_objects_private_names():
    """``x._name`` where ``x`` is not ``self``/``cls`` (``gen._body``, ``self.gen._generate``,
    ``client._x``…), and ``from m import _name``: a module uses only others' public names."""
    import ast
    from pathlib import Path

    import itscale

    root = Path(itscale.__file__).parent
    found = []
    for path in sorted([*(root / "lm").glob("*.py"), *(root / "rewards").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.ImportFrom):
                found += [f"{path.relative_to(root)}:{node.lineno}: import {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []


def test_a_stop_inside_a_token_carries_the_rest_of_the_token_into_the_next_step(tokenizer):
    """vLLM cuts the text right after a stop string even when the token that completed it decodes
    to more ('.\\nA' with stop '\\n'); the reply's token strings show the rest, which becomes the
    step's carry, is sent with the context of the next step and begins its text."""
    def respond(req, body, attempt):
        if attempt == 1:
            choice = vllm_choice(0, "4*2=8.\n", stop_reason="\n", logprobs=[-0.1] * 6)
            choice["logprobs"]["tokens"] = ["4", "*", "2", "=", "8", ".\nA"]
            return vllm_reply([choice])
        return vllm_reply([vllm_choice(0, "nswer: 11\n", stop_reason="\n")])

    server = FakeServer(respond)
    gen = generator(server, tokenizer)
    (first,) = asyncio.run(gen.generate_steps([request()]))[0]
    assert (first.text, first.carry, first.tokens, first.finish_reason) == ("4*2=8.\n", "A", 6, "stop")
    req = StepRequest(P1, (first,), 1, request().params, ("\n",))
    (second,) = asyncio.run(gen.generate_steps([req]))[0]
    assert second.text == "Answer: 11\n" and second.carry == ""
    assert server.seen[1][1]["prompt"].endswith("4*2=8.\nA")  # the server continues after the whole token


def test_a_carry_holding_a_stop_string_is_the_next_step_without_a_request(tokenizer):
    server = FakeServer(lambda req, body, attempt: pytest.fail("no request was needed"))
    gen = generator(server, tokenizer)
    req = StepRequest(P1, (Step("4*2=8.\n", carry="\nB"),), 2, request().params, ("\n",))
    out = asyncio.run(gen.generate_steps([req]))[0]
    assert [(s.text, s.carry, s.tokens) for s in out] == [("\n", "B", 0)] * 2


def test_split_carry_cuts_at_the_earliest_stop_across_the_carry_and_the_new_text():
    from itscale.lm.detok import split_carry

    assert split_carry("", "a.\n", "a.\nxy", "stop", ("\n",)) == ("a.\n", "xy", "stop")
    assert split_carry("  ", "b\n", "b\n", "stop", ("\n",)) == ("  b\n", "", "stop")
    assert split_carry("x", "yz", "yz", "length", ("\n",)) == ("xyz", "", "length")
    assert split_carry("\n", "\nq\n", "\nq\n", "stop", ("\n\n",)) == ("\n\n", "q\n", "stop")  # a stop across both
