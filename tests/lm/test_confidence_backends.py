"""Top-k log-probabilities and early stopping for low confidence in the model backends (DeepConf).

- HFGenerator on the embedded policy: ``Step.top_logprobs`` is a direct forward pass's top-k
  log-softmax (temperature 1) at each generated position, and ``stop_below`` stops exactly the
  sample whose window mean falls below the threshold, at that token, leaving the others as they were;
- OpenAIGenerator against mocked replies: the request fields, parsing (completions and chat), and
  a low-confidence stop that ends (closes) the stream at the token where the rule fires.

The real-server side (vLLM) is in ``tests/integration/test_vllm_backend.py``.
"""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from itscale.lm import confidence as conf
from itscale.types import ConfidenceStop, Problem, SamplingParams, Step, StepRequest

torch = pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
pytest.importorskip("transformers")

from itscale.lm import EndpointPool, HFGenerator, OpenAIGenerator  # noqa: E402
from .conftest import needs_zoo, sse  # noqa: E402
from itscale.tasks import arithmetic  # noqa: E402

NUMBERS = Problem("numbers", "1 2 3 4 5 6 7 8 9")  # off-task: the samples wander, their confidence differs
PROBLEM = arithmetic.eval_set("medium")[0]


# -- HFGenerator -------------------------------------------------------------------------------
def generated_ids(g: HFGenerator, request: StepRequest, step: Step) -> tuple[list[int], int]:
    """Context ids + the step's ids (EOS appended for an ``eos`` step), and where the step starts
    (the embedded policy's tokenizer is character-level: re-encoding the text gives its ids)."""
    ctx = g.tokenizer.encode(g.context_text(request.problem.prompt, request.prefix), add_special_tokens=False)
    new = g.tokenizer.encode(step.text, add_special_tokens=False)
    if step.finish_reason == "eos":
        new.append(g.tokenizer.eos_token_id)
    return ctx + new, len(ctx)


def forward_top(model, ids: list[int], start: int, k: int) -> list[list[float]]:
    """The top-k of log softmax (float64, temperature 1) at each position that predicted ids[start:]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].to(torch.float64)
    logp = torch.log_softmax(logits, dim=-1)
    return [logp[i - 1].topk(k).values.tolist() for i in range(start, len(ids))]


@needs_zoo
def test_hf_top_logprobs_are_a_forward_pass_top_k_at_temperature_1(hf, request):
    k = 5
    first = arithmetic.reference_steps(*arithmetic.parse_prompt(PROBLEM.prompt))[0] + arithmetic.DELIMITER
    requests = [  # step requests (the stop token included), whole solutions (EOS included), hot and nucleus sampling
        StepRequest(PROBLEM, (Step(first),), 3, SamplingParams(temperature=0.7, top_p=0.9, max_step_tokens=30,
                                                               seed=1, top_logprobs=k), (arithmetic.DELIMITER,)),
        StepRequest(NUMBERS, (), 3, SamplingParams(temperature=1.5, max_step_tokens=60, seed=2, top_logprobs=k), ()),
        StepRequest(PROBLEM, (), 1, SamplingParams(temperature=0.0, max_step_tokens=80, seed=0, top_logprobs=k), ()),
    ]
    out = hf.generate_steps_sync(requests)
    reasons, worst = set(), 0.0
    for req, steps in zip(requests, out):
        for step in steps:
            reasons.add(step.finish_reason)
            assert len(step.top_logprobs) == step.tokens > 0
            assert all(len(t) == k and list(t) == sorted(t, reverse=True) for t in step.top_logprobs)
            ids, start = generated_ids(hf, req, step)
            assert len(ids) - start == step.tokens
            want = forward_top(hf.model, ids, start, k)
            worst = max(worst, max(abs(a - b) for got, w in zip(step.top_logprobs, want) for a, b in zip(got, w)))
    assert {"stop", "eos"} <= reasons
    assert worst < 1e-4, worst  # float32 logits of a batched, cached decode vs one full forward pass
    request.node.user_properties.append(
        ("itscale_measurement", ("HF top_logprobs vs a forward pass (embedded policy)", f"max |Δ| {worst:.2e}")))
    # not asked: None
    (plain,) = hf.generate_steps_sync([StepRequest(NUMBERS, (), 1, SamplingParams(max_step_tokens=5, seed=0), ())])
    assert plain[0].top_logprobs is None


def first_stop(top_logprobs, window: int, threshold: float) -> int | None:
    """By hand: the first token count n >= window at which the mean C over tokens n-window+1..n is < threshold."""
    c = conf.token_confidences(top_logprobs)
    for n in range(window, len(c) + 1):
        if sum(c[n - window:n]) / window < threshold:
            return n
    return None


@needs_zoo
def test_hf_stops_the_low_confidence_sample_at_the_first_token_below(hf):
    k, window = 5, 6

    def params(stop=None):
        return SamplingParams(temperature=1.0, max_step_tokens=120, seed=0, top_logprobs=k, stop_below=stop)

    request = StepRequest(NUMBERS, (), 4, params(), ())
    hf.clear_cache()
    full = hf.generate_steps_sync([request])[0]
    lowest = [conf.lowest_group_confidence(conf.token_confidences(s.top_logprobs), window) for s in full]
    order = sorted(range(4), key=lambda j: lowest[j])
    low, high = order[0], order[1]
    assert lowest[high] - lowest[low] > 0.05, lowest  # the premise: separable samples
    threshold = lowest[low] + 0.01  # between the two, and just above the low sample's lowest window
    stop_at = first_stop(full[low].top_logprobs, window, threshold)
    assert stop_at is not None and stop_at < full[low].tokens  # it fires before the sample ends on its own
    # more thresholds: 1e-4 above each record low of a sample's group confidences (in time order; the
    # float32 rounding of another batch shape is ~1e-5), where every earlier window of that sample is
    # at least 2e-4 higher: each stops that sample exactly at that window's last token, so a rule that
    # fires on another window, a token early or late, or against a shifted threshold shows
    delta, thresholds = 1e-4, [threshold]
    for j in range(4):
        groups = conf.group_confidences(conf.token_confidences(full[j].top_logprobs), window)
        for i in range(len(groups)):
            if all(g > groups[i] + 2 * delta for g in groups[:i]):
                thresholds.append(groups[i] + delta)
                assert first_stop(full[j].top_logprobs, window, thresholds[-1]) == window + i
    assert len(thresholds) >= 8, thresholds

    hf.clear_cache()
    out = hf.generate_steps_sync([StepRequest(NUMBERS, (), 4, params(ConfidenceStop(window, t)), ())
                                  for t in thresholds])
    stopped = out[0]
    s = stopped[low]
    assert s.finish_reason == "low_confidence" and s.tokens == stop_at == len(s.top_logprobs)
    assert full[low].text.startswith(s.text) and len(s.text) == stop_at  # character-level: one token per character
    # (the values agree to float32 rounding: rows that stop change the batch's shape from there on)
    assert flat(s.top_logprobs) == pytest.approx(flat(full[low].top_logprobs[:stop_at]), abs=1e-4)
    assert s.logprob == pytest.approx(_prefix_logprob(hf, request, full[low], stop_at), abs=1e-4)
    assert stopped[high].finish_reason != "low_confidence"
    # every sample whose windows all stay at or above the threshold is untouched, token for token;
    # every other stops exactly at its first window below it
    fired = 0
    for t, steps in zip(thresholds, out):
        for j in range(4):
            n = first_stop(full[j].top_logprobs, window, t)
            if n is None:
                assert (steps[j].text, steps[j].tokens, steps[j].finish_reason) == \
                       (full[j].text, full[j].tokens, full[j].finish_reason)
                assert steps[j].logprob == pytest.approx(full[j].logprob, abs=1e-4)
            else:
                fired += 1
                assert (steps[j].finish_reason, steps[j].tokens) == ("low_confidence", n), (t, j)
                assert full[j].text.startswith(steps[j].text) and len(steps[j].top_logprobs) == n
    assert fired >= len(thresholds) + 2  # the premise: the thresholds stop several samples
    # the stopped decode generated fewer tokens
    assert sum(x.tokens for x in stopped) < sum(x.tokens for x in full)


def flat(tops) -> list[float]:
    return [v for top in tops for v in top]


def _prefix_logprob(g, request, step, n) -> float:
    ids, start = generated_ids(g, request, step)
    with torch.no_grad():
        logp = torch.log_softmax(g.model(torch.tensor([ids])).logits[0].to(torch.float64), -1)
    return float(sum(logp[i - 1, ids[i]] for i in range(start, start + n)))


@needs_zoo
def test_hf_a_stop_string_at_the_firing_token_wins(hf):
    """A threshold no window reaches fires at the ``window``-th token; a step that ends there
    with its stop string is a ``stop`` step, the longer ones are cut at ``window`` tokens."""
    first = arithmetic.reference_steps(*arithmetic.parse_prompt(PROBLEM.prompt))[0] + arithmetic.DELIMITER
    base = SamplingParams(temperature=2.0, max_step_tokens=30, seed=4, top_logprobs=3)
    plain = hf.generate_steps_sync([StepRequest(PROBLEM, (Step(first),), 8, base, (arithmetic.DELIMITER,))])[0]
    window = min(s.tokens for s in plain)
    assert any(s.tokens > window for s in plain)
    fired = hf.generate_steps_sync([StepRequest(PROBLEM, (Step(first),), 8, SamplingParams(
        temperature=2.0, max_step_tokens=30, seed=4, top_logprobs=3, stop_below=ConfidenceStop(window, 1e9)),
        (arithmetic.DELIMITER,))])[0]
    for p, f in zip(plain, fired):
        if p.tokens == window:
            assert (f.text, f.finish_reason) == (p.text, p.finish_reason) == (p.text, "stop")
        else:
            assert f.finish_reason == "low_confidence" and f.tokens == window and p.text.startswith(f.text)
            assert arithmetic.DELIMITER not in f.text


@needs_zoo
def test_hf_race_refuses_stop_below(hf):
    params = SamplingParams(seed=0, top_logprobs=2, stop_below=ConfidenceStop(4, 1.0))
    with pytest.raises(ValueError, match="stop_below"):
        hf.race_sync(StepRequest(NUMBERS, (), 2, params, ()))
    out = hf.race_sync(StepRequest(NUMBERS, (), 3, SamplingParams(max_step_tokens=40, seed=0, top_logprobs=2), ()))
    assert len(out.winner.top_logprobs) == out.winner.tokens  # a race's winner carries them too


# -- OpenAIGenerator against mocked replies ----------------------------------------------------
URL = "http://vllm:8000/v1"




def top_of(c: float) -> dict:
    """A completions top-logprobs map with token confidence ``c`` over k = 2 (two distinct texts)."""
    return {"a": -0.5 * c, "b": -1.5 * c}


class ConfStream(httpx.AsyncByteStream):
    """One streamed completion: token ``t`` with token confidence ``confs[t]``; records what it
    sent and whether the client closed it first."""

    def __init__(self, tokens: list[str], confs: list[float], log: dict, finish: str = "stop", stop=None):
        self.tokens, self.confs, self.log, self.finish, self.stop = tokens, confs, log, finish, stop

    async def __aiter__(self):
        for i, (token, c) in enumerate(zip(self.tokens, self.confs)):
            await asyncio.sleep(0.005)
            last = i == len(self.tokens) - 1
            self.log["sent"] += 1
            yield sse({"choices": [{"index": 0, "text": token, "finish_reason": self.finish if last else None,
                                    "stop_reason": self.stop if last else None,
                                    "logprobs": {"tokens": [token], "token_logprobs": [-0.5 * c],
                                                 "top_logprobs": [top_of(c)]}}]})
        self.log["completed"] = True  # every token sent
        yield sse({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": len(self.tokens)}})
        yield b"data: [DONE]\n\n"

    async def aclose(self) -> None:
        self.log["closed"] = True


def streaming(samples: list[tuple[list[str], list[float], str, str | None]], bodies: list):
    logs = [{"sent": 0, "closed": False, "completed": False} for _ in samples]

    async def handler(request):
        body = json.loads(request.content)
        bodies.append(body)
        j = body["seed"] - 100
        tokens, confs, finish, stop = samples[j]
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              stream=ConfStream(tokens, confs, logs[j], finish, stop))

    return handler, logs


def http_gen(handler, tokenizer, api="completions") -> OpenAIGenerator:
    pool = EndpointPool(URL, transport=httpx.MockTransport(handler), rng=random.Random(0), backoff_base=0.001)
    return OpenAIGenerator(pool, "policy", tokenizer=tokenizer, merge_prompts=1, api=api)


def test_http_low_confidence_stop_ends_the_stream_at_the_firing_token(tokenizer):
    window, threshold = 3, 2.0
    confident = ([*"12+34=46"], [3.0] * 8, "length", None)
    # token confidences 3,3,3,1,1,1,3…: window means 3, 2.33, 1.67 (< 2 at the 5th token)
    wobbly = ([*"12+34=46"] + ["9"] * 20, [3, 3, 3, 1, 1, 1] + [3] * 22, "length", None)
    ends_there = ([*"1+2=\n"], [3, 3, 3, 1, 0.1], "stop", "\n")  # fires at its last token, which ends it
    bodies: list = []
    handler, logs = streaming([confident, wobbly, ends_there], bodies)
    params = SamplingParams(temperature=1.0, max_step_tokens=64, seed=100, top_logprobs=2,
                            stop_below=ConfidenceStop(window, threshold))
    gen = http_gen(handler, tokenizer)
    ((a, b, c),) = asyncio.run(gen.generate_steps([StepRequest(PROBLEM, (), 3, params, ("\n",))]))
    assert all(body["stream"] and body["logprobs"] == 2 and body["n"] == 1 for body in bodies)
    assert (a.text, a.tokens, a.finish_reason) == ("12+34=46", 8, "length")
    assert len(a.top_logprobs) == 8 and a.top_logprobs[0] == pytest.approx((-1.5, -4.5))
    assert (b.text, b.tokens, b.finish_reason) == ("12+34", 5, "low_confidence")
    assert b.logprob == pytest.approx(-0.5 * (3 + 3 + 3 + 1 + 1)) and len(b.top_logprobs) == 5
    assert (c.text, c.finish_reason) == ("1+2=\n", "stop")  # the token that fired also finished it
    assert logs[1]["closed"] and not logs[1]["completed"] and logs[1]["sent"] < 28  # the stream was ended
    assert logs[0]["completed"] and logs[2]["completed"]
    assert gen.http.usage.stopped == 1
    assert a.prompt_tokens == 7 + 7 + gen.context_tokens(PROBLEM.prompt) and b.prompt_tokens == 0


def test_http_requests_ask_for_top_logprobs_only_when_wanted(tokenizer):
    bodies: list = []

    async def handler(request):
        body = json.loads(request.content)
        bodies.append(body)
        if "messages" in body:  # chat: the sampled token first, then the most likely (vLLM's order)
            content = [{"token": "4", "logprob": -1.2,
                        "top_logprobs": [{"token": "4", "logprob": -1.2}, {"token": "2", "logprob": -0.3},
                                         {"token": "2", "logprob": -0.9}, {"token": "7", "logprob": -2.5}]}]
            return httpx.Response(200, json={"choices": [{"index": 0, "message": {"content": "4"},
                                                          "logprobs": {"content": content}, "finish_reason": "length"}],
                                             "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
        top = [{"4": -1.2, "2": -0.3, "5": -0.9, "7": -2.5}]
        return httpx.Response(200, json={"choices": [{"index": 0, "text": "4", "finish_reason": "length", "logprobs": {
            "tokens": ["4"], "token_logprobs": [-1.2], "top_logprobs": top}}], "usage": {"prompt_tokens": 3}})

    def ask(api, k):
        params = SamplingParams(max_step_tokens=1, seed=1, top_logprobs=k)
        ((step,),) = asyncio.run(http_gen(handler, tokenizer, api).generate_steps(
            [StepRequest(PROBLEM, (), 1, params, ("\n",))]))
        return step, bodies[-1]

    step, body = ask("completions", 0)
    assert body["logprobs"] == 1 and step.top_logprobs is None
    step, body = ask("completions", 3)
    assert body["logprobs"] == 3 and step.top_logprobs == ((-0.3, -0.9, -1.2),)
    step, body = ask("chat", 0)
    assert body["logprobs"] is True and "top_logprobs" not in body and step.top_logprobs is None
    step, body = ask("chat", 3)  # k + 1 asked; the k largest kept, two tokens of one text both counted
    assert body["top_logprobs"] == 4 and step.top_logprobs == ((-0.3, -0.9, -1.2),)
    step, body = ask("chat", 20)
    assert body["top_logprobs"] == 20  # OpenAI's cap


def test_http_race_refuses_stop_below(tokenizer):
    gen = http_gen(lambda r: httpx.Response(500), tokenizer)
    params = SamplingParams(seed=100, top_logprobs=2, stop_below=ConfidenceStop(4, 1.0))
    with pytest.raises(ValueError, match="stop_below"):
        asyncio.run(gen.race(StepRequest(PROBLEM, (), 2, params, ())))
