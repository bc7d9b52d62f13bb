"""Usage that does not depend on other keys' traffic, and ``--cache-isolation per-key``.

Real ``itscale serve`` processes through the ``openai`` client: the session's main server
(the default, a shared cache) and one started here with ``--cache-isolation per-key``; then
the per-request accounting (:class:`~itscale.serve.engine.RequestPRM`,
:class:`~itscale.serve.engine.RequestPolicy`) against hand counts for the embedded PRM's
character-level tokenizer."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys

import openai
import pytest

from itscale.serve.config import ServeConfig
from itscale.serve.engine import Engine, Progress, RequestPolicy, RequestPRM
from itscale.types import Problem, SamplingParams, ScoreRequest, Step, StepFormat, StepRequest, StepScores

from .conftest import ALICE, SOLO, ServeProcess

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("serve")]

KEY_A = "sk-test-tenant-a-0123456789"
KEY_B = "sk-test-tenant-b-0123456789"


def ask(url: str, key: str, prompt: str) -> dict:
    """The usage and cost of one particle-filtering request (budget 4, seed 11), as JSON."""
    with openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="tiny:pf-4", messages=[{"role": "user", "content": prompt}], seed=11, max_tokens=64)
        body = raw.http_response.json()
        parsed = raw.parse()  # (the openai client reads it)
    assert parsed.usage.total_tokens == body["usage"]["total_tokens"]
    return body


@pytest.fixture(scope="module")
def per_key_server(tmp_path_factory):
    keys = tmp_path_factory.mktemp("isolation") / "keys.txt"
    keys.write_text(f"{KEY_A} name=tenant-a\n{KEY_B} name=tenant-b\n")
    keys.chmod(0o600)
    with ServeProcess("per-key", ["--cache-isolation", "per-key", "--api-key-file", str(keys),
                                   "--request-timeout", "120"]).running() as server:
        yield server


def test_usage_on_a_shared_cache_does_not_depend_on_another_keys_earlier_request(server):
    prompt = "Start at 6. Apply in order: +3, *2, -4."  # asked by no other test: a cold cache at first
    first = ask(server.url, ALICE, prompt)
    second = ask(server.url, SOLO, prompt)  # another key, the same request: every cache now holds it
    assert second["itscale"]["candidates"] == first["itscale"]["candidates"]  # (the same search)
    assert second["usage"] == first["usage"]
    assert first["usage"]["prm_tokens"] > 0  # before: the second one read 0 PRM tokens
    assert "prompt_tokens_details" not in first["usage"]  # cache hits would tell the other key's traffic
    for body in (first, second):
        cost = body["itscale"]["cost"]
        assert cost["prefilled_tokens"] is None and cost["prm_tokens"] == body["usage"]["prm_tokens"]
    assert ask(server.url, ALICE, prompt)["usage"] == first["usage"]  # and again


def test_per_key_isolation_keeps_each_keys_cache_to_itself(per_key_server):
    url, prompt = per_key_server.url, "Start at 6. Apply in order: +3, *2, -4."
    a1 = ask(url, KEY_A, prompt)
    b1 = ask(url, KEY_B, prompt)
    a2 = ask(url, KEY_A, prompt)
    assert b1["usage"] == a1["usage"]  # b's first request ran on a cache as cold as a's first
    assert b1["itscale"]["candidates"] == a1["itscale"]["candidates"]
    assert a1["usage"]["prompt_tokens_details"]["cached_tokens"] < a1["usage"]["prompt_tokens"]
    # a's second request reuses a's own cache: more cached tokens, the same usage otherwise
    details = a2["usage"].pop("prompt_tokens_details")
    assert details["cached_tokens"] > a1["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert a2["usage"] == {k: v for k, v in a1["usage"].items() if k != "prompt_tokens_details"}
    for body in (a1, b1):
        cost = body["itscale"]["cost"]
        cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cost["prefilled_tokens"] == cost["prompt_tokens"] - cached


def test_the_option_is_checked_at_start_up():
    assert ServeConfig().cache_isolation == "shared"
    assert ServeConfig(cache_isolation="per-key").cache_isolation == "per-key"
    with pytest.raises(ValueError):
        ServeConfig(cache_isolation="per-user")
    run = subprocess.run([sys.executable, "-m", "itscale.cli", "serve", "--cache-isolation", "per-user"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--cache-isolation" in run.stderr and "per-key" in run.stderr
    helped = subprocess.run([sys.executable, "-m", "itscale.cli", "serve", "--help"], capture_output=True, text=True,
                            timeout=60).stdout
    assert "--cache-isolation" in helped and "per-key" in helped


# -- the per-request accounting ---------------------------------------------------------------------

PROBLEM = Problem("p", "Start at 6. Apply in order: +3, *2.")


@pytest.fixture(scope="module")
def embedded_prm():
    pytest.importorskip("torch")
    from itscale import zoo
    from itscale.rewards import HFTagPRM

    return HFTagPRM.from_pretrained(zoo.prm_path(), delimiter="\n", device="cpu", run_in_thread=False)


def by_hand_prompt(prompt: str) -> int:
    """The embedded PRM reads <|user|> prompt <|end|> <|assistant|>: three special tokens and one per character."""
    return 3 + len(prompt)


def by_hand_step(step: str) -> int:
    """A step without its delimiter, one token per character, then the tag ``§`` and the separator ``\\n``."""
    return len(step.removesuffix("\n")) + 2


def score(prm, calls):
    return [asyncio.run(prm.score_steps([ScoreRequest(PROBLEM, steps) for steps in call])) for call in calls]


CALLS = [
    [("6+3=9\n",), ("6+3=8\n",)],  # round 1: two particles
    [("6+3=9\n", "9*2=18\n"), ("6+3=9\n", "9*2=18\n"), ("6+3=9\n", "9*2=17\n")],  # a resampled copy, a sibling
    [("6+3=9\n", "9*2=18\n", "Answer: 18")],
    [("6+3=8\n",)],  # a prefix it has already scored
]
EXPECTED = [
    [by_hand_prompt(PROBLEM.prompt) + by_hand_step("6+3=9\n"), by_hand_step("6+3=8\n")],
    [by_hand_step("9*2=18\n"), 0, by_hand_step("9*2=17\n")],
    [by_hand_step("Answer: 18")],
    [0],
]


def test_a_request_is_charged_its_prm_input_as_if_it_ran_alone(embedded_prm):
    embedded_prm.clear_cache()
    first = RequestPRM(embedded_prm, Progress(), encoder=embedded_prm.encoder)
    out = score(first, CALLS)
    assert [[s.tokens for s in call] for call in out] == EXPECTED
    assert first.progress.prm_tokens == sum(map(sum, EXPECTED)) == 38 + 5 + 2 + 7 + 8 + 8 + 12  # = 80
    # alone on a cold cache the PRM itself computed exactly that
    embedded_prm.clear_cache()
    assert [[s.tokens for s in call] for call in score(embedded_prm, CALLS)] == EXPECTED
    # another request on the now warm PRM (which computes nothing: 0 tokens) is charged the same
    assert all(s.tokens == 0 for call in score(embedded_prm, CALLS) for s in call)
    second = RequestPRM(embedded_prm, Progress(), encoder=embedded_prm.encoder)
    assert [[s.tokens for s in call] for call in score(second, CALLS)] == EXPECTED


class StubPRM:
    """Records the requests it gets; a step containing 'bad' scores NaN; reports ``tokens=1000``."""

    def __init__(self):
        self.seen: list[ScoreRequest] = []

    async def score_steps(self, requests):
        self.seen += requests
        return [StepScores(tuple(math.nan if "bad" in s else 0.5 for s in r.steps), 1000) for r in requests]


def test_a_step_that_failed_is_charged_when_it_is_scored(embedded_prm):
    stub = StubPRM()
    view = RequestPRM(stub, Progress(), encoder=embedded_prm.encoder, namespace="alice")
    (out,) = asyncio.run(view.score_steps([ScoreRequest(PROBLEM, ("bad\n",))]))
    assert out.tokens == 0  # nothing scored, nothing charged (not even the prompt)
    (out,) = asyncio.run(view.score_steps([ScoreRequest(PROBLEM, ("1+1=2\n", "bad\n"))]))
    assert out.tokens == by_hand_prompt(PROBLEM.prompt) + by_hand_step("1+1=2\n")
    assert {r.cache_namespace for r in stub.seen} == {"alice"}  # the namespace goes to the PRM
    plain = RequestPRM(StubPRM(), Progress())  # no encoder (a simulated PRM): the PRM's own count
    assert asyncio.run(plain.score_steps([ScoreRequest(PROBLEM, ("1\n",))]))[0].tokens == 1000
    assert plain.inner.seen[0].cache_namespace is None


class StubPolicy:
    def __init__(self):
        self.seen: list[StepRequest] = []

    async def generate_steps(self, requests):
        self.seen += requests
        return [[Step("1\n", 2, prompt_tokens=10, prefilled_tokens=3)] * r.k for r in requests]


def test_the_policy_view_sets_the_namespace_and_hides_prefill_of_a_shared_cache():
    req = StepRequest(PROBLEM, (), 1, SamplingParams(max_step_tokens=8), ("\n",))
    shared = RequestPolicy(StubPolicy(), 64, Progress(), report_prefill=False)
    ((step,),) = asyncio.run(shared.generate_steps([req]))
    assert step.prefilled_tokens is None and step.prompt_tokens == 10 and shared.inner.seen[0].cache_namespace is None
    mine = RequestPolicy(StubPolicy(), 64, Progress(), namespace="alice")
    ((step,),) = asyncio.run(mine.generate_steps([req]))
    assert step.prefilled_tokens == 3 and mine.inner.seen[0].cache_namespace == "alice"


@pytest.mark.parametrize("isolation, namespace, prefill", [("shared", None, False), ("per-key", "alice", True)])
def test_the_engine_takes_the_namespace_from_the_key_name(isolation, namespace, prefill):
    from itscale.serve.config import Limits
    from itscale.serve.jobs import parse_body, resolve
    from itscale.testing import SimulatedTask

    task = SimulatedTask(n_problems=1, seed=0)
    engine = Engine(task.policy(), task.prm(), StepFormat(delimiter=task.delimiter), "sim", cache_isolation=isolation)
    job = resolve(parse_body("chat", {"model": "sim:pf-4", "messages": [{"role": "user", "content": "x"}]}),
                  job_id="j", config=ServeConfig(), base_model="sim", limits=Limits(), key_name="alice",
                  prm_enabled=True)
    run = engine.prepare(job)
    assert run.policy.namespace == namespace and run.policy.report_prefill is prefill
    with pytest.raises(ValueError):
        Engine(task.policy(), None, StepFormat(), "sim", cache_isolation="per-user")
