"""Races (``itscale.protocols.Racer``): HFGenerator on the embedded policy, OpenAIGenerator
against mocked streamed replies, and the look-ahead wrapper passing races on.

HF: the race's winner is exactly the shortest of the k samples ``generate_steps`` draws with the
same seed (ties to the lowest index), and the decode really stopped there (its forward passes and
``spent_tokens = k · L_min``). HTTP: the first stream to complete wins, the others are cancelled
and their connections closed (the real-server side is in ``tests/integration/test_vllm_backend.py``).
"""

from __future__ import annotations

import asyncio
import json
import math
import random

import pytest

torch = pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
pytest.importorskip("transformers")

from itscale.lm import EndpointPool, HFGenerator, Lookahead, OpenAIGenerator  # noqa: E402
from itscale.lm.completions import parse_reply, streamed_tokens  # noqa: E402
from itscale.lm.http import Reply, merge_events  # noqa: E402
from .conftest import needs_zoo, sse  # noqa: E402
from itscale.protocols import Racer  # noqa: E402
from itscale.tasks import arithmetic  # noqa: E402
from itscale.types import Problem, SamplingParams, Step, StepRequest  # noqa: E402

#: Outside the embedded policy's task: its whole solutions run from about 20 to past 120 tokens,
#: so the samples of one request differ in length (a race has something to save).
NUMBERS = Problem("numbers", "1 2 3 4 5 6 7 8 9")
PROBLEM = arithmetic.eval_set("medium")[0]


def whole(k: int, seed: int, max_tokens: int = 120, problem: Problem = NUMBERS) -> StepRequest:
    return StepRequest(problem, (), k, SamplingParams(temperature=1.0, max_step_tokens=max_tokens, seed=seed), ())


def sample(step: Step) -> tuple:
    """What identifies a sample (prompt accounting aside)."""
    return step.text, step.tokens, step.logprob, step.finish_reason, step.carry, step.error


# -- HFGenerator ------------------------------------------------------------------------------
def chunked_cost(lengths: list[int], max_batch: int) -> int:
    """``spent_tokens`` as HFGenerator.race documents it: chunks of ``max_batch`` rows decoded one
    after another, each stopped at its own first finish or at the fewest tokens an earlier row
    finished with."""
    best, spent = math.inf, 0
    for start in range(0, len(lengths), max_batch):
        chunk = lengths[start:start + max_batch]
        stop = min(best, min(chunk))
        spent += len(chunk) * stop
        best = stop
    return spent


@needs_zoo
@pytest.mark.parametrize("seed", [0, 1, 3])
def test_hf_race_wins_with_the_shortest_sample_generate_steps_draws(hf, seed):
    k = 6
    full = hf.generate_steps_sync([whole(k, seed)])[0]
    lengths = [s.tokens for s in full]
    assert len(set(lengths)) > 1  # the premise: the samples differ in length
    passes, generated = hf.stats.forward_passes, hf.stats.generated_tokens
    out = hf.race_sync(whole(k, seed))
    shortest = min(lengths)
    assert out.index == lengths.index(shortest)  # argmin, the lowest index on ties
    assert sample(out.winner) == sample(full[out.index])
    assert out.winner.prompt_tokens == full[0].prompt_tokens > 0  # the request's prompt, on the winner
    assert out.spent_tokens == k * shortest < sum(lengths)
    assert out.cancelled == sum(n > shortest for n in lengths)
    assert hf.stats.generated_tokens - generated == out.spent_tokens
    # the decode stopped at the winner: at most one pass per token of the shortest sample (the
    # context was cached), where decoding every sample to its end takes one per token of the longest
    assert hf.stats.forward_passes - passes <= shortest < max(lengths) - 1


@needs_zoo
def test_hf_race_of_a_step_request_and_ties_to_the_lowest_index(hf):
    first = arithmetic.reference_steps(*arithmetic.parse_prompt(PROBLEM.prompt))[0] + arithmetic.DELIMITER
    ties = winners = 0
    for seed in (0, 1):
        request = StepRequest(PROBLEM, (Step(first),), 8, SamplingParams(temperature=2.0, max_step_tokens=30, seed=seed),
                              (arithmetic.DELIMITER,))
        full = hf.generate_steps_sync([request])[0]
        lengths = [s.tokens for s in full]
        out = hf.race_sync(request)
        assert out.index == lengths.index(min(lengths))
        assert sample(out.winner) == sample(full[out.index]) and out.winner.finish_reason == "stop"
        assert out.spent_tokens == 8 * min(lengths)
        ties += lengths.count(min(lengths)) > 1
        winners += out.index > 0
    assert ties and winners  # the seeds cover a tie for the shortest and a winner other than sample 0


@needs_zoo
def test_hf_race_with_more_samples_than_a_batch_decodes_chunk_by_chunk(hf):
    small = HFGenerator(hf.model, hf.tokenizer, max_batch=2, run_in_thread=False)
    full = small.generate_steps_sync([whole(6, 0)])[0]
    lengths = [s.tokens for s in full]
    out = small.race_sync(whole(6, 0))
    assert out.index == lengths.index(min(lengths)) and sample(out.winner) == sample(full[out.index])
    assert out.spent_tokens == chunked_cost(lengths, 2)
    # the premise: a later chunk stops at an earlier chunk's winner, before its own first finish
    assert chunked_cost(lengths, 2) < sum(2 * min(lengths[i:i + 2]) for i in (0, 2, 4))
    assert 6 * min(lengths) <= out.spent_tokens < sum(lengths)


@needs_zoo
def test_hf_race_of_one_sample_is_that_sample(hf):
    (full,) = hf.generate_steps_sync([whole(1, 5)])[0]
    threaded = HFGenerator(hf.model, hf.tokenizer, run_in_thread=True)
    for out in (hf.race_sync(whole(1, 5)), asyncio.run(threaded.race(whole(1, 5)))):
        assert (out.index, out.spent_tokens, out.cancelled) == (0, full.tokens, 0)
        assert sample(out.winner) == sample(full) and out.winner.prompt_tokens == full.prompt_tokens


@needs_zoo
def test_hf_race_where_every_sample_reaches_the_token_limit(hf):
    full = hf.generate_steps_sync([whole(4, 0, max_tokens=6)])[0]
    assert all(s.finish_reason == "length" and s.tokens == 6 for s in full)
    out = hf.race_sync(whole(4, 0, max_tokens=6))
    assert (out.index, out.spent_tokens, out.cancelled) == (0, 24, 0)  # all four finished at once
    assert sample(out.winner) == sample(full[0])


@needs_zoo
def test_hf_race_failures(hf):
    with pytest.raises(ValueError, match="k >= 1"):
        hf.race_sync(whole(0, 0))
    with pytest.raises(ValueError, match="k >= 1"):
        asyncio.run(hf.race(whole(0, 0)))
    # a context with no room left: every sample fails, the winner is the error step generate_steps gives
    crowded = whole(3, 0, problem=Problem("long", "1+" * 200))
    out = hf.race_sync(crowded)
    (expected, *_) = hf.generate_steps_sync([crowded])[0]
    assert out.winner.failed and out.winner.error == expected.error and "positions" in out.winner.error
    assert (out.index, out.spent_tokens, out.cancelled) == (0, 0, 0)
    # a carry that holds a stop string is the step already: nothing generated
    carried = StepRequest(PROBLEM, (Step("1+1=2\n", carry="3\n"),), 4, SamplingParams(seed=0), ("\n",))
    out = hf.race_sync(carried)
    assert (out.winner.text, out.winner.tokens, out.index, out.spent_tokens) == ("3\n", 0, 0, 0)


@needs_zoo
def test_hf_races_decoded_together_give_each_requests_own_race(hf):
    """``race_many``: several races in one lock-step batch, each ended by its own first finish;
    outcome i equals the race of request i alone, and the batch takes fewer forward passes than
    the races one after another. With ``max_batch`` 4, a request of 6 samples is decoded alone,
    chunk by chunk, as ``race`` does it; the crowded context fails only its own race."""
    crowded = whole(3, 0, problem=Problem("long", "1+" * 200))
    step = StepRequest(PROBLEM, (), 3, SamplingParams(temperature=1.5, max_step_tokens=30, seed=4),
                       (arithmetic.DELIMITER,))
    requests = [whole(3, 0), whole(2, 7, problem=PROBLEM), crowded, whole(6, 2), step, whole(1, 9)]
    for gen in (hf, HFGenerator(hf.model, hf.tokenizer, max_batch=4, run_in_thread=False)):
        passes = gen.stats.forward_passes
        alone = [gen.race_sync(r) for r in requests]
        one_by_one = gen.stats.forward_passes - passes
        passes = gen.stats.forward_passes
        together = gen.race_many_sync(requests)
        assert gen.stats.forward_passes - passes < one_by_one
        for a, t in zip(alone, together):  # (the log-probability to the last bits of another batch shape)
            assert sample(t.winner)[:2] + sample(t.winner)[3:] == sample(a.winner)[:2] + sample(a.winner)[3:]
            assert t.winner.logprob == pytest.approx(a.winner.logprob, abs=1e-4)
            assert (t.index, t.spent_tokens, t.cancelled) == (a.index, a.spent_tokens, a.cancelled)
        assert together[2].winner.failed and not any(t.winner.failed for i, t in enumerate(together) if i != 2)
    assert asyncio.run(HFGenerator(hf.model, hf.tokenizer, run_in_thread=True).race_many(requests[:2]))[1].index \
        == alone[1].index
    with pytest.raises(ValueError, match="k >= 1"):
        hf.race_many_sync([whole(2, 0), whole(0, 0)])


# -- OpenAIGenerator against streamed replies ------------------------------------------------------
URL = "http://vllm-a:8000/v1"
MODEL = "policy"




def token_event(token: str, finish: str | None = None, stop_reason=None) -> dict:
    text = "" if token == "<|end|>" else token
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish, "stop_reason": stop_reason,
                         "logprobs": {"tokens": [token], "token_logprobs": [-0.25], "text_offset": [0],
                                      "top_logprobs": [{token: -0.25}]}}], "usage": None}


class SlowStream(httpx.AsyncByteStream):
    """One streamed completion, a token every ``delay`` seconds; records what it sent and
    whether the client closed it before the end."""

    def __init__(self, tokens: list[str], delay: float, log: dict):
        self.tokens, self.delay, self.log = tokens, delay, log

    async def __aiter__(self):
        for i, token in enumerate(self.tokens):
            await asyncio.sleep(self.delay)
            last = i == len(self.tokens) - 1
            finish = ("stop" if token in ("\n", "<|end|>") else "length") if last else None
            stop = "\n" if last and token == "\n" else None
            self.log["sent"] += 1
            yield sse(token_event(token, finish, stop))
        yield sse({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": len(self.tokens),
                                             "total_tokens": 11 + len(self.tokens)}})
        yield b"data: [DONE]\n\n"
        self.log["completed"] = True

    async def aclose(self) -> None:
        self.log["closed"] = True


class StreamServer:
    """A MockTransport handler: sample ``seed - base`` streams ``samples[j]`` (a list of tokens),
    or answers ``samples[j]`` when it is an int (an HTTP error status)."""

    def __init__(self, samples: list, base: int = 100, delay: float = 0.01):
        self.samples, self.base, self.delay = samples, base, delay
        self.logs = [{"sent": 0, "closed": False, "completed": False} for _ in samples]
        self.bodies: list[dict] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        j = body["seed"] - self.base
        answer = self.samples[j]
        if isinstance(answer, int):
            return httpx.Response(answer, json={"error": {"message": f"injected {answer}"}})
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              stream=SlowStream(answer, self.delay, self.logs[j]))


def racer(server, tokenizer, **pool_kw) -> OpenAIGenerator:
    pool = EndpointPool(URL, transport=httpx.MockTransport(server), rng=random.Random(0), backoff_base=0.001,
                        **pool_kw)
    return OpenAIGenerator(pool, MODEL, tokenizer=tokenizer, merge_prompts=1)


def http_request(k: int, seed: int = 100, stop=("\n",)) -> StepRequest:
    return StepRequest(PROBLEM, (), k, SamplingParams(temperature=1.0, max_step_tokens=64, seed=seed), stop)


def test_http_race_first_stream_wins_and_the_others_are_cancelled_and_closed(tokenizer):
    long = list("12+34=46\n")  # 9 tokens
    server = StreamServer([long, list("5*6\n"), long, long])
    gen = racer(server, tokenizer)
    assert isinstance(gen, Racer)
    out = asyncio.run(gen.race(http_request(4)))
    assert out.index == 1 and out.winner.text == "5*6\n" and out.winner.finish_reason == "stop"
    assert out.winner.tokens == 4 and out.winner.logprob == pytest.approx(-1.0) and out.winner.error is None
    assert out.winner.prompt_tokens == 4 * 11 and out.winner.prefilled_tokens is None  # k requests sent the context
    # every request: n=1, streamed with usage, seeded seed + j
    assert sorted(b["seed"] for b in server.bodies) == [100, 101, 102, 103]
    assert all(b["n"] == 1 and b["stream"] and b["stream_options"] == {"include_usage": True} for b in server.bodies)
    # the losers were stopped half-way and their connections closed; spent counts what was streamed
    losers = [server.logs[j] for j in (0, 2, 3)]
    assert all(log["closed"] and not log["completed"] and log["sent"] < len(long) for log in losers)
    assert out.cancelled == 3 and gen.http.usage.cancelled == 3
    assert out.spent_tokens == sum(log["sent"] for log in server.logs) < 4 + 3 * len(long)


def test_http_race_of_whole_solutions_and_one_sample(tokenizer):
    server = StreamServer([list("1+1=2\nAnswer: 2") + ["<|end|>"]])
    out = asyncio.run(racer(server, tokenizer).race(http_request(1, stop=())))
    assert (out.index, out.cancelled, out.spent_tokens) == (0, 0, 16)
    assert out.winner.text == "1+1=2\nAnswer: 2" and out.winner.finish_reason == "eos" and out.winner.tokens == 16


def test_http_race_failed_samples_do_not_win(tokenizer):
    server = StreamServer([400, list("1+2=3\n"), 500, list("4*5=20+1=21\n")])
    gen = racer(server, tokenizer, retries=1)
    out = asyncio.run(gen.race(http_request(4)))
    assert out.index == 1 and not out.winner.failed and out.winner.text == "1+2=3\n"
    assert server.logs[3]["closed"] and not server.logs[3]["completed"]


def test_http_race_where_every_sample_fails_gives_the_error_step(tokenizer):
    server = StreamServer([500, 500, 500])
    gen = racer(server, tokenizer, retries=1)
    out = asyncio.run(gen.race(http_request(3)))
    assert out.winner.failed and (out.index, out.spent_tokens, out.cancelled) == (0, 0, 0)
    assert "HTTP 500 (after 2 attempts): injected 500" in out.winner.error and URL in out.winner.error
    assert len(server.bodies) == 6 and gen.http.usage.failures == 3 and gen.http.usage.retries == 3
    with pytest.raises(ValueError, match="k >= 1"):
        asyncio.run(gen.race(http_request(0)))


def test_http_race_retries_a_stream_cut_short(tokenizer):
    """A connection dropped half-way through a stream is retried like a dropped reply; the
    tokens streamed before the drop were spent too."""
    calls = []

    class Cut(httpx.AsyncByteStream):
        async def __aiter__(self):
            yield sse(token_event("7"))
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

    async def handler(request):
        calls.append(request)
        if len(calls) == 1:
            return httpx.Response(200, stream=Cut())
        return httpx.Response(200, stream=SlowStream(list("7+1=8\n"), 0.0, {"sent": 0}))

    gen = racer(handler, tokenizer)
    out = asyncio.run(gen.race(http_request(1)))
    assert out.winner.text == "7+1=8\n" and out.spent_tokens == 1 + 6 and gen.http.usage.retries == 1


def test_http_race_an_error_event_in_the_stream_fails_the_sample(tokenizer):
    async def handler(request):
        content = sse(token_event("1")) + sse({"error": {"message": "engine dead", "code": 400}}) + b"data: [DONE]\n\n"
        return httpx.Response(200, content=content)

    out = asyncio.run(racer(handler, tokenizer).race(http_request(2)))
    assert out.winner.failed and "error in the stream: engine dead" in out.winner.error


def test_streamed_events_merge_into_the_reply_they_stand_for():
    events = [token_event("1"), token_event("+"), token_event("\n", "stop", "\n"),
              {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}]
    assert [streamed_tokens(e) for e in events] == [1, 1, 1, 0]
    (choice,) = parse_reply(Reply(merge_events(events), URL)).choices
    assert (choice.text, choice.finish_reason, choice.stop_reason, choice.stop_reported) == ("1+\n", "stop", "\n", True)
    assert choice.tokens == ("1", "+", "\n") and choice.logprobs == [-0.25] * 3
    chat = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
            {"choices": [{"index": 0, "delta": {"content": "4"}, "logprobs": {"content": [{"token": "4", "logprob": -1.0}]},
                          "finish_reason": None}]},
            {"choices": [{"index": 0, "delta": {"content": "2"}, "logprobs": {"content": [{"token": "2", "logprob": -2.0}]},
                          "finish_reason": "length"}]}]
    assert [streamed_tokens(e) for e in chat] == [0, 1, 1]
    completion = parse_reply(Reply(merge_events(chat), URL), "chat")
    assert completion.choices[0].text == "42" and completion.choices[0].logprobs == [-1.0, -2.0]


def test_http_race_at_an_unreachable_endpoint_gives_the_error_step_generate_steps_gives(tokenizer):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gen = OpenAIGenerator(EndpointPool(f"http://127.0.0.1:{port}/v1", retries=1, backoff_base=0.001), MODEL,
                          tokenizer=tokenizer, merge_prompts=1)
    out = asyncio.run(gen.race(http_request(2)))
    ((expected, _),) = asyncio.run(gen.generate_steps([http_request(2)]))
    assert out.winner.failed and out.winner.error == expected.error
    assert "no HTTP response (after 2 attempts)" in out.winner.error and "is the server running" in out.winner.error
    assert (out.index, out.spent_tokens, out.cancelled) == (0, 0, 0)


# -- the look-ahead wrapper --------------------------------------------------------------------
def test_lookahead_passes_races_on_only_when_its_generator_races(tokenizer):
    server = StreamServer([list("1+2=3\n"), list("3*3=9\n")])
    ahead = Lookahead(racer(server, tokenizer), block=32)
    assert isinstance(ahead, Racer)
    out = asyncio.run(ahead.race(http_request(2)))
    assert out.winner.text in ("1+2=3\n", "3*3=9\n") and ahead.stats["prompts"] == 0

    class Plain:  # a step generator without race
        client, api, merge_prompts, capabilities = ahead.client, "completions", 1, None

        async def generate_steps(self, requests):
            return []

    plain = Lookahead(Plain(), block=32)
    assert not isinstance(plain, Racer) and not hasattr(plain, "race")
