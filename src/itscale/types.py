"""The value types every layer shares.

All records are frozen: a particle is an immutable value, so cloning one (which
resampling does constantly) is copying a reference.

A *step* is text ended by the step delimiter; ``Step.text`` keeps that delimiter,
so a solution's text is exactly ``"".join(step.text for step in steps)`` and the
next request continues it verbatim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

FINISH_REASONS = ("stop", "eos", "length", "low_confidence", "error")
#: The most top log-probabilities a request may ask per token (OpenAI's and vLLM's default cap).
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Problem:
    """A question to solve. ``answer`` is the reference answer when known (for grading)."""

    id: str
    prompt: str
    answer: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True, slots=True)
class Step:
    """One generated continuation.

    ``carry`` is text the step's last token produced past the stop string that ended it (a
    byte-level BPE token such as ``"\n\n   "`` holding the delimiter and more): the step's
    text ends at the stop, and the particle's next step begins with ``carry``, so that the
    concatenated steps are the text the model generated (a backend that continues a step
    reads it after the step's text; empty for most steps).

    ``tokens`` counts generated tokens. ``prompt_tokens`` and ``prefilled_tokens``
    (prompt tokens sent / actually recomputed, when the backend reports it) are set
    on the first continuation of each request and 0 on its siblings, so summing
    over steps never double-counts a shared prompt. ``finish_reason`` is ``stop``
    (a stop string), ``eos``, ``length`` (the per-step token limit), ``low_confidence``
    (:attr:`SamplingParams.stop_below` stopped the sample: the group confidence of its last
    tokens fell below the threshold; the step holds the tokens up to and including the one
    where that happened, no stop string; the particle is finished but truncated, it has no
    answer of its own) or ``error`` (the backend failed; ``error`` says why, and the particle
    dies).

    ``top_logprobs`` (when :attr:`SamplingParams.top_logprobs` ``k > 0``; else ``None``, and
    ``None`` on an ``error`` step): one tuple per generated token, in order — the token that
    completed a stop string included, and an end-of-sequence token included wherever the
    backend counts it in ``tokens`` (all of ours do) — holding the ``k`` largest
    log-probabilities of the model's next-token distribution at that position, descending.
    Like ``logprob`` they are of the raw distribution (temperature 1, no nucleus), whatever
    the sampling settings; so ``len(top_logprobs) == tokens``. (An HTTP server's completions
    API keys them by token text, so a position may hold fewer than ``k`` when two of its top
    tokens are the same text; see :mod:`itscale.lm.openai`.)
    :mod:`itscale.lm.confidence` turns them into DeepConf's confidences.
    """

    text: str
    tokens: int = 0
    prompt_tokens: int = 0
    prefilled_tokens: int | None = None
    logprob: float | None = None
    finish_reason: str = "stop"
    error: str | None = None
    carry: str = ""
    top_logprobs: tuple[tuple[float, ...], ...] | None = None

    @property
    def failed(self) -> bool:
        return self.finish_reason == "error"


@dataclass(frozen=True, slots=True)
class Particle:
    """A partial (or finished) solution: the problem and the steps so far."""

    problem: Problem
    steps: tuple[Step, ...] = ()
    finished: bool = False

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.steps)

    @property
    def step_texts(self) -> tuple[str, ...]:
        return tuple(s.text for s in self.steps)

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def generated_tokens(self) -> int:
        return sum(s.tokens for s in self.steps)

    @property
    def logprob(self) -> float | None:
        """Σ log p of the generated tokens, when every step reported it."""
        values = [s.logprob for s in self.steps]
        return None if not values or any(v is None for v in values) else float(sum(values))

    def extend(self, step: Step, finished: bool) -> "Particle":
        return Particle(self.problem, self.steps + (step,), finished)


@dataclass(frozen=True)
class ConfidenceStop:
    """Stop a sample while it is generated once its recent tokens are unconfident (DeepConf
    online, Fu et al. 2025; :mod:`itscale.lm.confidence`).

    After every generated token ``i`` (once at least ``window`` tokens of the request exist)
    the group confidence of the last ``window`` tokens,

        C_G = (1/window) Σ_{t=i−window+1..i} C_t,   C_t = −(1/k) Σ_{j=1..k} log P_t(j),

    (``k`` = :attr:`SamplingParams.top_logprobs`) is compared with ``threshold``: when
    ``C_G < threshold`` the sample stops right after token ``i``, ``finish_reason=
    "low_confidence"``. A stop string, end-of-sequence or the token limit reached at the same
    token wins (the sample finished on its own). The window covers the tokens generated for
    this request only: a step request starts a fresh one (DeepConf generates whole traces,
    ``stop=()``).
    """

    window: int
    threshold: float

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"ConfidenceStop.window must be an integer >= 1 (tokens), got {self.window!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not math.isfinite(self.threshold):
            raise ValueError(f"ConfidenceStop.threshold must be a finite number, got {self.threshold!r}")


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings sent with every request.

    ``top_logprobs``: ``k`` in 0..20; with ``k > 0`` every step carries
    :attr:`Step.top_logprobs` (the ``k`` largest log-probabilities per token). ``stop_below``:
    stop a sample early when its confidence drops (:class:`ConfidenceStop`; needs
    ``top_logprobs > 0``, its confidences are computed from them).
    """

    temperature: float = 0.8
    top_p: float = 1.0
    max_step_tokens: int = 256
    seed: int | None = None
    top_logprobs: int = 0
    stop_below: ConfidenceStop | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.max_step_tokens < 1:
            raise ValueError(f"max_step_tokens must be >= 1, got {self.max_step_tokens!r}")
        k = self.top_logprobs
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOP_LOGPROBS:
            raise ValueError(f"SamplingParams.top_logprobs must be an integer in 0..{MAX_TOP_LOGPROBS} "
                             f"(0: off), got {k!r}")
        if self.stop_below is not None:
            if not isinstance(self.stop_below, ConfidenceStop):
                raise ValueError(f"SamplingParams.stop_below must be a ConfidenceStop or None, got {self.stop_below!r}")
            if k == 0:
                raise ValueError("SamplingParams.stop_below needs SamplingParams.top_logprobs > 0 (its confidences "
                                 "are computed from the top-k log-probabilities; DeepConf uses 20)")


@dataclass(frozen=True)
class StepFormat:
    """How solutions are cut into steps and when one is finished.

    A particle finishes when its step ended with end-of-sequence or was stopped for low
    confidence (``finish_reason`` ``eos`` / ``low_confidence``), when the step contains an
    answer marker, or when it reaches ``max_steps`` steps.
    """

    delimiter: str = "\n\n"
    answer_markers: tuple[str, ...] = ("\\boxed{",)
    max_steps: int = 32

    def __post_init__(self) -> None:
        if not self.delimiter:
            raise ValueError("StepFormat.delimiter must be a non-empty string (e.g. '\\n\\n')")
        if self.max_steps < 1:
            raise ValueError(f"StepFormat.max_steps must be >= 1, got {self.max_steps!r}")

    def is_final(self, step: Step, n_steps: int) -> bool:
        return (
            step.finish_reason in ("eos", "low_confidence")
            or any(m in step.text for m in self.answer_markers)
            or n_steps >= self.max_steps
        )

    def split(self, text: str) -> list[str]:
        """Cut a solution into steps, each keeping its trailing delimiter."""
        parts = text.split(self.delimiter)
        steps = [p + self.delimiter for p in parts[:-1]]
        if parts[-1]:
            steps.append(parts[-1])
        return [s for s in steps if s.strip()] or [text]


@dataclass(frozen=True)
class StepRequest:
    """Ask for ``k`` sampled continuations of ``problem`` after ``steps``.

    ``stop`` ends each continuation (the stop string stays in the text); with
    ``stop=()`` the backend generates the whole rest of the solution.
    ``cache_namespace``: a backend's caches serve the request only from entries that
    requests of the same namespace wrote (``None``: the shared namespace).
    """

    problem: Problem
    steps: tuple[Step, ...]
    k: int
    params: SamplingParams
    stop: tuple[str, ...]
    cache_namespace: str | None = None

    @property
    def prefix(self) -> str:
        return "".join(s.text for s in self.steps)

    @property
    def carry(self) -> str:
        """What the continuation begins with: the last step's ``carry`` (see :class:`Step`)."""
        return self.steps[-1].carry if self.steps else ""


@dataclass(frozen=True)
class RaceOutcome:
    """The first of k samples of one request to finish, and what the race cost
    (:class:`itscale.protocols.Racer`).

    ``winner`` carries the request's ``prompt_tokens`` / ``prefilled_tokens`` (as the first
    continuation of ``generate_steps`` does) and its own ``tokens``; ``spent_tokens`` counts
    every token generated for the race, the winner's included, so a caller charges
    ``spent_tokens`` (not ``winner.tokens``) as the race's generated tokens.
    """

    winner: Step  # the first sample to finish; a failed Step (finish_reason "error") only if all k failed
    index: int  # which of the k samples won (0..k-1)
    spent_tokens: int  # tokens generated over all k samples (the winner's included) until the rest were cancelled
    cancelled: int  # samples stopped before they finished


@dataclass(frozen=True)
class ScoreRequest:
    """Score each step of one (partial) solution: ``steps`` are step texts.
    ``cache_namespace`` as for :class:`StepRequest`."""

    problem: Problem
    steps: tuple[str, ...]
    cache_namespace: str | None = None


@dataclass(frozen=True)
class StepScores:
    """Per-step probabilities in (0, 1) for one ScoreRequest, and the tokens the scorer read."""

    scores: tuple[float, ...]
    tokens: int = 0


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, declared up front instead of failing late."""

    logprobs: bool = False
    # Step.top_logprobs for SamplingParams.top_logprobs > 0, and SamplingParams.stop_below honoured
    top_logprobs: bool = False
    n_per_request: bool = False
    prefix_cache: bool = False
    n_parameters: int | None = None  # for FLOP estimates
    # A server that batches concurrent calls itself (continuous batching): callers across
    # problems send what they have at once instead of waiting to form one population call.
    server_batching: bool = False


@dataclass
class Cost:
    """What one problem's run spent. FLOPs are estimated as 2 × parameters × tokens,
    for the policy (generated + prefilled, or prompt tokens when prefill is not
    reported) and the PRM (tokens read) separately; ``None`` when a model's size is
    unknown."""

    generated_tokens: int = 0
    prompt_tokens: int = 0
    prefilled_tokens: int | None = None
    policy_calls: int = 0
    prm_calls: int = 0
    prm_tokens: int = 0
    wall_time: float = 0.0
    policy_flops: float | None = None
    prm_flops: float | None = None

    @property
    def flops(self) -> float | None:
        parts = [f for f in (self.policy_flops, self.prm_flops) if f is not None]
        return float(sum(parts)) if parts else None

    def add(self, other: "Cost") -> "Cost":
        """The sum of two costs (for totals over problems or sweeps)."""
        out = Cost()
        for f in fields(Cost):
            a, b = getattr(self, f.name), getattr(other, f.name)
            setattr(out, f.name, None if a is None and b is None else (a or 0) + (b or 0))
        return out

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(Cost)}
        d["flops"] = self.flops
        return d


@dataclass(frozen=True)
class Candidate:
    """One final solution with its normalised weight (and score, where one was used)."""

    text: str
    answer: str | None
    weight: float
    score: float | None = None
    particle: Particle | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Result:
    """What a strategy returns for one problem.

    ``log_z`` is the SMC estimate of log Z, or ``None`` when a biased selection
    (argmax, top-k, voting) was used; ``exact`` is True when the candidates are a
    properly weighted sample of the method's target. ``status`` is ``ok``,
    ``all_dead`` (every particle failed or scored zero) or ``error``.
    """

    problem: Problem
    method: str
    budget: int
    answer: str | None
    solution: str | None
    candidates: tuple[Candidate, ...]
    cost: Cost
    log_z: float | None = None
    exact: bool = False
    ess: tuple[float, ...] = ()
    resampled: tuple[bool, ...] = ()
    genealogy: Any = field(default=None, repr=False, compare=False)
    status: str = "ok"
    message: str = ""
    extras: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"
