"""The OpenAI-compatible backends against real vLLM servers for the embedded models.

One vLLM server for the policy and one for the PRM (started together, once per
module; all tests in one xdist group, so ``pytest -n auto --dist loadgroup`` runs
them on one worker). What is checked:

- the step contract on a real server (stop strings, finish reasons, token counts,
  ``n > 1``), and exact agreement with the local Hugging Face backends: greedy step
  text and log-probability vs :class:`HFGenerator`, PRM scores vs :class:`HFTagPRM`;
- particle filtering end to end through ``run_many``, and ``itscale bench`` with
  ``http://`` policy and PRM;
- races (``OpenAIGenerator.race``): the losers' requests are aborted on the server (its
  ``/metrics``: fewer tokens generated than the samples run to the end, the long ones never
  finish), and an unreachable server gives the error step ``generate_steps`` gives;
- confidence (DeepConf): ``top_logprobs`` are the raw (temperature-1) top-k and agree with
  :class:`HFGenerator`'s and with a forward pass at sampled tokens, over the completions and
  the chat API; ``stop_below`` ends the stream of a sample whose confidence drops, at the
  token where the rule fires, and the server stops generating it;
- fault handling through :class:`servers.FaultProxy` (5xx, delays past the client
  timeout, dropped connections: retried; persistent failures: the particles die and
  the run still returns), and ``check()`` failing fast on a bad endpoint or model;
- ``itscale serve`` with two policy URLs (the server and a proxy in front of it): its
  ``/metrics`` counts each URL's requests as the proxy counts them.

Needs ``.venv-vllm`` (``make test`` creates it); ``ITSCALE_SKIP_VLLM=1`` skips.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import math
import time

import pytest

pytest.importorskip("httpx")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from servers import BLOCK_SIZE, ROOT, FaultProxy, free_port, prm_dir, require_vllm, start_vllms  # noqa: E402

from itscale import zoo  # noqa: E402
from itscale.lm import BackendError, EndpointPool, HFGenerator, Lookahead, OpenAIGenerator  # noqa: E402
from itscale.lm.loading import chat_prompt, encode  # noqa: E402
from itscale.rewards import HFTagPRM  # noqa: E402
from itscale.rewards.remote import RemoteTagPRM  # noqa: E402
from itscale.strategies import make_strategy, run_many  # noqa: E402
from itscale.testing.contracts import Case, GeneratorContract, PRMContract  # noqa: E402
from itscale.tasks import arithmetic  # noqa: E402
from itscale.lm import confidence as conf  # noqa: E402
from itscale.types import ConfidenceStop, Problem, SamplingParams, ScoreRequest, Step, StepRequest  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("vllm")]

POLICY = zoo.policy_path()
PRM = prm_dir()
STOP = (arithmetic.DELIMITER,)
PROBLEMS = arithmetic.eval_set("medium")
PF_SAMPLING = SamplingParams(temperature=0.8, max_step_tokens=24)


@pytest.fixture(scope="module")
def servers():
    """The policy and PRM vLLM servers, started together, stopped after the module."""
    require_vllm()
    with start_vllms(POLICY, PRM) as (policy, prm):
        print(f"vLLM ready: policy {policy.ready_after:.0f} s, PRM {prm.ready_after:.0f} s")
        yield policy, prm


@pytest.fixture(scope="module")
def policy_url(servers):
    return servers[0].url


@pytest.fixture(scope="module")
def prm_url(servers):
    return servers[1].url


@pytest.fixture(autouse=True)
def servers_survive(request):
    """After each test that used the servers: fail it, with the server's log, if one died;
    and report their start-up time."""
    if "servers" in request.fixturenames:  # shown in the run's "measurements" section
        policy, prm = request.getfixturevalue("servers")
        request.node.user_properties.append(
            ("itscale_measurement", ("vLLM start-up (policy and PRM servers started together)",
                                     f"policy {policy.ready_after:.1f} s, PRM {prm.ready_after:.1f} s")))
    yield
    if "servers" in request.fixturenames:
        for server in request.getfixturevalue("servers"):
            server.check_alive()


@pytest.fixture(scope="module")
def hf_policy():
    torch.set_num_threads(1)
    return HFGenerator.from_pretrained(POLICY, run_in_thread=False)


@pytest.fixture(scope="module")
def hf_prm():
    torch.set_num_threads(1)
    return HFTagPRM.from_pretrained(PRM, delimiter=arithmetic.DELIMITER, run_in_thread=False)


def policy(url: str, merge_prompts: int = 256, kv_block: int | None = None, **http) -> OpenAIGenerator:
    """A generator for the embedded policy (tokenizer from the served folder); fast backoff;
    wrapped in block-aligned look-ahead with ``kv_block``."""
    gen = OpenAIGenerator(EndpointPool(url, backoff_base=0.01, **http), str(POLICY), merge_prompts=merge_prompts)
    return gen if kv_block is None else Lookahead(gen, kv_block)


def prm(url: str, **http) -> RemoteTagPRM:
    return RemoteTagPRM(EndpointPool(url, backoff_base=0.01, **http), str(PRM), delimiter=arithmetic.DELIMITER)


def reference(problem) -> list[str]:
    """The correct solution's steps, each with its delimiter."""
    return [s + arithmetic.DELIMITER for s in arithmetic.reference_steps(*arithmetic.parse_prompt(problem.prompt))]


def request(problem, steps=(), k=1, temperature=0.0, max_tokens=24, seed=None) -> StepRequest:
    params = SamplingParams(temperature=temperature, max_step_tokens=max_tokens, seed=seed)
    return StepRequest(problem, tuple(Step(s) for s in steps), k, params, STOP)


def generate(gen: OpenAIGenerator, requests):
    async def go():
        async with gen:
            return await gen.generate_steps(requests)

    return asyncio.run(go())


def score(scorer: RemoteTagPRM, requests):
    async def go():
        async with scorer:
            return await scorer.score_steps(requests)

    return asyncio.run(go())


def run_pf(gen, scorer, problems, budget):
    """Particle filtering over ``problems`` through ``run_many``; closes the clients."""
    strategy = make_strategy("particle_filtering", gen, scorer, format=arithmetic.STEP_FORMAT, sampling=PF_SAMPLING)

    async def go():
        try:
            return await run_many(strategy, problems, budget, seed=0)
        finally:
            await gen.aclose()
            await scorer.aclose()

    return asyncio.run(go())


# -- the step contract --------------------------------------------------------------------

class TestContractOfThePolicy(GeneratorContract):
    """The shipped Generator suite on a real server: seeded requests, merged prompts, look-ahead."""

    @pytest.fixture(params=["seeded", "merged", "look-ahead"])
    def generator(self, request, policy_url):
        return {"seeded": lambda: policy(policy_url, merge_prompts=1), "merged": lambda: policy(policy_url),
                "look-ahead": lambda: policy(policy_url, kv_block=BLOCK_SIZE)}[request.param]()

    @pytest.fixture
    def contract_case(self, generator):
        return Case(seeded=getattr(generator, "merge_prompts", None) == 1, top_logprobs=3)


class TestContractOfThePRM(PRMContract):
    @pytest.fixture
    def prm(self, prm_url):
        return prm(prm_url)


def test_steps_end_at_the_delimiter(policy_url):
    problems = PROBLEMS[:3]
    gen = policy(policy_url)
    firsts = [request(p) for p in problems]
    later = [request(p, reference(p)[:2]) for p in problems]
    final = [request(p, reference(p)[:-1]) for p in problems]  # the answer line comes next, then <|end|>
    short = [request(p, max_tokens=3) for p in problems]
    out = generate(gen, firsts + later + final + short)
    n = len(problems)
    for (step,), req in zip(out[: 2 * n], firsts + later):
        assert step.finish_reason == "stop" and step.error is None
        assert step.text.endswith("\n") and step.text.count("\n") == 1
        assert arithmetic.is_well_formed_step(step.text.strip())
        assert step.tokens == len(step.text)  # one character per token, the stop string included
        text, special = chat_prompt(gen.tokenizer, req.problem.prompt)
        expected_prompt = len(encode(gen.tokenizer, text + req.prefix, add_special_tokens=special))
        assert step.prompt_tokens == expected_prompt
    for (step,) in out[2 * n: 3 * n]:
        assert step.finish_reason == "eos" and step.text.startswith(arithmetic.ANSWER_PREFIX.strip())
        assert step.tokens == len(step.text) + 1  # the end-of-sequence token counts, but is not in the text
    for (step,) in out[3 * n:]:
        assert step.finish_reason == "length" and step.tokens == 3 and len(step.text) == 3


def test_n_samples_per_request(policy_url):
    gen = policy(policy_url, merge_prompts=1)  # seeded: the same 8 samples every run
    ((*steps,),) = generate(gen, [request(PROBLEMS[0], k=8, temperature=1.5, seed=3)])
    assert len(steps) == 8 and all(s.error is None and s.tokens > 0 for s in steps)
    assert len({s.text for s in steps}) >= 3  # diverse at temperature 1.5
    assert gen.http.usage.requests == 1 and gen.capabilities.n_per_request  # one request with n=8
    assert steps[0].prompt_tokens > 0 and all(s.prompt_tokens == 0 for s in steps[1:])


def test_merged_requests_sample_every_copy_and_seeded_requests_repeat(policy_url):
    gen = policy(policy_url)  # merging on (the default)
    a, b = generate(gen, [request(PROBLEMS[0], k=8, temperature=2.0), request(PROBLEMS[1], k=8, temperature=2.0)])
    assert gen.http.usage.requests == 1  # 16 prompts in one HTTP request
    assert all(s.error is None and s.tokens > 0 for s in a + b)
    # copies are sampled apart (with one seed for the whole request they would all be the same)
    assert len({s.text for s in a}) >= 3 and len({s.text for s in b}) >= 3
    assert a[0].prompt_tokens > 0 and b[0].prompt_tokens > 0 and a[1].prompt_tokens == 0
    seeded = [request(PROBLEMS[0], k=4, temperature=1.5, seed=5), request(PROBLEMS[1], temperature=1.5, seed=6)]
    first = generate(policy(policy_url, merge_prompts=1), seeded)
    again = generate(policy(policy_url, merge_prompts=1), seeded)
    assert [[s.text for s in o] for o in first] == [[s.text for s in o] for o in again]


def test_whole_solutions_longer_than_the_context_are_capped(policy_url):
    """A pooled method asks for max_step_tokens × max_steps tokens (48 × 10, the bench's default) in
    one request, more than the embedded policy's 256 positions: like HFGenerator, the client
    should get what fits (finish ``eos`` or ``length``), not an error."""
    whole = StepRequest(PROBLEMS[0], (), 2, SamplingParams(temperature=0.8, max_step_tokens=480, seed=0), ())
    ((*steps,),) = generate(policy(policy_url), [whole])
    assert all(s.error is None and s.finish_reason in ("eos", "length") for s in steps), steps[0].error


def test_greedy_steps_match_hf_generator(policy_url, hf_policy):
    requests = []
    for p in PROBLEMS[:4]:
        ref = reference(p)
        requests += [request(p, ref[:t]) for t in (0, 1, 3, len(ref) - 1)]
    remote = generate(policy(policy_url), requests)
    local = hf_policy.generate_steps_sync(requests)
    for req, (r,), (h,) in zip(requests, remote, local):
        assert (r.text, r.finish_reason, r.tokens) == (h.text, h.finish_reason, h.tokens), req.prefix
        assert r.logprob == pytest.approx(h.logprob, abs=1e-3)


def test_remote_prm_matches_hf_prm(prm_url, hf_prm):
    requests = []
    for p in PROBLEMS[:4]:
        ref = reference(p)
        wrong = ref[0].replace("=", "=1", 1)  # a wrong first result
        requests += [ScoreRequest(p, tuple(ref)), ScoreRequest(p, (wrong, *ref[1:3])), ScoreRequest(p, tuple(ref[:1]))]
    scorer = prm(prm_url)
    remote = score(scorer, requests)
    local = hf_prm.score_steps_sync(requests)
    for r, h in zip(remote, local):
        assert len(r.scores) == len(h.scores)
        assert r.scores == pytest.approx(h.scores, abs=1e-3)
    assert scorer.stats.failed_steps == 0 and scorer.stats.bounded_steps == 0
    assert all(r.tokens > 0 for r in remote[:2])


# -- a strategy end to end ------------------------------------------------------------------

def test_particle_filtering_end_to_end(policy_url, prm_url):
    problems = PROBLEMS[:8]
    gen, scorer = policy(policy_url), prm(prm_url)
    results = run_pf(gen, scorer, problems, budget=8)
    assert [r.status for r in results] == ["ok"] * len(problems), [r.message for r in results]
    assert all(r.answer is not None for r in results)
    correct = sum(arithmetic.is_correct(r.problem, r.solution) for r in results)
    assert correct > 0
    for r in results:
        assert r.cost.generated_tokens > 0 and r.cost.prompt_tokens > 0 and r.cost.prm_tokens > 0
        assert r.cost.policy_calls > 0 and r.cost.prm_calls > 0
    assert gen.http.usage.failures == 0 and scorer.stats.failed_steps == 0
    generated = sum(r.cost.generated_tokens for r in results)
    assert generated <= gen.http.usage.completion_tokens  # every counted token came from the server


def prefilled_tokens(url: str) -> float:
    """The server's prompt tokens minus its prefix-cached ones, so far (``/metrics``)."""
    import httpx

    counters = {}
    for line in httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in ("vllm:prompt_tokens_total", "vllm:prompt_tokens_cached_total"):
            counters[name] = counters.get(name, 0.0) + float(line.split()[-1])
    return counters["vllm:prompt_tokens_total"] - counters.get("vllm:prompt_tokens_cached_total", 0.0)


def test_particle_filtering_with_block_aligned_look_ahead(policy_url, prm_url):
    """kv_block=32 (the test servers' block): the run is as sound as with plain step requests,
    and the server prefills far fewer tokens (continuations start on block boundaries)."""
    problems = PROBLEMS[:8]
    before = prefilled_tokens(policy_url)
    results = run_pf(policy(policy_url, kv_block=BLOCK_SIZE), prm(prm_url), problems, budget=8)
    ahead = prefilled_tokens(policy_url) - before
    assert [r.status for r in results] == ["ok"] * len(problems), [r.message for r in results]
    assert sum(arithmetic.is_correct(r.problem, r.solution) for r in results) > 0
    assert all(r.cost.generated_tokens > 0 for r in results)
    before = prefilled_tokens(policy_url)
    run_pf(policy(policy_url), prm(prm_url), problems, budget=8)
    plain = prefilled_tokens(policy_url) - before
    # Measured with the issue-14 PRM: ahead / plain 0.49, 0.52, 0.55, 0.58 over four runs (unseeded
    # sampling); below 0.5 with the PRM before it. This PRM resamples harder, and each copy a
    # resampling makes starts a fresh continuation mid-block. Without look-ahead the ratio is ~1.
    assert ahead < 0.7 * plain, (ahead, plain)


# -- races ------------------------------------------------------------------------------------

#: Outside the embedded policy's task: its whole solutions run from about 15 to past 150 tokens.
NUMBERS = Problem("numbers", "1 2 3 4 5 6 7 8 9")


def server_counters(url: str, settle: float = 15.0) -> dict[str, float]:
    """The server's generated tokens and finished requests from ``/metrics`` (vLLM 0.32 leaves
    aborted requests out of ``vllm:request_success_total``, its ``abort`` label included), once
    nothing runs and the counters stand still (a request the server did not abort would go on
    generating, and finish)."""
    import httpx

    def read() -> dict[str, float]:
        out = {"generated": 0.0, "finished": 0.0, "running": 0.0}
        for line in httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text.splitlines():
            name = line.split("{")[0].split(" ")[0]
            key = {"vllm:generation_tokens_total": "generated", "vllm:request_success_total": "finished",
                   "vllm:num_requests_running": "running"}.get(name)
            if key is not None:
                out[key] += float(line.split()[-1])
        return out

    deadline, last = time.monotonic() + settle, read()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = read()
        if now == last and now["running"] == 0:
            break
        last = now
    return last


def test_a_race_cancels_the_losing_requests_on_the_server(policy_url, request):
    """``OpenAIGenerator.race`` with 8 seeded samples of one whole solution: the winner is the
    sample ``generate_steps`` gives for its seed, and the server shows the others were stopped: it
    generated far fewer tokens than the 8 samples run to the end (measured first, same seeds), and
    the long samples never finished (vLLM aborted them when their connections closed)."""
    k, seed = 8, 0
    params = SamplingParams(temperature=1.0, max_step_tokens=180, seed=seed)
    singles = [StepRequest(NUMBERS, (), 1, dataclasses.replace(params, seed=seed + j), ()) for j in range(k)]
    start = server_counters(policy_url)
    full = [s for (s,) in generate(policy(policy_url, merge_prompts=1), singles)]
    ran = server_counters(policy_url)
    lengths = [s.tokens for s in full]
    assert all(s.error is None for s in full) and ran["generated"] - start["generated"] == sum(lengths)
    long = sum(n > min(lengths) + 40 for n in lengths)
    assert long >= 2, lengths  # the premise: some samples run far past the shortest

    gen = policy(policy_url, merge_prompts=1)

    async def go():
        async with gen:  # read the server while the client still runs (its pool open): only the race
            out = await gen.race(StepRequest(NUMBERS, (), k, params, ()))  # may have stopped the others
            return out, await asyncio.to_thread(server_counters, policy_url)

    out, raced = asyncio.run(go())
    generated = raced["generated"] - ran["generated"]
    finished = raced["finished"] - ran["finished"]
    winner = out.winner
    assert winner.error is None and winner.finish_reason in ("eos", "length") and winner.tokens > 0
    assert winner.text == full[out.index].text and winner.tokens == lengths[out.index]  # seeded: that very sample
    assert winner.tokens <= min(lengths) + 8  # the first to complete is (about) the shortest
    # On a quiet machine the client cancels every long sample (measured: 256-268 tokens generated of
    # 568). What the client counts as cancelled is what it had not read to the end when it closed the
    # stream: a sample a few tokens longer than the winner may already have finished on the server
    # (CI, loaded: 7 cancelled, 3 finished), and a client starved of CPU closes late, so the server
    # runs on for a while. Asserted is what holds however late the client is, short of seconds: the
    # server did not finish every sample, and generated fewer tokens than the 8 samples run to the end.
    assert out.cancelled >= 1 and gen.http.usage.cancelled >= out.cancelled
    assert 1 <= finished < k  # the server aborted at least one sample when its connection closed
    assert out.spent_tokens <= generated < sum(lengths)
    measured = (f"the server generated {generated:.0f} tokens (the client counted {out.spent_tokens}) against "
                f"{sum(lengths)} for the samples run to the end (lengths {lengths}); {out.cancelled} cancelled, "
                f"{finished:.0f} finished")
    request.node.user_properties.append(
        ("itscale_measurement", ("vLLM race of 8 whole-solution samples (embedded policy)", measured)))


def test_a_race_at_an_unreachable_server_gives_the_error_step():
    gen = policy(f"http://127.0.0.1:{free_port()}/v1", retries=1)
    req = StepRequest(NUMBERS, (), 3, SamplingParams(max_step_tokens=8, seed=0), ())

    async def go():
        async with gen:
            return await gen.race(req), await gen.generate_steps([req])

    out, ((expected, *_),) = asyncio.run(go())
    assert out.winner.failed and out.winner.error == expected.error
    assert "no HTTP response (after 2 attempts)" in out.winner.error and "is the server running" in out.winner.error
    assert (out.index, out.spent_tokens, out.cancelled) == (0, 0, 0)


# -- confidence (DeepConf) ---------------------------------------------------------------------

def max_gap(a, b) -> float:
    """The largest |difference| between two steps' top log-probabilities, token by token."""
    assert len(a) == len(b)
    return max(abs(x - y) for ta, tb in zip(a, b) for x, y in zip(ta, tb, strict=True))


def test_top_logprobs_are_raw_and_match_hf_generator(policy_url, hf_policy, request):
    """vLLM 0.32's default ``--logprobs-mode raw_logprobs``: the top-k of the model's distribution
    at temperature 1, as HFGenerator reports: greedy steps (the same tokens) agree position by
    position, and so do the top-k of samples drawn at temperature 2 with a forward pass of the HF
    model at the tokens the server sampled (processed log-probabilities at T = 2 would be far
    flatter). The chat API (asked k + 1, see ``itscale.lm.completions``) returns the same."""
    k = 20
    greedy_k = SamplingParams(temperature=0.0, max_step_tokens=24, top_logprobs=k)
    requests = [StepRequest(p, tuple(Step(x) for x in reference(p)[:t]), 1, greedy_k, STOP)
                for p in PROBLEMS[:3] for t in (0, 2, len(reference(p)) - 1)]
    remote = generate(policy(policy_url), requests)
    local = hf_policy.generate_steps_sync(requests)
    greedy = 0.0
    for (r,), (h,) in zip(remote, local):
        assert (r.text, r.tokens, r.finish_reason) == (h.text, h.tokens, h.finish_reason)
        assert len(r.top_logprobs) == r.tokens and all(len(t) == k for t in r.top_logprobs)
        greedy = max(greedy, max_gap(r.top_logprobs, h.top_logprobs))
    # samples at temperature 2 (seeded): the top-k at the server's own tokens, by a forward pass
    hot = [StepRequest(NUMBERS, (), 1, SamplingParams(temperature=2.0, max_step_tokens=40, seed=s, top_logprobs=5), ())
           for s in (1, 2)]
    sampled = 0.0
    for (r,), req in zip(generate(policy(policy_url, merge_prompts=1), hot), hot):
        ctx = encode(hf_policy.tokenizer, hf_policy.context_text(req.problem.prompt), add_special_tokens=False)
        eos = [hf_policy.tokenizer.eos_token_id] if r.finish_reason == "eos" else []
        ids = ctx + encode(hf_policy.tokenizer, r.text) + eos
        assert len(ids) - len(ctx) == r.tokens  # character-level: one token per character
        with torch.no_grad():
            logp = torch.log_softmax(hf_policy.model(torch.tensor([ids])).logits[0].to(torch.float64), -1)
        want = [tuple(logp[i - 1].topk(5).values.tolist()) for i in range(len(ctx), len(ids))]
        sampled = max(sampled, max_gap(r.top_logprobs, want))
    # the chat API, k + 1 asked: the same top-k as the completions API
    chat = OpenAIGenerator(EndpointPool(policy_url, backoff_base=0.01), str(POLICY), api="chat")
    firsts = [requests[0], requests[3]]  # first steps: the server's chat template gives the same context
    chat_gap = max(max_gap(c.top_logprobs, r.top_logprobs)
                   for (c,), (r,) in zip(generate(chat, firsts), generate(policy(policy_url), firsts)))
    assert greedy < 1e-3 and sampled < 1e-3 and chat_gap < 1e-3, (greedy, sampled, chat_gap)
    request.node.user_properties.append(("itscale_measurement", (
        "vLLM top_logprobs vs HFGenerator (raw, temperature 1)",
        f"greedy top-20 max |Δ| {greedy:.1e}; T=2 samples vs a forward pass {sampled:.1e}; chat vs completions "
        f"{chat_gap:.1e}")))


def test_low_confidence_stop_ends_the_request_on_the_server(policy_url, request):
    """``stop_below`` on k streamed samples of a whole solution: a sample stops with
    ``low_confidence`` exactly at the first token where the mean confidence of its last ``window``
    tokens (computed from the samples run to the end, same seeds) falls below the threshold; the
    others are as they were; and the server saw the stopped requests go: it generated about the
    tokens the client kept (far fewer than the samples run to the end) and never finished them."""
    k, seed, window = 6, 0, 8
    params = SamplingParams(temperature=1.0, max_step_tokens=180, seed=seed, top_logprobs=5)
    singles = [StepRequest(NUMBERS, (), 1, dataclasses.replace(params, seed=seed + j), ()) for j in range(k)]
    full = [s for (s,) in generate(policy(policy_url, merge_prompts=1), singles)]
    assert all(s.error is None and len(s.top_logprobs) == s.tokens for s in full)
    groups = [conf.group_confidences(conf.token_confidences(s.top_logprobs), window) for s in full]

    def first_stops(t: float) -> list[int | None]:  # by hand: the token count at which each sample stops
        return [next((window + i for i, g in enumerate(gs) if g < t), None) for gs in groups]

    def early(t: float) -> list[int]:  # the samples it stops 30 tokens or more before their end
        return [j for j, n in enumerate(first_stops(t)) if n is not None and n <= full[j].tokens - 30]

    # the lowest threshold (1e-3 above some window's mean, no window within 2e-4 of it: float rounding
    # differs between runs by ~1e-5) at which some samples stop well before their end (the server
    # goes on for a few tokens before it sees the client go) and the others never stop
    every = sorted(g for gs in groups for g in gs)
    threshold = next(t for t in (g + 1e-3 for g in every)
                     if early(t) and None in first_stops(t) and all(abs(g - t) > 2e-4 for g in every)
                     and all(n is None or j in early(t) for j, n in enumerate(first_stops(t))))
    expected, stops = first_stops(threshold), early(threshold)
    before = server_counters(policy_url)
    gen = policy(policy_url, merge_prompts=1)
    stopped_params = dataclasses.replace(params, stop_below=ConfidenceStop(window, threshold))

    async def go():
        async with gen:  # read the server while the client still runs
            out = await gen.generate_steps([StepRequest(NUMBERS, (), k, stopped_params, ())])
            return out[0], await asyncio.to_thread(server_counters, policy_url)

    steps, after = asyncio.run(go())
    for j, (s, f) in enumerate(zip(steps, full)):
        if j in stops:
            assert (s.finish_reason, s.tokens) == ("low_confidence", expected[j]), (j, s, expected[j])
            assert f.text.startswith(s.text) and len(s.text) == s.tokens == len(s.top_logprobs)
        else:
            assert (s.text, s.tokens, s.finish_reason) == (f.text, f.tokens, f.finish_reason)
    assert gen.http.usage.stopped == len(stops)
    generated = after["generated"] - before["generated"]
    finished = after["finished"] - before["finished"]
    kept = sum(s.tokens for s in steps)
    assert finished == k - len(stops), (expected, [f.tokens for f in full], generated, kept)  # the stopped were aborted
    # the server may have generated a few more tokens per stopped sample before it saw the client go
    assert kept <= generated <= kept + 24 * len(stops)
    assert generated < sum(f.tokens for f in full) - 20
    request.node.user_properties.append(("itscale_measurement", (
        "vLLM low-confidence stop (embedded policy, 6 whole solutions, window 8)",
        f"{len(stops)} stopped at tokens {[expected[j] for j in stops]} of {[full[j].tokens for j in stops]}; "
        f"the server generated {generated:.0f} tokens, the client kept {kept}, {sum(f.tokens for f in full)} "
        f"run to the end")))


# -- faults -----------------------------------------------------------------------------------

def test_transient_server_errors_are_retried(policy_url, prm_url):
    problems = PROBLEMS[8:10]
    with FaultProxy(policy_url) as pp, FaultProxy(prm_url) as rp:
        pp.fail_next(3)
        rp.fail_next(2, status=503)
        gen, scorer = policy(pp.url), prm(rp.url)
        results = run_pf(gen, scorer, problems, budget=4)
    assert all(r.ok and r.answer is not None for r in results), [r.message for r in results]
    assert (pp.failed, rp.failed) == (3, 2)
    assert gen.http.usage.retries == 3 and scorer.http.usage.retries == 2
    assert gen.http.usage.failures == 0 and scorer.stats.failed_steps == 0


@pytest.mark.parametrize("broken", ["policy", "prm"])
def test_persistent_failures_kill_particles_not_the_run(policy_url, prm_url, broken):
    problems = PROBLEMS[10:12]
    with FaultProxy(policy_url) as pp, FaultProxy(prm_url) as rp:
        (pp if broken == "policy" else rp).fail_next(math.inf)
        gen, scorer = policy(pp.url, retries=1), prm(rp.url, retries=1)
        results = run_pf(gen, scorer, problems, budget=4)  # no exception escapes
    assert len(results) == len(problems)
    # a policy that fails every call makes each result an error carrying the server's words; a PRM
    # that fails leaves the particles without weight: all_dead
    expected = "error" if broken == "policy" else "all_dead"
    assert [r.status for r in results] == [expected] * len(problems), [r.message for r in results]
    if broken == "policy":
        assert all("HTTP 500" in r.message for r in results), [r.message for r in results]
        assert pp.failed >= 2 * len(problems) and pp.forwarded == 0  # one retry per request
        assert gen.http.usage.failures >= len(problems)
    else:
        assert rp.failed >= 2 and rp.forwarded == 0
        assert scorer.stats.failed_steps > 0 and "HTTP 500" in scorer.stats.last_error


def test_slow_replies_time_out_and_are_retried(policy_url, prm_url):
    problem = PROBLEMS[12]
    with FaultProxy(policy_url) as pp, FaultProxy(prm_url) as rp:
        pp.delay_next(2, 6.0)
        rp.delay_next(1, 6.0)
        gen, scorer = policy(pp.url, timeout=2.0), prm(rp.url, timeout=2.0)
        t = time.perf_counter()
        ((step,),) = generate(gen, [request(problem)])
        (scores,) = score(scorer, [ScoreRequest(problem, (step.text,))])
        elapsed = time.perf_counter() - t
    assert step.error is None and step.finish_reason == "stop"
    assert not math.isnan(scores.scores[0])
    assert pp.delayed == 2 and rp.delayed == 1
    assert gen.http.usage.retries >= 2 and scorer.http.usage.retries >= 1
    assert elapsed < 12  # the client gave up after 2 s each time, it did not wait out the delays


def test_dropped_connections_are_retried(policy_url, prm_url):
    problem = PROBLEMS[13]
    with FaultProxy(policy_url) as pp, FaultProxy(prm_url) as rp:
        pp.drop_next(2)
        rp.drop_next(2)
        gen, scorer = policy(pp.url), prm(rp.url)
        ((*steps,),) = generate(gen, [request(problem, k=2, temperature=0.8, seed=0)])
        (scores,) = score(scorer, [ScoreRequest(problem, tuple(reference(problem)))])
    assert all(s.error is None and s.finish_reason == "stop" for s in steps)
    assert not any(math.isnan(s) for s in scores.scores)
    assert (pp.dropped, rp.dropped) == (2, 2)
    assert gen.http.usage.retries == 2 and scorer.http.usage.retries == 2


# -- fail fast ----------------------------------------------------------------------------------

def check(client) -> tuple[BackendError, float]:
    async def go():
        async with client:
            await client.check()

    t = time.perf_counter()
    with pytest.raises(BackendError) as info:
        asyncio.run(go())
    return info.value, time.perf_counter() - t


def test_check_fails_fast_on_an_unreachable_server():
    port = free_port()
    for client in (policy(f"http://127.0.0.1:{port}/v1"), prm(f"http://127.0.0.1:{port}/v1")):
        err, elapsed = check(client)
        assert elapsed < 5
        assert err.status is None and f"127.0.0.1:{port}/v1/models" in str(err)
        assert "cannot reach the server" in str(err) and "is the server running" in str(err)


def test_check_fails_fast_on_a_model_the_server_does_not_serve(policy_url, prm_url):
    clients = (OpenAIGenerator(policy_url, "no-such-model", tokenizer=POLICY),
               RemoteTagPRM(prm_url, "no-such-model", tokenizer=PRM))
    for client, served in zip(clients, (POLICY, PRM)):
        err, elapsed = check(client)
        assert elapsed < 5
        assert "'no-such-model' is not served here" in str(err) and str(served) in str(err)


# -- itscale bench ------------------------------------------------------------------------------

def test_bench_with_http_policy_and_prm(policy_url, prm_url, tmp_path):
    from rich.console import Console

    from itscale.bench.config import validate_config
    from itscale.bench.run import run_bench

    config = validate_config({
        "problems": {"source": "arithmetic:medium", "limit": 5},
        "policy": {"model": policy_url, "max_step_tokens": 24, "kv_block": BLOCK_SIZE},
        "prm": {"model": prm_url},
        "methods": [{"name": "self_consistency"}, {"name": "particle_filtering"}],
        "budgets": [2],
        "output": str(tmp_path / "bench"),
    })
    console = Console(file=io.StringIO(), width=140)
    outcome = run_bench(config, console)
    log = console.file.getvalue()
    assert [(r.method, r.budget, r.n, r.errors) for r in outcome.rows] == [
        ("self_consistency", 2, 5, 0), ("particle_filtering", 2, 5, 0)], log
    assert all(r.generated_tokens > 0 for r in outcome.rows)
    assert outcome.rows[1].prm_tokens > 0
    assert (outcome.folder / "report.html").is_file()


# -- itscale serve without torch ----------------------------------------------------------------
HTTP_VENV = ROOT / ".venv-http"


def test_an_http_only_server_needs_no_torch(policy_url, prm_url, tmp_path):
    """``.venv-http`` (``make test`` creates it) has ``itscale[serve,tokenizer]`` (FastAPI, httpx,
    transformers for the chat template) but no torch: ``itscale serve`` there puts particle
    filtering in front of these servers and the official ``openai`` client gets an answer.
    Any import of torch on that path would stop the server at start-up."""
    import subprocess

    import httpx
    import openai

    itscale = HTTP_VENV / "bin" / "itscale"
    if not itscale.exists():
        pytest.fail(f"{HTTP_VENV} is missing: run `make test` (it creates the environment without torch)")
    probe = subprocess.run([str(HTTP_VENV / "bin" / "python"), "-c", "import torch"], capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr  # the premise: no torch there
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(itscale), "serve", "--policy", policy_url, "--prm", prm_url, "--format", "arithmetic",
                                 "--served-model-name", "tiny", "--port", str(port), "--no-access-log"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the server did not start in 90 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        problem = arithmetic.eval_set("easy")[0]
        reply = client.chat.completions.create(model="tiny:pf-4", seed=3, max_tokens=128,
                                               messages=[{"role": "user", "content": problem.prompt}])
        text = reply.choices[0].message.content
        assert "Answer:" in text and reply.usage.completion_tokens > 0, text
        assert [m.id for m in client.models.list().data] == ["tiny"]
        print(f"torch-free server: {problem.prompt!r} -> {text!r}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def test_itscale_serve_shows_the_load_on_each_policy_url(policy_url, prm_url, tmp_path):
    """``itscale serve --policy URL1,URL2``: its ``/metrics`` counts the requests sent to each
    URL. The second URL is a :class:`servers.FaultProxy` in front of the same vLLM server, which
    counts what reaches it on its own: the server's count for that URL must equal the proxy's,
    and both URLs must get a share."""
    import openai
    from serve.conftest import ServeProcess

    with FaultProxy(policy_url) as proxy:
        server = ServeProcess("upstream", ["--policy", f"{policy_url},{proxy.url}", "--prm", prm_url, "--format",
                                           "arithmetic", "--served-model-name", "tiny"], log_dir=tmp_path,
                              replica="upstream-1")
        with server.running():
            proxy.reset_counts()  # (start-up listed the models on both URLs)
            with openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120) as client:
                for i, problem in enumerate(PROBLEMS[:3]):
                    reply = client.chat.completions.create(
                        model="tiny:pf-4", seed=i, max_tokens=96, messages=[{"role": "user", "content": problem.prompt}])
                    assert "Answer:" in reply.choices[0].message.content
            m = server.metrics()  # (checks the replica label on every sample)
    sent = {url: m[f'itscale_upstream_requests_total{{backend="policy",endpoint="{url}"}}']
            for url in (policy_url, proxy.url)}
    print(f"policy requests per URL: {sent}; the proxy saw {dict(proxy.paths)}")
    assert sent[proxy.url] == proxy.requests == proxy.forwarded  # what the proxy saw, counted by itscale serve
    assert sent[policy_url] > 0 and sent[proxy.url] > 0  # both URLs got a share
    assert min(sent.values()) >= sum(sent.values()) / 4  # (the least busy URL gets each request: about half each)
    for url in (policy_url, proxy.url):
        assert m[f'itscale_upstream_errors_total{{backend="policy",endpoint="{url}"}}'] == 0
        assert m[f'itscale_upstream_in_flight{{backend="policy",endpoint="{url}"}}'] == 0
    assert m[f'itscale_upstream_requests_total{{backend="prm",endpoint="{prm_url}"}}'] > 0
    assert m['itscale_requests_total{outcome="ok"}'] == 3
