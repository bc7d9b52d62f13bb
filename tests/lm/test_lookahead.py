"""Block-aligned look-ahead (``Lookahead(OpenAIGenerator, kv_block)``) against a fake completions
server, and its step cutting. The real-vLLM check is in tests/integration."""

from __future__ import annotations

import asyncio
import json

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("transformers")

from itscale import zoo  # noqa: E402
from itscale.lm import EndpointPool, Lookahead, OpenAIGenerator  # noqa: E402
from itscale.lm.loading import encode  # noqa: E402
from itscale.lm.lookahead import cut_step, split_tokens  # noqa: E402
from itscale.protocols import Generator  # noqa: E402
from itscale.types import Problem, SamplingParams, Step, StepRequest  # noqa: E402

URL = "http://vllm:8000/v1"
P1, P2 = Problem("p1", "Start at 1."), Problem("p2", "Start at 2.")
SOLUTION = "1+1=2\n2*3=6\n6-1=5\nAnswer: 5"
STOP = ("\n",)
SAMPLING = SamplingParams(temperature=0.8, max_step_tokens=12)
BLOCK = 32


def pieces(*texts):
    return [(t, -0.5, 1) for t in texts]


# -- cutting steps ----------------------------------------------------------------------------

def test_a_step_ends_at_the_stop_string_which_it_keeps():
    step, used, rest = cut_step(pieces("1", "+", "1", "\n", "2"), STOP, 8, None)
    assert (step.text, step.tokens, step.finish_reason, used, rest) == ("1+1\n", 4, "stop", 4, None)
    assert step.logprob == pytest.approx(-2.0)
    step, used, rest = cut_step(pieces("ab\ncd", "e"), STOP, 8, None)  # a stop string inside a token
    assert (step.text, step.tokens, used, rest) == ("ab\n", 1, 1, ("cd", 0.0, 0))
    assert cut_step(pieces("a", "b\n\n"), ("\n\n",), 8, None)[0].text == "ab\n\n"  # across tokens


def test_a_step_ends_after_max_tokens_or_where_the_text_ended():
    step, used, _ = cut_step(pieces(*"abcdefgh", "i"), STOP, 8, None)
    assert (step.text, step.finish_reason, used) == ("abcdefgh", "length", 8)
    eos, used, _ = cut_step(pieces("Answer: 3", ""), STOP, 24, "eos")  # end-of-sequence has no text
    assert (eos.text, eos.tokens, eos.finish_reason, used) == ("Answer: 3", 2, "eos", 2)
    assert cut_step(pieces("1", "+"), STOP, 8, None) is None  # not there yet


def test_a_completion_is_split_into_one_piece_per_token():
    assert split_tokens("13", ["1", "3", "<|end|>"], [-1.0, -2.0, -0.1]) == [("1", -1.0, 1), ("3", -2.0, 1),
                                                                             ("", -0.1, 1)]
    assert split_tokens("ab", ["x"], [None]) == [("ab", 0.0, 1)]


# -- the generator against a fake server --------------------------------------------------------

class FakeServer:
    """``/completions`` continuing ``SOLUTION`` after each prompt's text (one token per character,
    then end-of-sequence), ``max_tokens`` at most; a prompt that is not a prefix of it is an
    error. Records every body."""

    def __init__(self, tokenizer, solution=SOLUTION):
        self.tokenizer, self.solution, self.bodies = tokenizer, solution, []
        gen = OpenAIGenerator(URL, "policy", tokenizer=tokenizer)
        self.bases = [gen.context_text(p.prompt) for p in (P1, P2)]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        choices = []
        for i, prompt in enumerate(prompts):
            done = next(prompt[len(b):] for b in self.bases if prompt.startswith(b))
            assert self.solution.startswith(done), done
            text = self.solution[len(done):][: body["max_tokens"]]
            tokens, finish = list(text), "length"
            if len(done) + len(text) == len(self.solution) and len(text) < body["max_tokens"]:
                tokens, finish = tokens + ["<|end|>"], "stop"
            choices.append({"index": i, "text": text, "finish_reason": finish, "stop_reason": None,
                            "logprobs": {"tokens": tokens, "token_logprobs": [-0.25] * len(tokens)}})
        return httpx.Response(200, json={"choices": choices, "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

    def prompt_tokens(self, prompt: str) -> int:
        return len(encode(self.tokenizer, prompt, add_special_tokens=False))



def generator(server, **kw) -> Lookahead:
    pool = EndpointPool(URL, transport=httpx.MockTransport(server), backoff_base=0.0)
    return Lookahead(OpenAIGenerator(pool, "policy", tokenizer=zoo.policy_path(), **kw), BLOCK)


def request(problem, steps=(), k=1, stop=STOP, params=SAMPLING):
    return StepRequest(problem, tuple(Step(s) for s in steps), k, params, stop)


def rounds(gen, calls):
    """Each call makes its requests from the previous call's output; all outputs."""
    async def go():
        outs, last = [], None
        async with gen:
            for make in calls:
                last = await gen.generate_steps(make(last))
                outs.append(last)
        return outs

    return asyncio.run(go())


def test_requests_run_to_a_block_boundary_without_stop_strings(tokenizer):
    server = FakeServer(tokenizer)
    (out,) = rounds(generator(server), [lambda _: [request(P1, k=2)]])
    assert [s.text for s in out[0]] == ["1+1=2\n"] * 2 and all(s.finish_reason == "stop" for s in out[0])
    (body,) = server.bodies  # both copies in one merged request
    n = server.prompt_tokens(body["prompt"][0])
    assert (n + body["max_tokens"] - 1) % BLOCK == 0 and body["max_tokens"] >= BLOCK // 2  # computed KV: whole blocks
    assert "stop" not in body and "seed" not in body and body["logprobs"] == 1


def test_the_next_round_reads_the_step_from_the_look_ahead(tokenizer):
    server = FakeServer(tokenizer)
    gen = generator(server)
    first, second, third, last = rounds(gen, [
        lambda _: [request(P1)],
        lambda out: [request(P1, [out[0][0].text])],
        lambda out: [request(P1, ["1+1=2\n", out[0][0].text])],
        lambda out: [request(P1, ["1+1=2\n", "2*3=6\n", out[0][0].text])],
    ])
    assert [o[0][0].text for o in (first, second, third, last)] == ["1+1=2\n", "2*3=6\n", "6-1=5\n", "Answer: 5"]
    assert last[0][0].finish_reason == "eos" and last[0][0].tokens == len("Answer: 5") + 1
    assert second[0][0].prompt_tokens == 0  # read from the look-ahead: nothing sent
    continuations = [b for b in server.bodies[1:]]
    assert len(server.bodies) < 4  # fewer requests than rounds
    for body in continuations:  # a continuation's prompt starts just past a block boundary: one token to prefill
        assert (server.prompt_tokens(body["prompt"][0]) - 1) % BLOCK == 0


def test_duplicated_particles_get_fresh_continuations_and_unselected_look_ahead_is_charged(tokenizer):
    server = FakeServer(tokenizer)
    gen = generator(server)
    first, second = rounds(gen, [
        lambda _: [request(P1, k=2), request(P2)],
        lambda out: [request(P1, ["1+1=2\n"], k=3)],  # resampling kept the P1 context, thrice
    ])
    assert [s.text for s in second[0]] == ["2*3=6\n"] * 3
    assert gen.stats["reused"] == 2 and gen.stats["fresh"] == 3 + 1
    gen = generator(FakeServer(tokenizer, solution="1+1=2\n2*3=6\n6-1=5\nAnswer: 5"))
    _, (dropped,) = rounds(gen, [
        lambda _: [request(P1), request(P1, ["1+1=2\n"])],
        lambda out: [request(P1, ["1+1=2\n", "2*3=6\n"])],  # only the second particle goes on
    ])
    assert dropped[0].text == "6-1=5\n"
    assert gen.stats["dropped_tokens"] > 0
    assert dropped[0].tokens == len("6-1=5\n") + gen.stats["dropped_tokens"]  # charged, not lost


def test_long_steps_end_at_max_step_tokens_and_whole_solutions_go_plain(tokenizer):
    long = "1+1+1+1+1+1+1+1=8\nAnswer: 8"
    server = FakeServer(tokenizer, solution=long)
    gen = generator(server)
    first, second = rounds(gen, [lambda _: [request(P1)], lambda out: [request(P1, [out[0][0].text])]])
    assert (first[0][0].text, first[0][0].finish_reason, first[0][0].tokens) == (long[:12], "length", 12)
    assert second[0][0].text == long[12:long.index("\n") + 1]
    whole = FakeServer(tokenizer)
    rounds(generator(whole), [lambda _: [request(P1, stop=())]])
    assert whole.bodies[0]["max_tokens"] == SAMPLING.max_step_tokens  # no look-ahead without a stop string


def test_kv_block_must_be_positive_and_needs_the_completions_api():
    with pytest.raises(ValueError, match="kv_block"):
        Lookahead(OpenAIGenerator(URL, "policy", tokenizer=zoo.policy_path()), 0)
    with pytest.raises(ValueError, match="kv_block needs the completions API"):
        Lookahead(OpenAIGenerator(URL, "policy"), 32)  # no tokenizer: chat API


def test_the_look_ahead_is_a_generator_wrapping_the_policy(tokenizer):
    server = FakeServer(tokenizer)
    gen = generator(server)
    assert isinstance(gen, Generator) and gen.capabilities is gen.generator.capabilities
    assert gen.http is gen.generator.http
    rounds(gen, [lambda _: [request(P1)]])
    gen.clear_cache()  # forgets the look-ahead: the next round asks the server again
    (second,) = rounds(gen, [lambda _: [request(P1, ["1+1=2\n"])]])
    assert second[0][0].text == "2*3=6\n" and len(server.bodies) == 2 and gen.stats["reused"] == 0


def test_without_merging_every_call_goes_to_the_generator_as_it_is(tokenizer):
    """``merge_prompts=1`` (seeded, one request per StepRequest): no look-ahead, stop strings sent."""
    server = FakeServer(tokenizer)
    gen = generator(server, merge_prompts=1)
    rounds(gen, [lambda _: [request(P1, params=SamplingParams(max_step_tokens=12, seed=4))]])
    (body,) = server.bodies
    assert (body["stop"], body["seed"], body["max_tokens"]) == (["\n"], 4, 12)  # a plain, seeded step request
    assert gen.stats == {"reused": 0, "fresh": 0, "prompts": 0, "dropped_tokens": 0}


def test_a_problem_that_uses_little_of_its_look_ahead_goes_back_to_plain_requests(tokenizer):
    """Beam-search-like: of four continuations one goes on and three are dropped; from then on
    that problem's steps stop at the delimiter (stop string sent), while another problem whose
    particles go on keeps its look-ahead."""
    steps = ["1+1=2\n", "2*3=6\n", "6-1=5\n", "5+5=10\n"]
    server = FakeServer(tokenizer, solution="".join(steps) + "Answer: 10")
    gen = generator(server)
    rounds(gen, [
        lambda _: [request(P1, steps[:t]) for t in range(4)] + [request(P2)],  # four P1 particles, four contexts
        lambda out: [request(P1, steps[:4]), request(P2, steps[:1])],  # only the deepest P1 particle goes on
    ])
    assert gen._fate[("p1", P1.prompt)] == [0, 3]  # three dropped; the fourth was not used
    *_, last = [b for b in server.bodies]
    prompts = last["prompt"] if isinstance(last["prompt"], list) else [last["prompt"]]
    assert "stop" in last and prompts == [server.bases[0] + "".join(steps)]  # P1: a plain request
    assert not any("stop" in b and server.bases[1] in str(b["prompt"]) for b in server.bodies)  # P2: look-ahead
