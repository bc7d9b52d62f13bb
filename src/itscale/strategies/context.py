"""What a strategy does with its backends during one problem's run.

``RunContext`` turns particles into batched backend calls and keeps the cost:

- :meth:`propose` moves particles one step with one ``generate_steps`` call.
  Copies of the same particle (after resampling, or an expansion) are grouped into
  one request with ``k`` > 1, which backends serve with ``n > 1`` and a shared
  prefix. A failed continuation returns ``None``: that particle dies.
- :meth:`sample_full` draws whole solutions (``stop=()``) and splits them into steps.
- :meth:`prm_scores` / :meth:`outcome_scores` score many particles with one call.

The per-request seed comes from the run's ``numpy.random.Generator``, so a run is
reproducible from its seed on the same backend outputs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from ..core.records import Proposed
from ..protocols import Generator, OutcomeScorer, ProcessRewardModel
from ..rewards.aggregate import aggregate, score_request_steps
from ..tasks.answers import extract_answer
from ..types import Cost, Particle, Problem, RaceOutcome, SamplingParams, ScoreRequest, Step, StepFormat, StepRequest


@dataclass
class RunContext:
    problem: Problem
    policy: Generator
    prm: ProcessRewardModel | None
    outcome: OutcomeScorer | None
    format: StepFormat
    sampling: SamplingParams
    rng: np.random.Generator
    aggregation: str = "last"
    cost: Cost = field(default_factory=Cost)
    started: float = field(default_factory=time.perf_counter)
    failures: dict[str, int] = field(default_factory=dict)  # why continuations failed, and how often
    produced: int = 0  # continuations that did not fail
    scored: dict[str, float] = field(default_factory=dict)  # solution text -> its latest aggregated PRM score

    # -- policy ---------------------------------------------------------------------
    def _params(self, temperature: float | None = None, stop_below=None) -> SamplingParams:
        """The run's sampling settings (``top_logprobs`` included) with a fresh seed from the
        run's rng; ``temperature`` and ``stop_below`` override for this request."""
        p = self.sampling
        return replace(p, temperature=p.temperature if temperature is None else temperature,
                       seed=int(self.rng.integers(2**31 - 1)), stop_below=stop_below or p.stop_below)

    async def _generate(self, requests: list[StepRequest]) -> list[list[Step]]:
        outputs = await self.policy.generate_steps(requests)
        if len(outputs) != len(requests) or any(len(o) != r.k for o, r in zip(outputs, requests)):
            raise RuntimeError("policy backend returned a different number of continuations than requested")
        self.cost.policy_calls += 1
        for out in outputs:
            for step in out:
                self._count(step)
        return outputs

    def _count(self, step: Step) -> None:
        if step.failed:
            reason = step.error or "unknown error"
            self.failures[reason] = self.failures.get(reason, 0) + 1
        else:
            self.produced += 1
        self.cost.generated_tokens += step.tokens
        self.cost.prompt_tokens += step.prompt_tokens
        if step.prefilled_tokens is not None:
            self.cost.prefilled_tokens = (self.cost.prefilled_tokens or 0) + step.prefilled_tokens

    async def propose(self, particles: Sequence[Particle], rng=None, temperature: float | None = None) -> Proposed:
        """One step for each particle; identical particles share one k>1 request."""
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(particles):
            groups.setdefault(id(p), []).append(i)
        order = list(groups.values())
        requests = [
            StepRequest(self.problem, particles[idx[0]].steps, len(idx), self._params(temperature), (self.format.delimiter,))
            for idx in order
        ]
        outputs = await self._generate(requests) if requests else []
        new: list[Particle | None] = [None] * len(particles)
        finished = [False] * len(particles)
        for idx, steps in zip(order, outputs):
            for i, step in zip(idx, steps):
                if step.failed:
                    continue
                parent = particles[i]
                done = self.format.is_final(step, parent.n_steps + 1)
                new[i] = parent.extend(step, done)
                finished[i] = done
        return Proposed(new, finished)

    async def propose_whole(self, particles: Sequence[Particle], rng=None) -> Proposed:
        """The macro-step proposal: a whole solution for each (empty) particle, from one
        request (:meth:`sample_full`); every one is finished, a failed one is ``None``."""
        if any(p.steps for p in particles):
            raise ValueError("propose_whole samples whole solutions from the empty one; got a partial solution")
        return Proposed(await self.sample_full(len(particles)), [True] * len(particles))

    async def sample_full(self, n: int, temperature: float | None = None, stop_below=None) -> list[Particle | None]:
        """n whole solutions from one request (``stop=()``), split into steps.

        A whole solution may be as long as a step-level method could make it:
        ``max_step_tokens × format.max_steps`` tokens."""
        if n == 0:
            return []
        params = self._params(temperature, stop_below)
        params = replace(params, max_step_tokens=params.max_step_tokens * self.format.max_steps)
        request = StepRequest(self.problem, (), n, params, ())
        (outputs,) = await self._generate([request])
        return [None if s.failed else self.particle_from_text(s) for s in outputs]

    async def race(self, n: int) -> tuple[Particle | None, RaceOutcome]:
        """The first of n whole solutions to finish (``Racer.race``: the rest are stopped),
        as a finished particle (``None`` if all n failed), with the race's outcome. Every
        token the race generated is charged, the cancelled samples' included."""
        params = self._params()
        params = replace(params, max_step_tokens=params.max_step_tokens * self.format.max_steps)
        outcome = await self.policy.race(StepRequest(self.problem, (), n, params, ()))
        self.cost.policy_calls += 1
        self._count(outcome.winner)
        self.cost.generated_tokens += outcome.spent_tokens - outcome.winner.tokens
        return (None if outcome.winner.failed else self.particle_from_text(outcome.winner)), outcome

    async def complete(self, particles: Sequence[Particle], temperature: float | None = None) -> list[Particle | None]:
        """Each particle continued to the end of its solution (``stop=()``), its completion split
        into steps as in :meth:`sample_full`; one ``generate_steps`` call, copies of one particle
        sharing a k>1 request. A finished particle is returned as it is (no request); a failed
        completion gives ``None``. A completion may be as long as the steps left would make it:
        ``max_step_tokens × (format.max_steps − n_steps)`` tokens (at least one step's worth)."""
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(particles):
            if not p.finished:
                groups.setdefault(id(p), []).append(i)
        requests = []
        for idx in groups.values():
            parent = particles[idx[0]]
            params = self._params(temperature)
            room = max(1, self.format.max_steps - parent.n_steps)
            params = replace(params, max_step_tokens=params.max_step_tokens * room)
            requests.append(StepRequest(self.problem, parent.steps, len(idx), params, ()))
        out: list[Particle | None] = list(particles)
        outputs = await self._generate(requests) if requests else []
        for idx, completions in zip(groups.values(), outputs):
            for i, s in zip(idx, completions):
                rest = None if s.failed else self.particle_from_text(s)
                out[i] = None if rest is None else Particle(self.problem, particles[i].steps + rest.steps, finished=True)
        return out

    def failure_message(self) -> str | None:
        """When every continuation the policy was asked for failed: why (its most frequent
        reason), else None. Such a run is an error, not a wrong answer."""
        if self.produced or not self.failures:
            return None
        return f"every candidate failed: the policy backend said {self.top_failure()}"

    def top_failure(self) -> str | None:
        """The most frequent reason a continuation failed, if any did."""
        return max(self.failures.items(), key=lambda kv: kv[1])[0] if self.failures else None

    def particle_from_text(self, completion: Step) -> Particle:
        """A finished particle from a whole completion; its token counts go on the last step."""
        texts = self.format.split(completion.text)
        steps = [Step(t) for t in texts[:-1]] + [
            Step(texts[-1], completion.tokens, completion.prompt_tokens, completion.prefilled_tokens,
                 completion.logprob, completion.finish_reason, top_logprobs=completion.top_logprobs)
        ]
        return Particle(self.problem, tuple(steps), finished=True)

    # -- scorers --------------------------------------------------------------------
    def _require_prm(self) -> ProcessRewardModel:
        if self.prm is None:
            raise ValueError("this method needs a process reward model: pass prm=...")
        return self.prm

    async def step_scores(self, particles: Sequence[Particle]) -> list[tuple[float, ...]]:
        """Per-step PRM probabilities of each particle (one call)."""
        if not particles:
            return []
        prm = self._require_prm()
        requests = [ScoreRequest(self.problem, score_request_steps(p.step_texts, self.aggregation)) for p in particles]
        out = await prm.score_steps(requests)
        if len(out) != len(requests):
            raise RuntimeError("PRM returned a different number of results than requests")
        self.cost.prm_calls += 1
        self.cost.prm_tokens += sum(s.tokens for s in out)
        return [tuple(s.scores) for s in out]

    async def prm_scores(self, particles: Sequence[Particle]) -> np.ndarray:
        """The aggregated PRM score of each particle; NaN where scoring failed. Each is also kept in
        ``scored`` under the particle's text, so a result can show its final candidates' scores
        without asking the PRM again."""
        out = np.array([aggregate(s, self.aggregation) if s else math.nan for s in await self.step_scores(particles)])
        self.scored.update(zip((p.text for p in particles), out.tolist()))
        return out

    async def outcome_scores(self, particles: Sequence[Particle]) -> np.ndarray:
        """Outcome-scorer values when one is configured, else the aggregated PRM score."""
        if self.outcome is None:
            return await self.prm_scores(particles)
        if not particles:
            return np.zeros(0)
        out = await self.outcome.score_final([ScoreRequest(self.problem, p.step_texts) for p in particles])
        self.cost.prm_calls += 1
        return np.asarray(out, dtype=np.float64)

    # -- bookkeeping ----------------------------------------------------------------
    def finish_cost(self, policy_params: int | None, prm_params: int | None) -> Cost:
        c = self.cost
        c.wall_time = time.perf_counter() - self.started
        prefill = c.prefilled_tokens if c.prefilled_tokens is not None else c.prompt_tokens
        c.policy_flops = 2.0 * policy_params * (c.generated_tokens + prefill) if policy_params else None
        c.prm_flops = 2.0 * prm_params * c.prm_tokens if prm_params and c.prm_tokens else None
        return c


def answer_of(particle: Particle) -> str | None:
    return extract_answer(particle.text)
