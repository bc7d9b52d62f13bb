"""StreamingGenerator against a fake streaming completions server (no real server), and its
step cutting. The real-vLLM test is in tests/integration."""

from __future__ import annotations

import asyncio
import json

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("transformers")

from itscale import zoo  # noqa: E402
from itscale.lm import EndpointPool, StreamingGenerator  # noqa: E402
from itscale.lm.streams import cut_step, split_tokens  # noqa: E402
from itscale.types import Problem, SamplingParams, Step, StepRequest  # noqa: E402

URL = "http://vllm:8000/v1"
P1, P2 = Problem("p1", "Start at 1."), Problem("p2", "Start at 2.")
STOP = ("\n",)
SAMPLING = SamplingParams(temperature=0.8, max_step_tokens=12)


def _bases():
    gen = StreamingGenerator(URL, "policy", tokenizer=zoo.policy_path())
    return {p.id: gen.context_text(p.prompt) for p in (P1, P2)}


BASES = _bases()


def pieces(*texts):
    return [(t, -0.5, 1) for t in texts]


# -- cutting steps off a stream -----------------------------------------------------------

def test_a_step_ends_at_the_stop_string_which_it_keeps():
    step, used, rest = cut_step(pieces("1", "+", "1", "\n", "2"), STOP, 8, None)
    assert (step.text, step.tokens, step.finish_reason, used, rest) == ("1+1\n", 4, "stop", 4, None)
    assert step.logprob == pytest.approx(-2.0)


def test_a_stop_string_inside_a_token_leaves_the_rest_for_the_next_step():
    step, used, rest = cut_step(pieces("ab\ncd", "e"), STOP, 8, None)
    assert (step.text, step.tokens, used, rest) == ("ab\n", 1, 1, ("cd", 0.0, 0))
    two, _, _ = cut_step(pieces("a", "b\n\n"), ("\n\n",), 8, None)
    assert two.text == "ab\n\n"  # a stop string across tokens


def test_a_step_ends_after_max_tokens_or_where_the_stream_ended():
    step, used, _ = cut_step(pieces(*"abcdefgh", "i"), STOP, 8, None)
    assert (step.text, step.finish_reason, used) == ("abcdefgh", "length", 8)
    eos, used, _ = cut_step(pieces("Answer: 3", ""), STOP, 24, "eos")  # the end-of-sequence token has no text
    assert (eos.text, eos.tokens, eos.finish_reason, used) == ("Answer: 3", 2, "eos", 2)
    assert cut_step(pieces("1", "+"), STOP, 8, None) is None  # not there yet
    assert cut_step(pieces("1", "+"), STOP, 8, "closed") is None  # closed mid-step: nothing to hand out


def test_an_event_is_split_into_one_piece_per_token():
    assert split_tokens("13", ["1", "3"], [-1.0, -2.0]) == [("1", -1.0, 1), ("3", -2.0, 1)]
    assert split_tokens("13", ["1", "3", "<|end|>"], [-1.0, -2.0, -0.1]) == [("1", -1.0, 1), ("3", -2.0, 1),
                                                                             ("", -0.1, 1)]
    assert split_tokens("ab", ["x"], [None]) == [("ab", 0.0, 1)]  # text that matches no token stays whole


# -- the generator against a fake server ----------------------------------------------------

class FakeStreamingServer:
    """``/completions``: a stream (one event per character, then end-of-sequence) of ``solution``
    after the steps the prompt already has; plain requests get ``"9\\n"``. Counts requests."""

    def __init__(self, solution: str, fail_streams: int = 0):
        self.solution, self.fail_streams = solution, fail_streams
        self.bases = [BASES[p.id] for p in (P1, P2)]
        self.streams, self.plain, self.bodies = 0, 0, []

    def continuation(self, prompt: str) -> str:
        """The solution after as many steps as the context already has."""
        context = next(prompt[len(base):] for base in self.bases if prompt.startswith(base))
        return "\n".join(self.solution.split("\n")[context.count("\n"):])

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        if body.get("stream"):
            self.streams += 1
            if self.fail_streams:
                self.fail_streams -= 1
                return httpx.Response(500, json={"error": {"message": "boom"}})
            text = self.continuation(body["prompt"])
            events = [{"choices": [{"index": 0, "text": c, "finish_reason": None,
                                    "logprobs": {"tokens": [c], "token_logprobs": [-0.25]}}]} for c in text]
            events.append({"choices": [{"index": 0, "text": "", "finish_reason": "stop", "stop_reason": None,
                                        "logprobs": {"tokens": ["<|end|>"], "token_logprobs": [-0.01]}}]})
            data = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
            return httpx.Response(200, content=data.encode(), headers={"content-type": "text/event-stream"})
        self.plain += 1
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]] * body.get("n", 1)
        choices = [{"index": i, "text": "9\n", "finish_reason": "stop", "stop_reason": "\n",
                    "logprobs": {"tokens": ["9", "\n"], "token_logprobs": [-1.0, -1.0]}} for i in range(len(prompts))]
        return httpx.Response(200, json={"choices": choices, "usage": {"prompt_tokens": 5, "completion_tokens": 2}})


def generator(server, **kw) -> StreamingGenerator:
    pool = EndpointPool(URL, transport=httpx.MockTransport(server), backoff_base=0.0)
    return StreamingGenerator(pool, "policy", tokenizer=zoo.policy_path(), **kw)


def request(problem, steps=(), k=1, stop=STOP, params=SAMPLING):
    return StepRequest(problem, tuple(Step(s) for s in steps), k, params, stop)


def rounds(gen, calls):
    """Run ``calls`` (each: a function from the previous call's output to a list of requests)
    in one event loop; every call's output."""
    async def go():
        outs, last = [], None
        async with gen:
            for make in calls:
                last = await gen.generate_steps(make(last))
                outs.append(last)
        return outs

    return asyncio.run(go())


def test_the_next_round_reads_the_particles_step_off_its_stream():
    server = FakeStreamingServer("1+1=2\n2*3=6\nAnswer: 6")
    gen = generator(server, lookahead_steps=3)  # the fake answers at once: let the streams read it all
    first, second, third = rounds(gen, [
        lambda _: [request(P1, k=2)],
        lambda out: [request(P1, [out[0][0].text], k=1), request(P1, [out[0][1].text], k=1)],
        lambda out: [request(P1, ["1+1=2\n", out[0][0].text], k=1)],
    ])
    assert [s.text for s in first[0]] == ["1+1=2\n"] * 2
    assert [s.prompt_tokens > 0 for s in first[0]] == [True, True]  # fresh streams: the context was sent
    assert [s[0].text for s in second] == ["2*3=6\n"] * 2
    assert all(s[0].prompt_tokens == 0 and s[0].prefilled_tokens == 0 for s in second)  # nothing re-sent
    assert (third[0][0].text, third[0][0].finish_reason) == ("Answer: 6", "eos")
    assert third[0][0].tokens == len("Answer: 6") + 1  # the end-of-sequence token counts, as in HFGenerator
    assert server.streams == 2 and server.plain == 0
    bounded = generator(FakeStreamingServer("1+1=2\n2*3=6\nAnswer: 6"), lookahead_steps=1)
    *_, last = rounds(bounded, [lambda _: [request(P1)], lambda out: [request(P1, [out[0][0].text])],
                                lambda out: [request(P1, ["1+1=2\n", out[0][0].text])]])
    assert last[0][0].text == "Answer: 6"  # the stream closed one step ahead; a fresh one served it
    assert bounded.stream_stats["opened"] == 3
    body = server.bodies[0]
    assert body["stream"] is True and "stop" not in body and "seed" not in body and body["logprobs"] == 1


def test_duplicated_particles_get_fresh_streams_and_unselected_ones_are_closed():
    server = FakeStreamingServer("1+1=2\n2*3=6\nAnswer: 6")
    gen = generator(server)
    _, second = rounds(gen, [
        lambda _: [request(P1, k=2), request(P2, k=1)],
        lambda out: [request(P1, [out[0][0].text], k=3)],  # resampling kept one P1 particle, thrice
    ])
    assert [s.text for s in second[0]] == ["2*3=6\n"] * 3
    stats = gen.stream_stats
    assert stats["reused"] == 2  # both P1 streams stand at that context (same text): both reused
    assert stats["opened"] == 4  # 3 in the first call, 1 more for the third copy
    assert stats["closed_unused"] == 0  # P2 was not in the call: its stream is left alone
    _, _, third = rounds(generator(server), [
        lambda _: [request(P1, k=2)],
        lambda out: [request(P1, [out[0][0].text], k=1)],
        lambda out: [request(P1, ["1+1=2\n", "2*9=18\n"], k=1)],  # a context no stream stands at
    ])
    assert third[0][0].text == "Answer: 6"  # a fresh stream for that context
    assert third[0][0].tokens > len("Answer: 6") + 1  # plus the unused look-ahead of the closed stream


def test_a_failing_stream_falls_back_to_a_plain_request():
    server = FakeStreamingServer("1+1=2\n", fail_streams=10)
    gen = generator(server)
    (out,) = rounds(gen, [lambda _: [request(P1, k=2)]])
    assert [s.text for s in out[0]] == ["9\n", "9\n"] and all(s.error is None for s in out[0])
    assert server.plain == 2 and gen.stream_stats["failed"] == 2


def test_requests_without_stop_strings_and_streams_past_the_limit_use_plain_requests():
    server = FakeStreamingServer("1+1=2\n")
    gen = generator(server, max_streams=1)
    (out,) = rounds(gen, [lambda _: [request(P1, k=3), request(P2, k=1, stop=())]])
    assert out[0][0].text == "1+1=2\n" and [s.text for s in out[0][1:]] == ["9\n", "9\n"]
    assert out[1][0].text == "9\n"
    assert server.streams == 1


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="max_streams"):
        StreamingGenerator(URL, "policy", tokenizer=zoo.policy_path(), max_streams=0)
    with pytest.raises(ValueError, match="lookahead_steps"):
        StreamingGenerator(URL, "policy", tokenizer=zoo.policy_path(), lookahead_steps=0)
