"""Contract suites for backends: what every Generator and every PRM must do.

A third-party backend (or one of ours) runs the suites against itself. With pytest,
subclass the mixins and provide the backend as a fixture::

    from itscale.testing.contracts import GeneratorContract, PRMContract

    class TestMyPolicy(GeneratorContract):
        @pytest.fixture
        def generator(self):
            return MyPolicy(...)

    class TestMyPRM(PRMContract):
        @pytest.fixture
        def prm(self):
            return MyPRM(...)

Each check becomes its own test. Override the ``contract_case`` fixture to give a
problem and steps your backend understands (:class:`Case`; ``seeded=True`` adds the
checks that need :attr:`SamplingParams.seed` to be honoured). Without pytest, await
:func:`check_generator` / :func:`check_prm`, which run every check and raise
:class:`AssertionError` naming the first broken rule. (The mixins own an event loop for
each check, as pytest-asyncio would; the checks themselves are plain coroutines.)

The rules (from :mod:`itscale.protocols`):

Generator
  - ``capabilities`` is a :class:`~itscale.types.Capabilities`; an empty call returns ``[]``;
  - one list per request, in request order, of exactly ``k`` :class:`~itscale.types.Step` s;
  - ``finish_reason`` is ``stop``, ``eos``, ``length``, ``low_confidence`` or ``error``; an
    ``error`` step has empty text and a message, and nothing else has an error;
  - with stop strings, a ``stop`` step ends with one and holds no earlier one, and an
    ``eos`` / ``length`` / ``low_confidence`` step holds none; a whole solution (``stop=()``)
    never ends in ``stop``; ``low_confidence`` only where ``params.stop_below`` was set;
  - ``top_logprobs`` is ``None`` unless ``params.top_logprobs = k > 0``; then (but for an
    ``error`` step) one tuple per counted token of at most ``k`` finite values ≤ 0, descending
    (:attr:`Case.top_logprobs` > 0 adds a check that sends such requests, with and without
    ``stop_below``);
  - ``tokens`` counts generated tokens, at most ``max_step_tokens``; ``logprob`` is ``None`` or
    a finite number ≤ 0; ``prompt_tokens`` / ``prefilled_tokens`` are ``None`` or counts,
    ``prefilled ≤ prompt``;
  - a request that continues a solution prefix is served;
  - seeded backends: the same seeded request gives the same steps, alone or in a batch.

PRM
  - ``capabilities`` is a :class:`~itscale.types.Capabilities`; an empty call returns ``[]``;
  - one :class:`~itscale.types.StepScores` per request, in request order, one score per
    step, each in (0, 1) (or NaN for a failed step), ``tokens`` a count;
  - causal: the scores of a prefix are the first scores of the whole solution;
  - a request's scores do not depend on the others in the call, nor on earlier calls.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import pytest  # (this module is for test suites: it needs pytest)

from ..protocols import Generator, ProcessRewardModel
from ..types import Capabilities, ConfidenceStop, Problem, SamplingParams, ScoreRequest, Step, StepRequest, StepScores

__all__ = ["GENERATOR_CHECKS", "PRM_CHECKS", "Case", "GeneratorContract", "PRMContract", "check_generator",
           "check_prm"]

FINISH_REASONS = ("stop", "eos", "length", "low_confidence", "error")
TOLERANCE = 1e-4  # scores of the same text in different batches (padding changes float rounding)


@dataclass(frozen=True)
class Case:
    """What the checks send: two problems, the step delimiter, a solution of each (for PRMs and prefixes)."""

    problem: Problem = Problem("contract", "Start at 3. Apply in order: +4, *2.")
    other: Problem = Problem("contract-2", "Start at 5. Apply in order: -2, *3.")
    delimiter: str = "\n"
    steps: tuple[str, ...] = ("3+4=7\n", "7*2=14\n", "Answer: 14")
    other_steps: tuple[str, ...] = ("5-2=3\n", "3*3=9\n", "Answer: 9")
    max_step_tokens: int = 12
    temperature: float = 1.0
    seeded: bool = False
    top_logprobs: int = 0  # > 0: check top_logprobs and stop_below (backends that return them)

    def params(self, seed: int | None = None, max_step_tokens: int | None = None, **more) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, max_step_tokens=max_step_tokens or self.max_step_tokens,
                              seed=seed, **more)

    def step_request(self, k: int = 1, prefix: int = 0, seed: int | None = None, other: bool = False) -> StepRequest:
        """``k`` continuations of the first ``prefix`` steps of the problem (or of the other one)."""
        problem, steps = (self.other, self.other_steps) if other else (self.problem, self.steps)
        return StepRequest(problem, tuple(Step(s) for s in steps[:prefix]), k, self.params(seed), (self.delimiter,))


# -- generator checks ---------------------------------------------------------------------
def _check_step(step: Any, request: StepRequest, where: str) -> None:
    assert isinstance(step, Step), f"{where}: expected a Step, got {type(step).__name__}"
    assert step.finish_reason in FINISH_REASONS, f"{where}: finish_reason {step.finish_reason!r}"
    assert isinstance(step.tokens, int) and step.tokens >= 0, f"{where}: tokens {step.tokens!r}"
    if step.finish_reason == "error":
        assert step.text == "" and step.error, f"{where}: an error step needs empty text and a message: {step!r}"
        assert step.top_logprobs is None, f"{where}: an error step carries top_logprobs"
        return
    _check_top(step, request, where)
    assert step.error is None, f"{where}: a {step.finish_reason!r} step carries an error: {step.error!r}"
    assert isinstance(step.text, str)
    limit = request.params.max_step_tokens
    assert step.tokens <= limit, f"{where}: {step.tokens} tokens > max_step_tokens {limit}"
    if step.logprob is not None:
        assert math.isfinite(step.logprob) and step.logprob <= 1e-9, f"{where}: logprob {step.logprob!r}"
    for name in ("prompt_tokens", "prefilled_tokens"):
        value = getattr(step, name)
        assert value is None or (isinstance(value, int) and value >= 0), f"{where}: {name} {value!r}"
    if step.prompt_tokens is not None and step.prefilled_tokens is not None:
        assert step.prefilled_tokens <= step.prompt_tokens, f"{where}: prefilled > prompt tokens: {step!r}"
    stops = request.stop
    if not stops:
        assert step.finish_reason != "stop", f"{where}: a whole solution (stop=()) ended in 'stop'"
        return
    first = min((at + len(s) for s in stops if (at := step.text.find(s)) >= 0), default=None)
    if step.finish_reason == "stop":
        assert first == len(step.text), f"{where}: a 'stop' step must end at its first stop string: {step.text!r}"
    else:
        assert first is None, f"{where}: a {step.finish_reason!r} step holds a stop string: {step.text!r}"


def _check_top(step: Step, request: StepRequest, where: str) -> None:
    k, top = request.params.top_logprobs, step.top_logprobs
    if step.finish_reason == "low_confidence":
        assert request.params.stop_below is not None, f"{where}: 'low_confidence' without params.stop_below"
    if k == 0:
        assert top is None, f"{where}: top_logprobs {top!r:.80} returned but not asked for"
        return
    assert isinstance(top, tuple) and len(top) == step.tokens, \
        f"{where}: expected one top_logprobs tuple per token ({step.tokens}), got {top!r:.200}"
    for i, values in enumerate(top):
        assert isinstance(values, tuple) and 1 <= len(values) <= k, f"{where}: token {i}: {values!r} for k={k}"
        assert all(math.isfinite(v) and v <= 1e-9 for v in values), f"{where}: token {i}: {values!r}"
        assert list(values) == sorted(values, reverse=True), f"{where}: token {i}: not descending: {values!r}"


def _check_shape(out: Any, requests: list[StepRequest], what: str) -> None:
    assert isinstance(out, list) and len(out) == len(requests), \
        f"{what}: expected {len(requests)} lists of steps, got {out!r:.200}"
    for i, (steps, r) in enumerate(zip(out, requests)):
        assert isinstance(steps, list) and len(steps) == r.k, f"{what}: request {i} asked for {r.k} steps, got {steps!r:.200}"
        for j, step in enumerate(steps):
            _check_step(step, r, f"{what}: request {i}, step {j}")


async def generator_capabilities(gen, case: Case) -> None:
    assert isinstance(getattr(gen, "capabilities", None), Capabilities), "capabilities must be a Capabilities"
    assert isinstance(gen, Generator), "generate_steps is missing"
    assert await gen.generate_steps([]) == [], "an empty call must return []"


async def generator_k_steps_in_request_order(gen, case: Case) -> None:
    requests = [case.step_request(k=1), case.step_request(k=3, prefix=1, other=True),
                case.step_request(k=2, prefix=2)]
    _check_shape(await gen.generate_steps(requests), requests, "a call with k = 1, 3, 2")


async def generator_stop_strings_and_limits(gen, case: Case) -> None:
    requests = [case.step_request(k=4, seed=s) for s in (1, 2)] + [case.step_request(k=2, prefix=1)]
    out = await gen.generate_steps(requests)
    _check_shape(out, requests, "step requests")
    assert any(s.finish_reason != "error" for steps in out for s in steps), "every step failed"


async def generator_whole_solutions(gen, case: Case) -> None:
    requests = [StepRequest(case.problem, (), 2, case.params(max_step_tokens=4 * case.max_step_tokens), ())]
    out = await gen.generate_steps(requests)
    _check_shape(out, requests, "whole solutions (stop=())")


async def generator_seeded_requests_repeat(gen, case: Case) -> None:
    if not case.seeded:
        return
    one = case.step_request(k=2, prefix=1, seed=1234)
    alone = (await gen.generate_steps([one]))[0]
    again = (await gen.generate_steps([case.step_request(k=3, other=True, seed=5), one]))[1]
    assert [s.text for s in alone] == [s.text for s in again], \
        f"the same seeded request gave {[s.text for s in alone]} alone and {[s.text for s in again]} in a batch"


async def generator_top_logprobs(gen, case: Case) -> None:
    if not case.top_logprobs:
        return
    k = case.top_logprobs
    stop = ConfidenceStop(window=2, threshold=1e9)  # fires at the second token of any sample
    requests = [StepRequest(case.problem, (), 2, case.params(seed=3, top_logprobs=k), (case.delimiter,)),
                StepRequest(case.other, (), 2, case.params(seed=4, top_logprobs=k), ()),
                StepRequest(case.problem, (), 3, case.params(seed=5, top_logprobs=k, stop_below=stop), ())]
    out = await gen.generate_steps(requests)
    _check_shape(out, requests, "requests with top_logprobs")
    assert any(s.top_logprobs for steps in out for s in steps), "no top_logprobs returned"
    for s in out[2]:
        assert s.failed or s.tokens <= 2, f"stop_below that fires at the second token: {s!r:.200}"
    assert any(s.finish_reason == "low_confidence" for s in out[2]), "stop_below never stopped a sample"


GENERATOR_CHECKS: tuple[Callable[[Any, Case], Awaitable[None]], ...] = (
    generator_capabilities, generator_k_steps_in_request_order, generator_stop_strings_and_limits,
    generator_whole_solutions, generator_seeded_requests_repeat, generator_top_logprobs)


# -- PRM checks ---------------------------------------------------------------------------
def _check_scores(out: Any, requests: list[ScoreRequest], what: str) -> None:
    assert isinstance(out, list) and len(out) == len(requests), f"{what}: expected {len(requests)} results"
    for i, (s, r) in enumerate(zip(out, requests)):
        assert isinstance(s, StepScores), f"{what}: request {i}: expected StepScores, got {type(s).__name__}"
        assert len(s.scores) == len(r.steps), f"{what}: request {i}: {len(s.scores)} scores for {len(r.steps)} steps"
        assert all(math.isnan(x) or 0.0 < x < 1.0 for x in s.scores), f"{what}: request {i}: scores {s.scores}"
        assert isinstance(s.tokens, int) and s.tokens >= 0, f"{what}: request {i}: tokens {s.tokens!r}"


def _close(a, b) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= TOLERANCE for x, y in zip(a, b))


async def prm_capabilities(prm, case: Case) -> None:
    assert isinstance(getattr(prm, "capabilities", None), Capabilities), "capabilities must be a Capabilities"
    assert isinstance(prm, ProcessRewardModel), "score_steps is missing"
    assert await prm.score_steps([]) == [], "an empty call must return []"


async def prm_one_score_per_step(prm, case: Case) -> None:
    requests = [ScoreRequest(case.problem, case.steps[:t]) for t in range(1, len(case.steps) + 1)]
    requests.append(ScoreRequest(case.other, case.other_steps[:1]))
    _check_scores(await prm.score_steps(requests), requests, "score_steps")


async def prm_is_causal(prm, case: Case) -> None:
    whole = (await prm.score_steps([ScoreRequest(case.problem, case.steps)]))[0].scores
    for t in range(1, len(case.steps)):
        prefix = (await prm.score_steps([ScoreRequest(case.problem, case.steps[:t])]))[0].scores
        assert _close(prefix, whole[:t]), f"steps[:{t}] scored {prefix}, but the whole solution's first {t}: {whole[:t]}"


async def prm_scores_do_not_depend_on_the_batch(prm, case: Case) -> None:
    a, b = ScoreRequest(case.problem, case.steps), ScoreRequest(case.other, case.other_steps[:2])
    together = await prm.score_steps([b, a, b])
    clear = getattr(prm, "clear_cache", None)
    if clear is not None:
        clear()
    alone = [(await prm.score_steps([r]))[0] for r in (b, a)]
    again = (await prm.score_steps([a]))[0]
    assert _close(together[0].scores, alone[0].scores) and _close(together[2].scores, alone[0].scores), \
        f"request scored {together[0].scores} in a batch, {alone[0].scores} alone"
    assert _close(together[1].scores, alone[1].scores), f"request scored {together[1].scores} in a batch, " \
                                                       f"{alone[1].scores} alone"
    assert _close(again.scores, alone[1].scores), f"a repeated request scored {again.scores}, first {alone[1].scores}"


PRM_CHECKS: tuple[Callable[[Any, Case], Awaitable[None]], ...] = (
    prm_capabilities, prm_one_score_per_step, prm_is_causal, prm_scores_do_not_depend_on_the_batch)


# -- runners ------------------------------------------------------------------------------
async def check_generator(generator: Any, case: Case = Case()) -> None:
    """Every generator check, in order; AssertionError names the first broken rule."""
    for check in GENERATOR_CHECKS:
        await check(generator, case)


async def check_prm(prm: Any, case: Case = Case()) -> None:
    """Every PRM check, in order; AssertionError names the first broken rule."""
    for check in PRM_CHECKS:
        await check(prm, case)


def _run(coro: Awaitable[None]) -> None:
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(coro)
    finally:
        loop.close()


class GeneratorContract:
    """Pytest mixin: provide a ``generator`` fixture (and optionally ``contract_case``)."""

    @pytest.fixture
    def contract_case(self) -> Case:
        return Case()

    @pytest.mark.parametrize("check", GENERATOR_CHECKS, ids=lambda c: c.__name__)
    def test_generator_contract(self, generator, contract_case, check) -> None:
        _run(check(generator, contract_case))


class PRMContract:
    """Pytest mixin: provide a ``prm`` fixture (and optionally ``contract_case``)."""

    @pytest.fixture
    def contract_case(self) -> Case:
        return Case()

    @pytest.mark.parametrize("check", PRM_CHECKS, ids=lambda c: c.__name__)
    def test_prm_contract(self, prm, contract_case, check) -> None:
        _run(check(prm, contract_case))
