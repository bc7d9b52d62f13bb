"""The engine: the loaded backends, shared by every request, and one strategy run per request.

Batching across requests
------------------------
The policy and PRM sit behind one :class:`~itscale.strategies.batching.Coalescer`
(the bench's runner uses the same mechanism): every running request is a member, and
a round in which all of them wait on the policy becomes one backend call covering
every live particle of every request. Requests join and leave at any time. A local
backend runs one call at a time: calls that arrive while one is in flight are merged
into the next (continuous batching at the granularity of a backend call). A backend
that batches by itself (an HTTP server: ``capabilities.server_batching``) is called
directly. A failing merged call is retried per request, so a failure reaches only the
request it belongs to.

A request's backend calls pass two wrappers: :class:`RequestPolicy` (its own view,
below) and :class:`~itscale.strategies.batching.BatchedGenerator` (the shared batching),
then the backend itself (likewise :class:`RequestPRM` and ``BatchedPRM``).

Per-request view of the backends
--------------------------------
Each request sees the shared backends through :class:`RequestPolicy` and
:class:`RequestPRM`, which

- count its calls and tokens as they happen (streamed as progress comments), and
- cap each candidate solution at ``max_tokens`` generated tokens: a request to
  continue a particle that has generated ``u`` tokens asks for at most
  ``max_tokens − u`` more; a step that reaches the cap ends the particle
  (``finish_reason="length"`` in the response when the chosen solution is one of
  them); a particle already at the cap gets an empty final step without a backend call.

Randomness: each run draws from ``numpy.random.default_rng(seed)``; the backends'
sampling seeds come from that stream, so a request with a ``seed`` is
reproducible. Cancelling the task that runs a request (client gone, timeout,
shutdown) stops it at its next backend call.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..strategies import make_strategy
from ..strategies.base import Strategy
from ..strategies.batching import BatchedGenerator, BatchedPRM, Coalescer
from ..types import Problem, Result, ScoreRequest, Step, StepFormat, StepRequest, StepScores
from .config import ServeConfig
from .errors import ApiError, invalid
from .jobs import Job


@dataclass
class Progress:
    """What one request has spent so far; listeners hear about every backend call."""

    started: float = field(default_factory=time.perf_counter)
    policy_calls: int = 0
    prm_calls: int = 0
    generated_tokens: int = 0
    prm_tokens: int = 0
    listeners: list[Callable[["Progress"], None]] = field(default_factory=list)

    def snapshot(self) -> dict[str, Any]:
        return {"policy_calls": self.policy_calls, "prm_calls": self.prm_calls,
                "generated_tokens": self.generated_tokens, "prm_tokens": self.prm_tokens,
                "elapsed_s": round(time.perf_counter() - self.started, 3)}

    def notify(self) -> None:
        for listener in self.listeners:
            listener(self)


class RequestPolicy:
    """The shared policy as one request sees it: token cap and progress (module docstring)."""

    def __init__(self, inner, max_tokens: int, progress: Progress, on_tokens: Callable[[int], None] | None = None):
        self.inner, self.max_tokens, self.progress = inner, max_tokens, progress
        self.on_tokens = on_tokens
        self.capped: list[Step] = []  # steps that ended at the cap (kept alive: compared by identity)

    @property
    def capabilities(self):
        return self.inner.capabilities

    def cut(self, step: Step) -> bool:
        """Whether a solution ending with ``step`` was cut short: at the token cap, or
        at a length limit (``finish_reason="length"``)."""
        return step.finish_reason == "length" or any(step is s for s in self.capped)

    async def generate_steps(self, requests: Sequence[StepRequest]) -> list[list[Step]]:
        used = [sum(s.tokens for s in r.steps) for r in requests]
        live = [i for i, u in enumerate(used) if u < self.max_tokens]
        sent = [dataclasses.replace(requests[i], params=dataclasses.replace(
            requests[i].params, max_step_tokens=min(requests[i].params.max_step_tokens, self.max_tokens - used[i])))
            for i in live]
        answers = await self.inner.generate_steps(sent) if sent else []
        out: list[list[Step]] = []
        for r in requests:  # particles already at the cap end with an empty step
            steps = [Step("", finish_reason="eos") for _ in range(r.k)]
            self.capped.extend(steps)
            out.append(steps)
        for i, steps in zip(live, answers):
            fixed = []
            stepwise = bool(requests[i].stop)  # a whole solution (stop=()) is finished anyway
            for step in steps:
                if stepwise and step.finish_reason == "length" and used[i] + step.tokens >= self.max_tokens:
                    step = dataclasses.replace(step, finish_reason="eos")  # ends the particle
                    self.capped.append(step)
                fixed.append(step)
            out[i] = fixed
        if not sent:
            return out
        tokens = sum(s.tokens for steps in answers for s in steps)
        self.progress.policy_calls += 1
        self.progress.generated_tokens += tokens
        if self.on_tokens is not None:
            self.on_tokens(tokens)
        self.progress.notify()
        return out


class RequestPRM:
    """The shared PRM as one request sees it: progress counting only."""

    def __init__(self, inner, progress: Progress):
        self.inner, self.progress = inner, progress

    @property
    def capabilities(self):
        return self.inner.capabilities

    async def score_steps(self, requests: Sequence[ScoreRequest]) -> list[StepScores]:
        out = await self.inner.score_steps(requests)
        self.progress.prm_calls += 1
        self.progress.prm_tokens += sum(s.tokens for s in out)
        self.progress.notify()
        return out


@dataclass
class Run:
    """A prepared request: the strategy bound to this request's view of the backends."""

    job: Job
    strategy: Strategy
    policy: RequestPolicy
    progress: Progress


class Engine:
    """The backends and their coalescer; :meth:`prepare` then :meth:`run` per request.

    ``policy``/``prm`` are any :class:`~itscale.protocols.Generator` /
    :class:`~itscale.protocols.ProcessRewardModel` (``prm`` may be ``None``)."""

    def __init__(self, policy, prm, step_format: StepFormat, model_name: str, description: dict | None = None):
        self.coalescer = Coalescer()
        self.backend = policy  # (for what it can tell about its context)
        self.policy = BatchedGenerator(policy, self.coalescer)
        self.prm = BatchedPRM(prm, self.coalescer) if prm is not None else None
        self.format = step_format
        self.model_name = model_name
        self.description = description or {}
        self.generated_tokens = 0  # every token generated for any request, finished or not
        self.policy_calls = 0

    @classmethod
    def load(cls, config: ServeConfig, log: Callable[[str], None] = lambda m: None) -> "Engine":
        """Load the models the configuration names with :mod:`itscale.backends` (an
        unreachable URL fails here, before the server listens; torch is imported only
        for a local model)."""
        from ..backends import describe, load_policy, load_prm
        from ..bench.config import FORMATS

        fmt = FORMATS[config.step_format_name]
        policy_spec, prm_spec = config.policy_spec(), config.prm_spec()
        log(f"loading policy {config.policy!r} and PRM {config.prm!r}")
        policy = load_policy(policy_spec, where="--policy")
        prm = load_prm(prm_spec, delimiter=fmt.delimiter, where="--prm")
        description = {"policy": describe(policy_spec, policy)}
        if prm is not None:
            description["prm"] = describe(prm_spec, prm)
        remote = getattr(getattr(policy, "inner", policy), "model", None) if policy_spec.is_http else None
        return cls(policy, prm, fmt, config.model_name(remote), description)

    def prepare(self, job: Job) -> Run:
        """Bind the job's method to this request's view of the backends. A budget the method
        cannot run at (not divisible by ``beam_width``, by chains × rounds …): when the server
        chose it (the request named none), the smallest budget above it that the method takes,
        with a warning; when the request named it, a 400 listing the budgets the method takes."""
        self.check_context(job)
        progress = Progress()
        policy = RequestPolicy(self.policy, job.max_tokens, progress, self._count)
        prm = RequestPRM(self.prm, progress) if self.prm is not None else None
        try:
            strategy = make_strategy(job.method, policy, prm, format=self.format, sampling=job.sampling,
                                     **job.params)
        except ValueError as err:
            raise invalid(f"itscale.params: {err}", "itscale.params") from None
        if not strategy.fits(job.budget):
            takes = strategy.budgets_up_to(job.max_budget)
            above = [b for b in takes if b >= job.budget]
            if job.default_budget and above:
                job = dataclasses.replace(job, budget=above[0], warnings=job.warnings + (
                    f"itscale.budget: {job.method} cannot run at the server's default budget {job.budget}; "
                    f"it ran at {above[0]}, the next budget it takes",))
            else:
                try:
                    strategy.check_budget(job.budget)
                except ValueError as err:
                    shown = ", ".join(map(str, takes[:8])) + (", …" if len(takes) > 8 else "")
                    options = (f"; it takes {shown} (up to this key's limit of {job.max_budget})" if takes
                               else f"; it takes no budget up to this key's limit of {job.max_budget}")
                    raise invalid(f"{job.budget_param}: {err}{options}", job.budget_param,
                                  "budget_not_supported") from None
        return Run(job, strategy, policy, progress)

    def check_context(self, job: Job) -> None:
        """A 400 naming the context limit when the prompt leaves the model no room to answer
        (when the policy can tell: a local model, or a server that listed its context length)."""
        context_room = getattr(self.backend, "context_room", None)
        room = context_room(job.problem) if context_room is not None else None
        if room is not None and room < 1:
            limit = getattr(self.backend, "max_positions", None) or getattr(self.backend, "context_length", None)
            raise ApiError(400, f"messages: the prompt is {limit - room} tokens with the chat template, and the "
                                f"model's context is {limit} tokens, which leaves no room for an answer; shorten "
                                "the prompt", "messages", "context_length_exceeded",
                           headers={"x-should-retry": "false"})

    def backend_calls(self) -> dict[str, int]:
        """Calls made to each local backend (each serving one or more requests)."""
        return dict(self.coalescer.calls)

    def _count(self, tokens: int) -> None:
        self.generated_tokens += tokens
        self.policy_calls += 1

    async def run(self, run: Run) -> Result:
        """Run the job's method on its problem (cancellable at every backend call)."""
        job = run.job
        run.progress.started = time.perf_counter()
        rng = np.random.default_rng(job.seed % 2**64)
        async with self.coalescer.member():
            return await run.strategy.run(Problem(job.id, job.problem), job.budget, rng)

