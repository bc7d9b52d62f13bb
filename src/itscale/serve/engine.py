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

- count its calls and tokens as they happen (streamed as progress comments),
- cap each candidate solution at ``max_tokens`` generated tokens: a request to
  continue a particle that has generated ``u`` tokens asks for at most
  ``max_tokens − u`` more; a step that reaches the cap ends the particle
  (``finish_reason="length"`` in the response when the chosen solution is one of
  them); a particle already at the cap gets an empty final step without a backend call,
- set the cache namespace (below),
- pass races on (``race``, offered only when the shared policy has it) under the same cap
  and namespace, charging the race's ``spent_tokens`` (every sample's tokens, the
  cancelled ones' included) to the request's progress and the server's token counters,

and account for it independently of other requests:

- ``RequestPRM`` charges the request the PRM input tokens it needs as if it ran alone
  with an empty cache: the chat prompt once, plus each step once per distinct prefix it
  scored, counted with the PRM's own encoder (``prm.encoder``:
  :class:`~itscale.rewards.encoding.PRMEncoder`; a PRM without one, like the simulated
  PRM, is charged its own ``StepScores.tokens``). What the PRM actually computed depends
  on what its caches already held, that is on other requests, so it is not used. The
  charge replaces ``StepScores.tokens``, so the run's ``Cost.prm_tokens`` (and PRM FLOPs)
  follow it.
- ``RequestPolicy`` drops ``Step.prefilled_tokens`` unless the cache is isolated per key
  (a shared prefix cache's hits are other keys' traffic).

Randomness: each run draws from ``numpy.random.default_rng(seed)``; the backends'
sampling seeds come from that stream, so a request with a ``seed`` is
reproducible. Cancelling the task that runs a request (client gone, timeout,
shutdown) stops it at its next backend call.

Cache isolation
---------------
``cache_isolation="shared"`` (the default) lets every request reuse what the backends
cached for any request. With ``"per-key"`` the two views put the API key's name on each
backend request as its ``cache_namespace`` (``StepRequest`` / ``ScoreRequest``), so the
backends' caches (the KV prefix trees, the PRM score caches, the look-ahead, and a vLLM
server's prefix cache through ``cache_salt``) serve a request only from what requests
of the same key stored. Keys with the same name share a namespace.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

import numpy as np

from ..strategies import make_strategy
from ..strategies.base import Strategy
from ..strategies.batching import BatchedGenerator, BatchedPRM, Coalescer
from ..types import Problem, RaceOutcome, Result, ScoreRequest, Step, StepFormat, StepRequest, StepScores
from .config import ServeConfig
from .errors import ApiError, invalid
from .jobs import Job
from .metrics import Upstream


#: ``--cache-isolation`` choices (see "Cache isolation" above).
CACHE_ISOLATION = ("shared", "per-key")


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

    def __init__(self, inner, max_tokens: int, progress: Progress, on_tokens: Callable[[int], None] | None = None,
                 *, namespace: str | None = None, report_prefill: bool = True):
        self.inner, self.max_tokens, self.progress = inner, max_tokens, progress
        self.on_tokens = on_tokens
        self.namespace = namespace  # the cache namespace put on every request (None: shared)
        self.report_prefill = report_prefill  # keep Step.prefilled_tokens (else None)
        self.capped: list[Step] = []  # steps that ended at the cap (kept alive: compared by identity)
        if hasattr(inner, "race"):  # an optional capability: offered only when the policy has it
            self.race = self._race

    @property
    def capabilities(self):
        return self.inner.capabilities

    def cut(self, step: Step) -> bool:
        """Whether a solution ending with ``step`` was cut short: at the token cap, at a
        length limit (``finish_reason="length"``), or for low confidence (``low_confidence``)."""
        return step.finish_reason in ("length", "low_confidence") or any(step is s for s in self.capped)

    async def generate_steps(self, requests: Sequence[StepRequest]) -> list[list[Step]]:
        used = [sum(s.tokens for s in r.steps) for r in requests]
        live = [i for i, u in enumerate(used) if u < self.max_tokens]
        sent = [self._sent(requests[i], used[i]) for i in live]
        answers = await self.inner.generate_steps(sent) if sent else []
        out: list[list[Step]] = []
        for r in requests:  # particles already at the cap end with an empty step
            steps = [Step("", finish_reason="eos") for _ in range(r.k)]
            self.capped.extend(steps)
            out.append(steps)
        for i, steps in zip(live, answers):
            out[i] = [self._received(requests[i], used[i], step) for step in steps]
        if sent:
            self._charge(sum(s.tokens for steps in answers for s in steps))
        return out

    async def _race(self, request: StepRequest) -> RaceOutcome:
        """The shared policy's race under this request's cap and namespace; charged its
        ``spent_tokens``. A particle already at the cap ends with an empty step, no race run."""
        used = sum(s.tokens for s in request.steps)
        if used >= self.max_tokens:
            step = Step("", finish_reason="eos")
            self.capped.append(step)
            return RaceOutcome(step, 0, 0, 0)
        outcome = await self.inner.race(self._sent(request, used))
        self._charge(outcome.spent_tokens)
        return dataclasses.replace(outcome, winner=self._received(request, used, outcome.winner))

    def _sent(self, request: StepRequest, used: int) -> StepRequest:
        """``request`` as sent: at most the tokens left under the cap, in this request's cache namespace."""
        params = dataclasses.replace(request.params, max_step_tokens=min(request.params.max_step_tokens,
                                                                         self.max_tokens - used))
        namespace = self.namespace if self.namespace is not None else request.cache_namespace
        return dataclasses.replace(request, params=params, cache_namespace=namespace)

    def _received(self, request: StepRequest, used: int, step: Step) -> Step:
        """A step as this request sees it: prefill dropped unless reported, and a step that
        reaches the cap ends the particle (a whole solution, ``stop=()``, is finished anyway)."""
        if not self.report_prefill and step.prefilled_tokens is not None:
            step = dataclasses.replace(step, prefilled_tokens=None)
        if request.stop and step.finish_reason == "length" and used + step.tokens >= self.max_tokens:
            step = dataclasses.replace(step, finish_reason="eos")  # ends the particle
            self.capped.append(step)
        return step

    def _charge(self, tokens: int) -> None:
        """One backend call that generated ``tokens``: progress, listeners, the server's counters."""
        self.progress.policy_calls += 1
        self.progress.generated_tokens += tokens
        if self.on_tokens is not None:
            self.on_tokens(tokens)
        self.progress.notify()


class RequestPRM:
    """The shared PRM as one request sees it: progress, the cache namespace, and the
    tokens charged as if the request ran alone (module docstring).

    ``encoder`` is the PRM's :class:`~itscale.rewards.encoding.PRMEncoder` (``None``:
    charge the PRM's own ``StepScores.tokens``). A step is charged the first time the
    request gets a score (not NaN) for its prefix — ``encoder.step(step)`` ids — and the
    prompt with the first step charged under it — ``encoder.prompt(prompt)`` ids."""

    def __init__(self, inner, progress: Progress, *, encoder: Any = None, namespace: str | None = None):
        self.inner, self.progress = inner, progress
        self.encoder, self.namespace = encoder, namespace
        self._seen: dict[tuple, int] = {}  # ("prompt", text) / (parent id, step text) -> prefix id

    @property
    def capabilities(self):
        return self.inner.capabilities

    async def score_steps(self, requests: Sequence[ScoreRequest]) -> list[StepScores]:
        sent = requests
        if self.namespace is not None:
            sent = [dataclasses.replace(r, cache_namespace=self.namespace) for r in requests]
        out = await self.inner.score_steps(sent)
        if self.encoder is not None:
            out = [dataclasses.replace(s, tokens=self.charge(r, s)) for r, s in zip(requests, out)]
        self.progress.prm_calls += 1
        self.progress.prm_tokens += sum(s.tokens for s in out)
        self.progress.notify()
        return out

    def charge(self, request: ScoreRequest, scores: StepScores) -> int:
        """The PRM input tokens of ``request`` this request has not been charged yet."""
        tokens = 0
        prompt_key = ("prompt", request.problem.prompt)
        parent = self._seen.get(prompt_key)
        for step, score in zip(request.steps, scores.scores):
            if math.isnan(score):  # not scored (a failure): charged when it is
                break
            if parent is None:
                parent = self._seen[prompt_key] = len(self._seen)
                tokens += len(self.encoder.prompt(request.problem.prompt)[1])
            key = (parent, step)
            node = self._seen.get(key)
            if node is None:
                node = self._seen[key] = len(self._seen)
                tokens += len(self.encoder.step(step)[0])
            parent = node
        return tokens


def http_pool(backend) -> Any:
    """The :class:`~itscale.lm.http.EndpointPool` of an HTTP backend (through a wrapper such as
    :class:`~itscale.lm.lookahead.Lookahead`, which keeps the generator's ``client``); None for a
    local one."""
    for pool in (getattr(backend, "http", None), getattr(getattr(backend, "client", None), "http", None)):
        if callable(getattr(pool, "endpoint_counts", None)):
            return pool
    return None


def public_url(url: str) -> str:
    """``url`` as ``/metrics`` may show it: scheme, host, port and path; never a user name or
    password, a query or a fragment (which may carry a secret)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


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

    def __init__(self, policy, prm, step_format: StepFormat, model_name: str, description: dict | None = None,
                 cache_isolation: str = "shared", allocation: Any = None):
        if cache_isolation not in CACHE_ISOLATION:
            raise ValueError(f"cache_isolation must be one of {', '.join(CACHE_ISOLATION)}, got {cache_isolation!r}")
        self.cache_isolation = cache_isolation
        self.prm_encoder = getattr(prm, "encoder", None)  # (PRMEncoder of the HF and remote PRMs)
        self.coalescer = Coalescer()
        self.backend = policy  # (for what it can tell about its context)
        self.policy = BatchedGenerator(policy, self.coalescer)
        self.prm = BatchedPRM(prm, self.coalescer) if prm is not None else None
        self.format = step_format
        self.model_name = model_name
        self.description = description or {}
        self.generated_tokens = 0  # every token generated for any request, finished or not
        self.policy_calls = 0
        self.allocation = allocation  # the learnt allocation compute_optimal applies (--allocation), if any
        self.pools = [(name, pool) for name, pool in (("policy", http_pool(policy)), ("prm", http_pool(prm)))
                      if pool is not None]  # the HTTP backends' endpoint pools (one per backend given as URLs)

    @classmethod
    def load(cls, config: ServeConfig, log: Callable[[str], None] = lambda m: None) -> "Engine":
        """Load the models the configuration names with :mod:`itscale.backends` (an
        unreachable URL fails here, before the server listens; torch is imported only
        for a local model)."""
        from ..backends import describe, load_policy, load_prm
        from ..bench.config import FORMATS

        fmt = FORMATS[config.step_format_name]
        policy_spec, prm_spec = config.policy_spec(), config.prm_spec()
        kind = "" if config.prm_kind == "tag" or not config.prm_enabled else f" ({config.prm_kind})"
        log(f"loading policy {config.policy!r} and PRM {config.prm!r}{kind}")
        policy = load_policy(policy_spec, where="--policy")
        prm = load_prm(prm_spec, delimiter=fmt.delimiter, where="--prm")
        description = {"policy": describe(policy_spec, policy)}
        if prm is not None:
            description["prm"] = describe(prm_spec, prm)
        remote = policy.model if policy_spec.is_http else None  # the served name
        allocation = config.allocation_policy()
        if allocation is not None:
            log(f"compute_optimal: allocation {config.allocation!r}, {allocation.bins} difficulty bins, cost levels "
                f"at budgets {', '.join(map(str, allocation.budgets))}")
        return cls(policy, prm, fmt, config.model_name(remote), description, cache_isolation=config.cache_isolation,
                   allocation=allocation)

    def prepare(self, job: Job) -> Run:
        """Bind the job's method to this request's view of the backends. A budget the method
        cannot run at (not divisible by ``beam_width``, by chains × rounds …): when the server
        chose it (the request named none), the smallest budget above it that the method takes,
        with a warning; when the request named it, a 400 listing the budgets the method takes."""
        self.check_context(job)
        progress = Progress()
        isolated = self.cache_isolation == "per-key"
        namespace = job.key_name if isolated else None
        policy = RequestPolicy(self.policy, job.max_tokens, progress, self._count, namespace=namespace,
                               report_prefill=isolated)
        prm = (RequestPRM(self.prm, progress, encoder=self.prm_encoder, namespace=namespace)
               if self.prm is not None else None)
        server_params = {}
        if job.method == "compute_optimal":  # the server's learnt allocation (jobs.resolve refused it without one)
            server_params["allocation"] = self.allocation
        try:
            strategy = make_strategy(job.method, policy, prm, format=self.format, sampling=job.sampling,
                                     **job.params, **server_params)
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
        if server_params:
            self.check_allocation_budget(job, strategy)
        return Run(job, strategy, policy, progress)

    @staticmethod
    def check_allocation_budget(job: Job, strategy) -> None:
        """A key's ``max_budget`` bounds every method budget a compute_optimal request may run:
        the level its budget selects must not run any bin above the limit (a 400 otherwise)."""
        level = strategy.level_for(job.budget)
        if level.max_budget > job.max_budget:
            allowed = [lv.budget for lv in strategy.params.allocation.levels if lv.max_budget <= job.max_budget]
            hint = (f"the levels within it are at budgets {', '.join(map(str, allowed))}" if allowed
                    else "no learnt level fits this key's limit; choose another method")
            raise invalid(f"{job.budget_param}: compute_optimal at budget {job.budget} uses the cost level learnt for "
                          f"budget {level.budget}, whose bins run methods at budgets up to {level.max_budget}, over "
                          f"this API key's limit of {job.max_budget}; {hint}", job.budget_param,
                          "budget_exceeds_limit")

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

    def upstream(self) -> list[Upstream]:
        """The load on each URL of the HTTP backends (``/metrics``): per backend and base URL
        (credentials, query and fragment left out; a URL listed twice is summed)."""
        rows: dict[tuple[str, str], list[int]] = {}
        for name, pool in self.pools:
            for count in pool.endpoint_counts():
                row = rows.setdefault((name, public_url(count.url)), [0, 0, 0])
                row[0] += count.requests
                row[1] += count.errors
                row[2] += count.in_flight
        return [Upstream(name, url, *row) for (name, url), row in rows.items()]

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

