"""From a validated request to a :class:`Job`: method, budget, limits and sampling.

Resolution order for the method and the budget: the ``itscale`` field, then the
model-name suffix, then the server's defaults. When both the field and the suffix
name a value and they differ, the request is rejected (400) rather than guessing.

Limits (the API key's, else the server's): ``budget ≤ max_budget`` and
``max_tokens ≤ max_tokens``; a request over a limit gets a 400 with code
``budget_exceeds_limit`` / ``max_tokens_exceeds_limit`` naming the field. Without
``max_tokens`` a request gets the limit. ``n`` (choices returned) must not exceed
the budget.

``max_tokens`` bounds every candidate solution (see
:class:`~itscale.serve.engine.RequestPolicy`); each step is also at most the server's
step-token limit.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from ..strategies import STRATEGIES
from ..types import SamplingParams
from .config import Limits, ServeConfig
from .errors import from_validation, invalid
from .methods import parse_model, resolve_method
from .schemas import ChatRequest, CompletionRequest

_RESERVED_PARAMS = ("format", "sampling", "answer_key", "policy", "prm", "outcome")
#: The method that needs the server's learnt allocation (``--allocation``).
COMPUTE_OPTIMAL = "compute_optimal"


@dataclass(frozen=True)
class Job:
    """Everything one request asks the engine to do, resolved and validated."""

    id: str
    kind: Literal["chat", "completion"]
    model: str  # as the client wrote it (echoed in the response)
    problem: str
    method: str
    budget: int
    params: dict[str, Any]
    sampling: SamplingParams
    max_tokens: int
    n: int
    seed: int
    timeout: float
    stream: bool
    include_usage: bool
    key_name: str
    warnings: tuple[str, ...] = field(default=())
    budget_param: str = "itscale.budget"  # where the budget came from (for error messages)
    default_budget: bool = False  # the server chose the budget (the request named none)
    max_budget: int = 64  # this API key's limit


def _pick(from_body, from_suffix, param: str, what: str):
    if from_body is not None and from_suffix is not None and from_body != from_suffix:
        raise invalid(f"{param}: {what} {from_body!r} conflicts with the model-name suffix, which says "
                      f"{from_suffix!r}; give it in one place", param, "conflicting_" + what)
    return from_body if from_body is not None else from_suffix


def resolve(request: ChatRequest | CompletionRequest, *, job_id: str, config: ServeConfig, base_model: str,
            limits: Limits, key_name: str, prm_enabled: bool, allocation: Any = None) -> Job:
    """The job of a validated request; raises :class:`~itscale.serve.errors.ApiError`.

    ``allocation`` is the server's learnt allocation policy (``--allocation``), which the
    ``compute_optimal`` method needs: without one that method is a 400 ``method_unavailable``;
    with one, a request may choose its ``level`` but never its ``allocation`` (the server's
    file, not a path a client names)."""
    kind = "chat" if isinstance(request, ChatRequest) else "completion"
    bad = request.unsupported()
    if bad is not None:
        raise bad
    problem, warnings = request.problem()
    if config.policy == "embedded":
        from .. import zoo

        outside = zoo.off_task(problem)
        if outside:
            warnings.append(f"messages: {outside}")
    suffix_method, suffix_budget = parse_model(request.model, base_model)
    opts = request.itscale
    body_method = resolve_method(opts.method, "itscale.method") if opts and opts.method is not None else None
    method = _pick(body_method, suffix_method, "itscale.method", "method") or config.default_method
    method_param = "itscale.method" if body_method is not None or suffix_method is None else "model"
    budget_param = "itscale.budget" if opts and opts.budget is not None else "model"
    budget = _pick(opts.budget if opts else None, suffix_budget, "itscale.budget", "budget")
    default_budget = budget is None
    if budget is None:
        budget, budget_param = min(config.default_budget, limits.max_budget), "itscale.budget"
        if budget < config.default_budget:
            warnings.append(f"itscale.budget: the server's default budget {config.default_budget} lowered to "
                            f"this API key's limit of {limits.max_budget}")
    if budget > limits.max_budget:
        raise invalid(f"{budget_param}: budget {budget} exceeds this API key's limit of {limits.max_budget}; "
                      "ask for a smaller budget", budget_param, "budget_exceeds_limit")

    cls = STRATEGIES[method]
    if cls.needs_prm and not prm_enabled:
        free = ", ".join(sorted(name for name, c in STRATEGIES.items() if not c.needs_prm))
        raise invalid(f"{method_param}: {method} needs a reward model, and this server runs without one "
                      f"(--prm none); use one of {free}", method_param, "method_unavailable")
    params = dict(opts.params) if opts else {}
    reserved = sorted(set(params) & set(_RESERVED_PARAMS))
    if reserved:
        raise invalid(f"itscale.params.{reserved[0]}: set by the server, not per request", f"itscale.params.{reserved[0]}")
    server_params = {}
    if method == COMPUTE_OPTIMAL:
        if allocation is None:
            raise invalid(f"{method_param}: {method} applies a learnt allocation, and this server was started "
                          "without one (--allocation FILE); choose another method", method_param, "method_unavailable")
        if "allocation" in params:
            raise invalid("itscale.params.allocation: set by the server (--allocation), not per request",
                          "itscale.params.allocation")
        server_params = {"allocation": allocation}
    try:
        cls.Params(**params, **server_params)
    except ValidationError as err:
        raise from_validation(err, "itscale.params") from None

    max_tokens, tokens_param = request.token_limit()
    if max_tokens is None:
        max_tokens = limits.max_tokens
    elif max_tokens > limits.max_tokens:
        raise invalid(f"{tokens_param}: {max_tokens} exceeds this API key's limit of {limits.max_tokens} tokens "
                      "per solution", tokens_param, "max_tokens_exceeds_limit")
    if request.n > budget:
        raise invalid(f"n: {request.n} choices asked but the budget is {budget}; n can be at most the budget "
                      "(the choices are the top-n distinct candidates)", "n")

    timeout = config.request_timeout
    if opts and opts.timeout is not None:
        if opts.timeout > config.request_timeout:
            warnings.append(f"itscale.timeout lowered to the server's limit of {config.request_timeout:g} s")
        timeout = min(float(opts.timeout), config.request_timeout)
    seed = request.seed if request.seed is not None else secrets.randbits(63)
    sampling = SamplingParams(
        temperature=float(request.temperature if request.temperature is not None else config.temperature),
        top_p=float(request.top_p if request.top_p is not None else config.top_p),
        max_step_tokens=min(config.step_tokens, max_tokens),
    )
    ignored = request.ignored_fields()
    if ignored:
        warnings.append(f"ignored unknown field(s): {', '.join(ignored)}")
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return Job(job_id, kind, request.model, problem, method, int(budget), params, sampling, int(max_tokens),
               request.n, int(seed), timeout, request.stream, include_usage, key_name, tuple(warnings), budget_param,
               default_budget, limits.max_budget)


def parse_body(kind: Literal["chat", "completion"], body: Any) -> ChatRequest | CompletionRequest:
    """Validate a decoded JSON body; a 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {type(body).__name__}")
    cls = ChatRequest if kind == "chat" else CompletionRequest
    try:
        return cls.model_validate(body)
    except ValidationError as err:
        raise from_validation(err) from None
