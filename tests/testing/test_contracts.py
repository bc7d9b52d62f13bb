"""The backend contract suites of :mod:`itscale.testing.contracts`, run over every backend.

Simulated, Hugging Face (embedded policy and PRM, a tiny token classifier), the HTTP
backends against an in-process OpenAI-compatible fake (``httpx.MockTransport``), and
look-ahead over it. The real-vLLM run of the same suites is in
``tests/integration/test_vllm_backend.py``. Each suite is also shown to reject a broken
backend (the last tests).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from dataclasses import replace

import pytest

from itscale.testing import SimulatedTask
from itscale.testing.contracts import (
    Case,
    GeneratorContract,
    PRMContract,
    check_generator,
    check_prm,
)
from itscale.types import SamplingParams, Step, StepRequest, StepScores


def _run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


# -- simulated -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task():
    return SimulatedTask(n_problems=4, seed=3)


@pytest.fixture(scope="module")
def simulated_case(task):
    problem, other = task.problems[0], task.problems[1]

    def solution(p):
        whole = _run(task.policy().generate_steps([StepRequest(p, (), 1, SamplingParams(seed=1), ())]))[0][0]
        steps = [s for s in whole.text.split("\n\n") if s]
        return tuple(s + "\n\n" for s in steps[:-1]) + tuple(steps[-1:])

    return Case(problem=problem, other=other, delimiter="\n\n", steps=solution(problem), other_steps=solution(other),
                max_step_tokens=64, seeded=True, top_logprobs=3)


class TestSimulatedPolicy(GeneratorContract):
    @pytest.fixture
    def generator(self, task):
        return task.policy()

    @pytest.fixture
    def contract_case(self, simulated_case):
        return simulated_case


class TestSimulatedPRM(PRMContract):
    @pytest.fixture
    def prm(self, task):
        return task.prm(noise=0.5, seed=2)

    @pytest.fixture
    def contract_case(self, simulated_case):
        return simulated_case


# -- Hugging Face ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded_policy():
    pytest.importorskip("torch")
    from itscale import load_policy

    return load_policy("embedded", device="cpu", max_batch=8)


@pytest.fixture(scope="module")
def embedded_prm():
    pytest.importorskip("torch")
    from itscale import load_prm

    return load_prm("embedded", device="cpu")


class TestHFGenerator(GeneratorContract):
    @pytest.fixture
    def generator(self, embedded_policy):
        return embedded_policy

    @pytest.fixture
    def contract_case(self):
        return Case(seeded=True, top_logprobs=3)


class TestHFTagPRM(PRMContract):
    @pytest.fixture
    def prm(self, embedded_prm):
        return embedded_prm


class TestHFClassifierPRM(PRMContract):
    @pytest.fixture
    def prm(self):
        pytest.importorskip("torch")
        from conftest_models import make_tokenizer, tiny_token_classifier

        from itscale.rewards import HFClassifierPRM

        tok = make_tokenizer()
        return HFClassifierPRM(tiny_token_classifier(tok, seed=3), tok, separator_token="§", run_in_thread=False)


# -- HTTP, against an OpenAI-compatible fake -----------------------------------------------------
ALPHABET = "0123456789+-*= \n"


def _unit(*parts) -> float:
    """A number in [0, 1) fixed by ``parts``."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") / 2.0**64


class FakeOpenAI:
    """An OpenAI-compatible server in process: ``/models``, ``/completions`` (text from a
    hash of the prompt, the seed and the position, one character per token; stop strings,
    ``max_tokens``, end of sequence, ``n``, prompt lists, ``logprobs: k`` top log-probabilities
    per token, ``stream``, the prompt's next-token top log-probabilities for a PRM) and vLLM's
    ``/pooling`` (a two-label row per token)."""

    def __init__(self, model="fake"):
        self.model, self.requests = model, 0

    def __call__(self, request):
        import httpx

        path = request.url.path
        if path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": self.model, "object": "model"}]})
        body = json.loads(request.content)
        self.requests += 1
        if path.endswith("/pooling"):
            ids = body["input"]
            rows = [[1 - (p := 0.05 + 0.9 * _unit("pool", tuple(ids[: i + 1]))), p] for i in range(len(ids))]
            return httpx.Response(200, json={"data": [{"data": rows}], "usage": {"prompt_tokens": len(ids)}})
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        choices = []
        for p in prompts:
            for j in range(body.get("n", 1)):
                choices.append({"index": len(choices), **self._complete(p, body, j)})
        usage = {"prompt_tokens": sum(len(p) for p in prompts),
                 "completion_tokens": sum(len(c["logprobs"]["tokens"]) for c in choices)}
        if body.get("stream"):  # one event per token, then the usage
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  content=b"".join(_sse(e) for e in _events(choices, usage)) + b"data: [DONE]\n\n")
        return httpx.Response(200, json={"choices": choices, "usage": usage})

    def _complete(self, prompt: str, body: dict, j: int) -> dict:
        if body["max_tokens"] == 1 and body.get("temperature") == 0 and body.get("logprobs", 0) > 1:  # a PRM prompt
            good = 0.05 + 0.9 * _unit("prm", prompt)
            top = {"+": math.log(good * 0.9), "-": math.log((1 - good) * 0.9), "0": math.log(0.05)}
            return {"text": "+", "finish_reason": "length", "logprobs": {
                "tokens": ["+"], "token_logprobs": [top["+"]], "top_logprobs": [top]}}
        seed = body.get("seed", ("unseeded", self.requests))
        text, tokens, finish, reason = "", [], "length", None
        for t in range(body["max_tokens"]):
            if t > 0 and _unit("eos", prompt, seed, j, t) < 0.05:
                tokens.append("")  # the end-of-sequence token: counted, not in the text
                finish = "stop"
                break
            ch = ALPHABET[int(_unit("tok", prompt, seed, j, t) * len(ALPHABET))]
            text += ch
            tokens.append(ch)
            hit = [s for s in body.get("stop") or () if text.endswith(s)]
            if hit:
                finish, reason = "stop", hit[0]
                break
        k = body.get("logprobs", 1)
        return {"text": text, "finish_reason": finish, "stop_reason": reason,
                "logprobs": {"tokens": tokens, "token_logprobs": [-0.7] * len(tokens),
                             "top_logprobs": [_fake_top(tok, k) for tok in tokens]}}


def _fake_top(token: str, k: int) -> dict:
    """The sampled token at -0.7 and ``k - 1`` other characters below it (vLLM sends k + 1 when
    the sampled token is not among the top k; here it always is)."""
    others = [c for c in ALPHABET if c != token][: k - 1]
    return {token: -0.7, **{c: -1.0 - 0.25 * i for i, c in enumerate(others)}}


def _events(choices: list, usage: dict):
    for c in choices:
        lp = c["logprobs"]
        n = len(lp["tokens"])
        for t in range(n):
            last = t == n - 1
            yield {"choices": [{"index": c["index"], "text": lp["tokens"][t],
                                "finish_reason": c["finish_reason"] if last else None,
                                "stop_reason": c["stop_reason"] if last else None,
                                "logprobs": {key: lp[key][t:t + 1] for key in lp}}]}
    yield {"choices": [], "usage": usage}


def _sse(event: dict) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


@pytest.fixture(scope="module")
def zoo_tokenizer():
    pytest.importorskip("transformers")
    from itscale import zoo
    from itscale.lm.loading import load_tokenizer

    return load_tokenizer(zoo.policy_path())


def _pool(server):
    import httpx

    from itscale.lm.http import EndpointPool

    return EndpointPool("http://fake:8000/v1", transport=httpx.MockTransport(server), retries=0)


@pytest.fixture(params=[1, 256], ids=["seeded-requests", "merged-prompts"])
def openai_generator(request, zoo_tokenizer):
    pytest.importorskip("httpx")
    from itscale.lm import OpenAIGenerator

    return OpenAIGenerator(_pool(FakeOpenAI()), "fake", tokenizer=zoo_tokenizer, merge_prompts=request.param)


class TestOpenAIGenerator(GeneratorContract):
    @pytest.fixture
    def generator(self, openai_generator):
        return openai_generator

    @pytest.fixture
    def contract_case(self, openai_generator):
        return Case(seeded=openai_generator.merge_prompts == 1, top_logprobs=3)


class TestLookahead(GeneratorContract):
    @pytest.fixture
    def generator(self, zoo_tokenizer):
        from itscale.lm import Lookahead, OpenAIGenerator

        return Lookahead(OpenAIGenerator(_pool(FakeOpenAI()), "fake", tokenizer=zoo_tokenizer), 8)

    @pytest.fixture
    def contract_case(self):
        return Case(top_logprobs=3)


class TestRemoteTagPRM(PRMContract):
    @pytest.fixture
    def prm(self, zoo_tokenizer):
        from itscale.rewards import RemoteTagPRM

        return RemoteTagPRM(_pool(FakeOpenAI()), "fake", tokenizer=zoo_tokenizer)


class TestRemoteRewardPRM(PRMContract):
    @pytest.fixture
    def prm(self, zoo_tokenizer):
        from itscale.rewards import RemoteRewardPRM

        return RemoteRewardPRM(_pool(FakeOpenAI()), "fake", tokenizer=zoo_tokenizer, separator_token="§")


# -- the suites reject broken backends ----------------------------------------------------------
class _Broken:
    """A generator (or PRM) built from a working one with one rule broken."""

    def __init__(self, inner, how):
        self.inner, self.how, self.capabilities = inner, how, inner.capabilities
        self.calls = 0

    async def generate_steps(self, requests):
        if self.how == "ignores-stop-below":
            requests = [replace(r, params=replace(r.params, stop_below=None)) for r in requests]
        out = await self.inner.generate_steps(requests)
        self.calls += 1
        if self.how == "order":
            return out[::-1]
        if self.how == "k":
            return [steps[:-1] if len(steps) > 1 else steps for steps in out]
        if self.how == "past-stop":  # text after the stop string kept
            return [[replace(s, text=s.text + "1") if s.finish_reason == "stop" else s for s in steps] for steps in out]
        if self.how == "unseeded":
            return [[replace(s, text=f"{self.calls}{s.text}") for s in steps] for steps in out]
        if self.how == "top-ascending":
            return [[replace(s, top_logprobs=s.top_logprobs and tuple(t[::-1] for t in s.top_logprobs))
                     for s in steps] for steps in out]
        if self.how == "top-one-short":  # the last token's tuple missing
            return [[replace(s, top_logprobs=s.top_logprobs and s.top_logprobs[:-1]) for s in steps] for steps in out]
        if self.how == "ignores-stop-below":
            return out
        raise AssertionError(self.how)

    async def score_steps(self, requests):
        out = await self.inner.score_steps(requests)
        if self.how == "order":
            return out[::-1]
        if self.how == "not-causal":  # each score depends on the number of steps
            return [StepScores(tuple(x * (1 - 0.1 / len(s.scores)) for x in s.scores), s.tokens) for s in out]
        if self.how == "batch":  # depends on the call's size
            return [StepScores(tuple(x * (1 - 0.01 * len(requests)) for x in s.scores), s.tokens) for s in out]
        raise AssertionError(self.how)


@pytest.mark.parametrize("how", ["order", "k", "past-stop", "unseeded", "top-ascending", "top-one-short",
                                 "ignores-stop-below"])
def test_the_generator_suite_rejects_a_broken_generator(task, simulated_case, how):
    with pytest.raises(AssertionError):
        _run(check_generator(_Broken(task.policy(), how), simulated_case))
    _run(check_generator(task.policy(), simulated_case))  # the unbroken one passes


@pytest.mark.parametrize("how", ["order", "not-causal", "batch"])
def test_the_prm_suite_rejects_a_broken_prm(task, simulated_case, how):
    with pytest.raises(AssertionError):
        _run(check_prm(_Broken(task.prm(noise=0.5, seed=2), how), simulated_case))
    _run(check_prm(task.prm(noise=0.5, seed=2), simulated_case))


def test_a_step_record_is_checked_field_by_field():
    from itscale.testing.contracts import _check_step

    request = Case().step_request()
    _check_step(Step("3+4=7\n", 6, finish_reason="stop"), request, "ok")
    for bad in (Step("3+4=7\n", 60, finish_reason="stop"),  # more tokens than max_step_tokens
                Step("3+4", 3, finish_reason="stop"),  # 'stop' without its stop string
                Step("3\n4", 3, finish_reason="eos"),  # a stop string inside an 'eos' step
                Step("x", 1, finish_reason="error", error="boom"),  # an error step with text
                Step("x", 1, logprob=0.5, finish_reason="eos"),  # a positive log-probability
                Step("x", 1, finish_reason="done"),
                Step("x", 1, finish_reason="eos", top_logprobs=((-0.1,),)),  # top_logprobs not asked for
                Step("x", 1, finish_reason="low_confidence")):  # low_confidence without stop_below
        with pytest.raises(AssertionError):
            _check_step(bad, request, "bad")
    asked = replace(request, params=SamplingParams(max_step_tokens=12, top_logprobs=2))
    _check_step(Step("3+", 2, finish_reason="length", top_logprobs=((-0.1, -2.0), (-0.5, -0.9))), asked, "ok")
    for top in (None, ((-0.1, -2.0),), ((-0.1, -2.0), (-0.9, -0.5)), ((-0.1, -2.0), (-0.1, -2.0, -3.0)),
                ((-0.1, -2.0), (0.5, -0.9)), ((-0.1, -2.0), (-math.inf, -math.inf))):
        with pytest.raises(AssertionError):  # missing, one short, ascending, more than k, positive, infinite
            _check_step(Step("3+", 2, finish_reason="length", top_logprobs=top), asked, "bad")


class TestCallablePRM(PRMContract):
    """A Python function as a PRM (the arithmetic task's calculator check) keeps the contract."""

    @pytest.fixture
    def prm(self):
        from itscale.rewards import CallablePRM
        from itscale.tasks.arithmetic import calculator_check

        return CallablePRM(calculator_check)
