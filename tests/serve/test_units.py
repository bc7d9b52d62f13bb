"""The server's parts without a server: names and suffixes, keys, request resolution,
admission, the per-request token cap and response building (simulated backends)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from itscale.serve.admission import Admission
from itscale.serve.auth import KeyFileError, KeyRing, env_keys, parse_key_file
from itscale.serve.config import Limits, ServeConfig
from itscale.serve.engine import Engine, Progress, RequestPolicy
from itscale.serve.errors import ApiError
from itscale.serve.jobs import parse_body, resolve
from itscale.serve.methods import ALIASES, parse_model, resolve_method
from itscale.serve.responses import chunks, pieces, response_body
from itscale.strategies import STRATEGIES
from itscale.testing import SimulatedTask
from itscale.types import Capabilities, Problem, SamplingParams, Step, StepFormat, StepRequest

LIMITS = Limits(max_budget=32, max_tokens=100)


def test_every_alias_names_a_registered_method():
    assert set(ALIASES.values()) <= set(STRATEGIES)
    assert resolve_method("PF", "x") == "particle_filtering"
    assert resolve_method("best-of-n", "x") == "best_of_n"
    assert resolve_method("tree-search", "x") == resolve_method("UCT", "x") == "mcts"
    with pytest.raises(ApiError) as err:
        resolve_method("alphazero", "itscale.method")
    assert err.value.param == "itscale.method" and "particle_filtering" in err.value.message


@pytest.mark.parametrize("model, expected", [
    ("tiny", (None, None)),
    ("tiny:pf-16", ("particle_filtering", 16)),
    ("tiny:bon", ("best_of_n", None)),
    ("tiny:particle_gibbs-8", ("particle_gibbs", 8)),
    ("org/model:v2:dvts-4", ("dvts", 4)),
])
def test_model_suffix(model, expected):
    base = "org/model:v2" if model.startswith("org/") else "tiny"
    assert parse_model(model, base) == expected


@pytest.mark.parametrize("model, status", [("gpt-4", 404), ("tinyx", 404), ("tiny:pf-", 400), ("tiny:16", 400),
                                           ("tiny:pf-0", 400), ("tiny:nope-4", 400)])
def test_bad_model_names(model, status):
    with pytest.raises(ApiError) as err:
        parse_model(model, "tiny")
    assert err.value.status == status and err.value.param == "model"


def test_key_file_with_limits_names_and_comments():
    text = ("# comment\n\n"
            "sk-aaaaaaaaaaaa name=alice max_budget=8   # trailing comment\n"
            "sk-bb#bbbbbbbbb max_tokens=64 max_running=2\n")
    a, b = parse_key_file(text, "keys.txt", LIMITS)
    assert (a.name, a.limits) == ("alice", Limits(max_budget=8, max_tokens=100))
    assert (b.name, b.limits) == ("key2", Limits(max_budget=32, max_tokens=64, max_running=2))
    ring = KeyRing([a, b])
    assert ring.match("sk-aaaaaaaaaaaa") is a and ring.match("sk-bb#bbbbbbbbb") is b  # '#' inside a key is kept
    assert ring.match("sk-aaaaaaaaaaab") is None and ring.match("") is None
    assert "sk-aaaa" not in repr(a)  # only a digest is stored


@pytest.mark.parametrize("line, words", [
    ("short", "at least 8 characters"),
    ("sk-aaaaaaaaaaaa max_budget=0", "max_budget"),
    ("sk-aaaaaaaaaaaa budget=8", "expected NAME=VALUE"),
    ("sk-aaaaaaaaaaaa max_tokens=lots", "max_tokens"),
])
def test_key_file_errors_name_the_line(line, words):
    with pytest.raises(KeyFileError) as err:
        parse_key_file("# header\n" + line, "keys.txt", LIMITS)
    assert str(err.value).startswith("keys.txt:2:") and words in str(err.value)


def test_bearer_header_and_environment_keys():
    assert KeyRing.bearer("Bearer abc") == "abc" and KeyRing.bearer("bearer  abc ") == "abc"
    assert KeyRing.bearer("Basic abc") is None and KeyRing.bearer("Bearer") is None and KeyRing.bearer(None) is None
    keys = env_keys(LIMITS, {"ITSCALE_API_KEYS": "sk-one-12345678, sk-two-12345678\nsk-three-1234567"})
    ring = KeyRing(keys)
    assert [ring.match(k).name for k in ("sk-one-12345678", "sk-three-1234567")] == ["itscale_api_keys1",
                                                                                    "itscale_api_keys3"]
    assert KeyRing(env_keys(LIMITS, {})).open


def test_open_server_only_on_loopback():
    from itscale.cli import main

    assert ServeConfig(host="127.0.0.1").loopback and ServeConfig(host="::1").loopback
    assert not ServeConfig(host="0.0.0.0").loopback
    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2  # refused before loading any model


def _resolve(body, kind="chat", limits=LIMITS, **config):
    config = ServeConfig(**{"default_budget": 4, **config})
    return resolve(parse_body(kind, body), job_id="j", config=config, base_model="tiny", limits=limits,
                   key_name="k", prm_enabled=config.prm_enabled)


def _chat(**fields):
    return {"model": "tiny", "messages": [{"role": "user", "content": "Start at 1. Apply in order: +1."}], **fields}


def test_resolution_order_and_defaults():
    job = _resolve(_chat())
    assert (job.method, job.budget, job.max_tokens, job.n) == ("particle_filtering", 4, 100, 1)
    assert job.sampling == SamplingParams(temperature=0.8, top_p=1.0, max_step_tokens=48)
    job = _resolve(_chat(model="tiny:bon-8", max_tokens=20, temperature=0.3, seed=-5))
    assert (job.method, job.budget, job.max_tokens, job.seed) == ("best_of_n", 8, 20, -5)
    assert job.sampling.max_step_tokens == 20 and job.sampling.temperature == 0.3
    job = _resolve(_chat(model="tiny:bon", itscale={"budget": 2, "timeout": 1e9}))
    assert (job.method, job.budget, job.timeout) == ("best_of_n", 2, 300.0)
    assert any("timeout lowered" in w for w in job.warnings)
    assert _resolve(_chat(), limits=Limits(max_budget=2)).budget == 2  # the default never exceeds the key's limit


@pytest.mark.parametrize("body, param, code", [
    (_chat(model="tiny:pf-8", itscale={"budget": 16}), "itscale.budget", "conflicting_budget"),
    (_chat(itscale={"budget": 64}), "itscale.budget", "budget_exceeds_limit"),
    (_chat(model="tiny:pf-64"), "model", "budget_exceeds_limit"),
    (_chat(max_completion_tokens=101), "max_completion_tokens", "max_tokens_exceeds_limit"),
    (_chat(n=5), "n", None),
    (_chat(itscale={"params": {"sampling": 1}}), "itscale.params.sampling", None),
    (_chat(tools=[{"type": "function"}]), "tools", None),
    (_chat(response_format={"type": "json_object"}), "response_format", None),
])
def test_resolution_errors(body, param, code):
    with pytest.raises(ApiError) as err:
        _resolve(body)
    assert (err.value.status, err.value.param, err.value.code) == (400, param, code)


def test_methods_needing_a_prm_are_refused_without_one():
    with pytest.raises(ApiError) as err:
        _resolve(_chat(model="tiny:pf"), prm="none", default_method="greedy")
    assert err.value.param == "model" and err.value.code == "method_unavailable"
    with pytest.raises(ApiError) as err:
        _resolve(_chat(itscale={"method": "bon"}), prm="none", default_method="greedy")
    assert err.value.param == "itscale.method" and err.value.code == "method_unavailable"
    assert _resolve(_chat(model="tiny:sc"), prm="none", default_method="greedy").method == "self_consistency"


def test_completion_prompts():
    assert _resolve({"model": "tiny", "prompt": ["one prompt"]}, "completion").problem == "one prompt"
    for prompt in ([1, 2, 3], ["a", "b"], "  "):
        with pytest.raises(ApiError) as err:
            _resolve({"model": "tiny", "prompt": prompt}, "completion")
        assert err.value.param == "prompt"


def test_admission_bounds_and_releases():
    async def main():
        adm = Admission(max_running=1, max_queue=1)
        first = adm.admit("a", None)
        await first.start()
        second = adm.admit("b", None)
        with pytest.raises(ApiError) as err:
            adm.admit("c", None)
        assert err.value.status == 429 and err.value.headers["Retry-After"] == "2"  # 1 s each × (1 waiting + 1)
        assert (adm.running, len(adm.waiting), second.position) == (1, 1, 0)
        waiter = asyncio.create_task(second.start())
        await asyncio.sleep(0)
        assert not waiter.done()  # no slot yet
        first.release()
        first.release()  # idempotent
        await waiter
        assert (adm.running, len(adm.waiting)) == (1, 0)
        second.release()
        assert (adm.running, len(adm.waiting), adm.per_key) == (0, 0, {})

        adm = Admission(max_running=1, max_queue=5)
        await adm.admit("b", None).start()  # holds the only slot
        third = adm.admit("a", 1)
        with pytest.raises(ApiError) as err:
            adm.admit("a", 1)
        assert err.value.code == "key_busy"
        assert adm.admit("c", 1).key == "c"  # other keys still get in
        cancelled = asyncio.create_task(third.start())
        await asyncio.sleep(0)
        cancelled.cancel()  # cancelled while waiting for a slot
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        third.release()
        assert "a" not in adm.per_key and third.number not in adm.waiting and adm.running == 1

    asyncio.run(main())


class CharPolicy:
    """A fake backend: every step is ``length`` characters (one token each) unless cut
    by ``max_step_tokens``; records what it was asked."""

    capabilities = Capabilities()

    def __init__(self, length: int):
        self.length, self.asked = length, []

    async def generate_steps(self, requests):
        out = []
        for r in requests:
            self.asked.append(r.params.max_step_tokens)
            n = min(self.length, r.params.max_step_tokens)
            reason = "length" if n < self.length else "stop"
            out.append([Step("x" * n, n, finish_reason=reason) for _ in range(r.k)])
        return out


def test_request_policy_caps_each_solution():
    inner = CharPolicy(length=6)
    policy = RequestPolicy(inner, max_tokens=10, progress=Progress())
    problem = Problem("p", "q")
    params = SamplingParams(max_step_tokens=48)

    def ask(steps, stop=("\n",)):
        return asyncio.run(policy.generate_steps([StepRequest(problem, tuple(steps), 2, params, stop)]))[0]

    first = ask([])
    assert [s.tokens for s in first] == [6, 6] and first[0].finish_reason == "stop"
    second = ask([first[0]])  # 4 tokens left: cut, and the particle ends
    assert inner.asked[-1] == 4 and second[0].tokens == 4 and second[0].finish_reason == "eos"
    assert policy.cut(second[0]) and not policy.cut(first[0])
    calls = len(inner.asked)
    third = ask([first[0], Step("y" * 4, 4)])  # already at the cap: no backend call
    assert len(inner.asked) == calls and third[0].text == "" and third[0].finish_reason == "eos"
    assert policy.cut(third[0])
    whole = ask([], stop=())  # a whole solution keeps its own finish reason
    assert inner.asked[-1] == 10 and whole[0].finish_reason == "stop"
    assert policy.progress.policy_calls == 3 and policy.progress.generated_tokens == 12 + 8 + 12


def test_engine_responses_on_simulated_backends():
    task = SimulatedTask(n_problems=1, seed=3)
    engine = Engine(task.policy(), task.prm(noise=0.5), StepFormat(delimiter=task.delimiter), "sim")
    problem = task.problems[0]

    def run(**fields):
        job = resolve(parse_body("chat", {"model": "sim", "messages": [{"role": "user", "content": problem.prompt}],
                                          **fields}), job_id=problem.id, config=ServeConfig(), base_model="sim",
                      limits=LIMITS, key_name="k", prm_enabled=True)
        prepared = engine.prepare(job)
        return prepared, asyncio.run(engine.run(prepared))

    prepared, result = run(model="sim:bon-16", n=4, seed=1, temperature=1.5)
    body = response_body(prepared, result, queued_s=0.0)
    texts = [c["message"]["content"] for c in body["choices"]]
    assert texts[0] == result.solution and len(set(texts)) == len(texts) == 4
    weight = {}
    for c in result.candidates:
        weight[c.text] = weight.get(c.text, 0) + c.weight
    assert [weight[t] for t in texts[1:]] == sorted((weight[t] for t in texts[1:]), reverse=True)
    assert body["usage"]["completion_tokens"] == result.cost.generated_tokens
    assert body["usage"]["total_tokens"] == sum(body["usage"][k] for k in ("prompt_tokens", "completion_tokens",
                                                                            "prm_tokens"))
    again = response_body(*run(model="sim:bon-16", n=4, seed=1, temperature=1.5), queued_s=0.0)
    assert again["itscale"]["candidates"] == body["itscale"]["candidates"]

    prepared, result = run(model="sim:pf-4", seed=2, stream=True, stream_options={"include_usage": True})
    streamed = list(chunks(prepared, result, 0.0, task.delimiter))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in streamed if c["choices"])
    assert text == result.solution
    assert streamed[-1]["choices"] == [] and streamed[-1]["usage"]["completion_tokens"] == result.cost.generated_tokens
    assert "itscale" in streamed[-2] and streamed[-2]["choices"][0]["finish_reason"] == "stop"


def test_pieces_join_to_the_text():
    for text in ("a\nb\nc", "a\nb\n", "", "\n\n", "abc"):
        assert "".join(pieces(text, "\n")) == text


def test_job_is_immutable():
    job = _resolve(_chat())
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.budget = 1


class SlowEcho:
    """A fake local backend: one call at a time, echoes its requests; ``bad`` items fail the call."""

    capabilities = Capabilities()

    def __init__(self):
        self.calls, self.in_flight = [], 0

    async def generate_steps(self, requests):
        assert self.in_flight == 0, "two calls in flight"
        self.in_flight += 1
        self.calls.append(list(requests))
        try:
            await asyncio.sleep(0.01)
            if "bad" in requests:
                raise RuntimeError("bad request")
            return [f"out-{r}" for r in requests]
        finally:
            self.in_flight -= 1


def test_a_local_backend_merges_calls_that_arrive_during_a_call():
    from itscale.strategies.batching import BatchedGenerator, Coalescer

    async def main():
        inner = SlowEcho()
        coalescer = Coalescer()  # callers that are not members: each call is sent as soon as it may be
        merged = BatchedGenerator(inner, coalescer)
        first = asyncio.create_task(merged.generate_steps(["a"]))
        await asyncio.sleep(0.001)  # "a" is in flight
        rest = [asyncio.create_task(merged.generate_steps([x, x + "2"])) for x in ("b", "c", "d")]
        assert await first == ["out-a"]
        assert await asyncio.gather(*rest) == [[f"out-{x}", f"out-{x}2"] for x in ("b", "c", "d")]
        assert inner.calls == [["a"], ["b", "b2", "c", "c2", "d", "d2"]] and coalescer.calls == {"policy": 2}
        # a failing merged call is retried per caller: only the bad one fails
        first = asyncio.create_task(merged.generate_steps(["e"]))
        await asyncio.sleep(0.001)
        ok, bad = (asyncio.create_task(merged.generate_steps(x)) for x in (["f"], ["bad"]))
        await first
        assert await ok == ["out-f"]
        with pytest.raises(RuntimeError, match="bad request"):
            await bad
        # a caller cancelled while waiting is left out of the next call
        first = asyncio.create_task(merged.generate_steps(["g"]))
        await asyncio.sleep(0.001)
        gone, kept = (asyncio.create_task(merged.generate_steps(x)) for x in (["h"], ["i"]))
        await asyncio.sleep(0)
        gone.cancel()
        await first
        assert await kept == ["out-i"] and inner.calls[-1] == ["i"]

    asyncio.run(main())


@pytest.mark.parametrize("name", ["replica-a", "pod-7.serve:8000", "r/1@eu+x=y", "x" * 128])
def test_replica_names_that_fit_a_label_and_a_header(name):
    assert ServeConfig(replica_id=name).replica() == ServeConfig(replica_id=name).replica(port=9) == name


@pytest.mark.parametrize("name, words", [("", "empty"), ("a b", "' '"), ('a"b', "'\"'"), ("a'b", "\"'\""),
                                         ("a\\b", "'\\\\'"), ("a`b", "'`'"), ("a\nb", "'\\n'"),
                                         ("r\u00e9plica", "'\u00e9'"), ("x" * 129, "at most 128")])
def test_replica_names_that_are_refused(name, words, capsys):
    from pydantic import ValidationError

    from itscale.cli import main

    with pytest.raises(ValidationError) as err:
        ServeConfig(replica_id=name)
    assert "replica_id" in str(err.value) and words in str(err.value)
    assert main(["serve", "--replica-id", name, "--port", "1"]) == 2  # refused before loading any model
    assert "--replica-id:" in capsys.readouterr().err


def test_the_default_replica_name_is_the_host_name_and_the_port():
    import socket

    from itscale.serve.config import default_replica, replica_problem

    assert ServeConfig(port=8123).replica() == default_replica(8123) == f"{socket.gethostname()}:8123"
    assert ServeConfig(port=0).replica(port=41234).endswith(":41234")  # the port it got
    assert default_replica(80, 'gpu box "7"') == "gpu-box--7-:80"  # spaces and quotes replaced
    assert replica_problem(default_replica(80, "\u00e9" * 300)) is None


def test_the_metrics_page_labels_every_sample_with_the_replica_and_parses_back():
    from itscale.serve.metrics import Metrics, Upstream, parse, parse_samples

    m = Metrics()
    m.count("ok")
    url = 'http://h:1/v1"\\\n'  # (a label value the text format must escape)
    text = m.render(2, 1, 30, 4, {"policy": 3}, replica="r-1", upstream=[Upstream("policy", url, 5, 1, 2)])
    samples = parse_samples(text)
    assert len(samples) == 1 + 7 + 2 + 7 + 1 + 3
    assert all(labels["replica"] == "r-1" for _, labels, _ in samples)
    assert ("itscale_replica_info", {"replica": "r-1"}, 1.0) in samples
    assert ("itscale_upstream_requests_total", {"replica": "r-1", "backend": "policy", "endpoint": url}, 5.0) in samples
    keys = parse(text, drop=("replica",))
    assert keys['itscale_requests_total{outcome="ok"}'] == 1 and keys["itscale_requests_running"] == 2
    assert keys['itscale_upstream_in_flight{backend="policy",endpoint="http://h:1/v1\\"\\\\\\n"}'] == 2
    assert parse(text)['itscale_requests_total{replica="r-1",outcome="ok"}'] == 1
    for broken in ('x{replica="r-1} 1', "x{replica=r} 1", "x 1 2 3", "x{a=\"1\"}"):
        with pytest.raises(ValueError):
            parse_samples(broken)


def test_the_engine_reports_the_load_on_each_url_of_an_http_backend():
    from itscale.lm import Lookahead, OpenAIGenerator
    from itscale.serve.engine import http_pool, public_url

    policy = OpenAIGenerator(["http://u:secret@h1:8000/v1?key=s#f", "http://h2:8000", "http://h2:8000/v1/"], "m",
                             api="completions")
    pool = policy.http
    pool.sent, pool.failed, pool.in_flight = [3, 1, 2], [1, 0, 1], [0, 1, 0]
    engine = Engine(Lookahead(policy, 8), None, StepFormat(delimiter="\n"), "m")  # (look-ahead wraps the generator)
    assert http_pool(Lookahead(policy, 8)) is http_pool(policy) is pool
    assert [tuple(u) for u in engine.upstream()] == [("policy", "http://h1:8000/v1", 3, 1, 0),
                                                     ("policy", "http://h2:8000/v1", 3, 1, 1)]  # the same URL, summed
    assert public_url("https://a:b@h/v1?x=1#y") == "https://h/v1"
    task = SimulatedTask(n_problems=1, seed=3)
    assert Engine(task.policy(), task.prm(), StepFormat(delimiter=task.delimiter), "sim").upstream() == []
