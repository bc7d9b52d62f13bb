"""Server settings and the limits that apply to each API key.

:class:`ServeConfig` holds everything ``itscale serve`` is started with; every field
is validated, and a bad value fails at start-up with the option's name. The
:class:`Limits` of a request are its API key's own limits when the key file gives
them, else the server's (``--max-budget``, ``--max-tokens``).
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..backends.spec import Measure, PolicySpec, PRMKind, PRMSpec, is_url

from ..strategies import STRATEGIES

#: The base model name of the embedded policy (``tiny:pf-16`` selects particle filtering).
EMBEDDED_NAME = "tiny"


class Limits(BaseModel):
    """What one API key may ask for.

    ``max_budget`` bounds ``itscale.budget``; ``max_tokens`` bounds ``max_tokens`` (the
    tokens of each candidate solution, so a request generates at most about
    ``budget × max_tokens`` tokens); ``max_running`` bounds this key's requests in the
    server at once (running or queued; ``None``: only the server's bounds apply)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_budget: int = Field(64, ge=1)
    max_tokens: int = Field(512, ge=1)
    max_running: int | None = Field(None, ge=1)


#: The characters a replica name may not hold besides spaces and control characters (it is a
#: Prometheus label value and an HTTP header value): quotes, the backslash and the backtick.
REPLICA_FORBIDDEN = "\"'\\`"
REPLICA_MAX_LENGTH = 128


def replica_problem(name: str) -> str | None:
    """Why ``name`` cannot name a replica (None when it can): 1 to 128 visible ASCII
    characters, none of them a quote, a backslash or a backtick."""
    if not name:
        return "must not be empty"
    if len(name) > REPLICA_MAX_LENGTH:
        return f"at most {REPLICA_MAX_LENGTH} characters, got {len(name)}"
    bad = next((c for c in name if not "!" <= c <= "~" or c in REPLICA_FORBIDDEN), None)
    if bad is not None:
        return (f"{bad!r} is not allowed: a replica name is visible ASCII without spaces, quotes, backslashes or "
                "backticks (it goes into a Prometheus label and an HTTP header)")
    return None


def default_replica(port: int, hostname: str | None = None) -> str:
    """``HOSTNAME:PORT``: tells replicas apart on one machine (the port) and across machines
    (the host name: a listening address such as ``0.0.0.0`` is the same everywhere). Characters
    a replica name may not hold are replaced by ``-``."""
    host = hostname if hostname is not None else socket.gethostname()
    host = "".join(c if "!" <= c <= "~" and c not in REPLICA_FORBIDDEN else "-" for c in host)
    name = f"{host or 'localhost'}:{port}"
    return name[-REPLICA_MAX_LENGTH:]


#: Fields of a reward-model spec whose errors come from a check across fields, named in its message.
_NAMED_BY_SPEC = ("template", "measure", "kind")


class ServeConfig(BaseModel):
    """The settings of one server (the ``itscale serve`` options)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # models
    policy: str = Field("embedded", description="'embedded', a Hugging Face folder, a .gguf file, or http(s):// "
                                                 "URL(s), comma-separated")
    prm: str = Field("embedded", description="'embedded', a folder, an http(s):// URL, or 'none'")
    prm_kind: PRMKind = "tag"
    prm_template: str | None = Field(None, description="judge: the question about a step (a template or a file)")
    prm_good_token: str | None = Field(None, description="tag PRM: the good token; judge: the yes word")
    prm_bad_token: str | None = Field(None, description="tag PRM: the bad token; judge: the no word")
    prm_measure: Measure | None = Field(None, description="confidence: the measure")
    policy_served_model: str | None = None
    prm_served_model: str | None = None
    policy_tokenizer: str | None = None
    prm_tokenizer: str | None = None
    prm_step_tag: str | None = Field(None, description="the PRM's one-token step mark (tag or separator)")
    served_model_name: str | None = Field(None, description="the model name clients use (default: derived)")
    format: str | None = Field(None, description="step format: arithmetic | math (default: arithmetic for the "
                                                 "embedded policy, math otherwise)")
    threads: int | None = Field(None, ge=1)
    max_batch: int = Field(256, ge=1)
    prm_max_batch: int = Field(128, ge=1)
    device: str = Field("auto", description="where local models run: auto | cpu | cuda | cuda:N | mps")
    dtype: str = Field("auto", description="local models' dtype: auto | float32 | bfloat16 | float16")
    policy_device: str | None = Field(None, description="the policy's device (default: device)")
    policy_dtype: str | None = Field(None, description="the policy's dtype (default: dtype)")
    prm_device: str | None = Field(None, description="the PRM's device (default: device)")
    prm_dtype: str | None = Field(None, description="the PRM's dtype (default: dtype)")
    # sampling and methods
    temperature: float = Field(0.8, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    step_tokens: int = Field(48, ge=1, description="token limit of one step")
    default_method: str = "particle_filtering"
    default_budget: int = Field(8, ge=1)
    allocation: str | None = Field(None, description="a learnt compute-optimal allocation (allocation.json): enables "
                                                     "the compute_optimal method")
    limits: Limits = Limits()
    # network and load
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    allow_open: bool = False
    max_running: int = Field(32, ge=1, description="requests running at once")
    max_queue: int = Field(256, ge=0, description="requests waiting for a slot; beyond it: 429")
    request_timeout: float = Field(300.0, gt=0, description="seconds from arrival to answer, queue included")
    graceful_timeout: float = Field(30.0, ge=0, description="seconds in-flight requests get at shutdown")
    header_timeout: float = Field(10.0, gt=0, description="seconds a client has to send its request headers")
    body_timeout: float = Field(10.0, gt=0, description="seconds a client has to send its whole request body")
    progress_interval: float = Field(1.0, gt=0, description="seconds between streamed progress comments")
    replica_id: str | None = Field(None, description="this server's name among replicas, in /metrics and the "
                                                     "x-itscale-replica header (default: HOSTNAME:PORT)")
    # tenancy
    cache_isolation: Literal["shared", "per-key"] = Field(
        "shared", description="shared: every request may reuse what the model caches hold for any request; "
                              "per-key: a request never reads cache entries another API key's requests wrote")

    @field_validator("replica_id")
    @classmethod
    def _replica_name(cls, value: str | None) -> str | None:
        problem = replica_problem(value) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value

    def replica(self, port: int | None = None) -> str:
        """This server's replica name: ``replica_id``, else ``HOSTNAME:PORT`` with the port it
        listens on (``port``: the one it got when ``self.port`` is 0)."""
        return self.replica_id or default_replica(port if port is not None else self.port)

    @model_validator(mode="after")
    def _consistent(self) -> "ServeConfig":
        from ..bench.config import FORMATS

        if self.default_method not in STRATEGIES:
            raise ValueError(f"default_method: unknown method {self.default_method!r}; choose one of: "
                             f"{', '.join(sorted(STRATEGIES))}")
        if self.prm_enabled is False and STRATEGIES[self.default_method].needs_prm:
            raise ValueError(f"default_method: {self.default_method} needs a reward model but prm is 'none'; "
                             "choose e.g. self_consistency")
        if self.allocation is not None:
            self.allocation_policy()  # (raises, naming the option)
        elif self.default_method == "compute_optimal":
            raise ValueError("default_method: compute_optimal applies a learnt allocation; start the server with "
                             "--allocation FILE (the allocation.json of an `itscale bench` run with an `allocation:` "
                             "section)")
        if self.default_budget > self.limits.max_budget:
            raise ValueError(f"default_budget: {self.default_budget} exceeds max_budget {self.limits.max_budget}")
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"format: unknown step format {self.format!r}; choose one of {sorted(FORMATS)}")
        for role, build in (("policy", self.policy_spec), ("prm", self.prm_spec)):
            try:
                build()
            except ValidationError as err:
                e = err.errors()[0]
                message = e["msg"].removeprefix("Value error, ")
                named = message.split(":", 1)[0]  # a check across fields names the field it blames
                field = str(e["loc"][0]) if e["loc"] else (named if named in _NAMED_BY_SPEC else "model")
                flag = role if field == "model" else (f"{role}_{field}" if field not in ("device", "dtype")
                                                      or getattr(self, f"{role}_{field}") is not None else field)
                if not e["loc"] and field in _NAMED_BY_SPEC:
                    message = message.split(":", 1)[1].lstrip()
                raise ValueError(f"{flag}: {message}") from None
        return self

    def allocation_policy(self):
        """The loaded ``--allocation`` policy (None without one), checked against the models: a
        ``ValueError`` naming ``allocation`` when it cannot be read or needs the PRM ``--prm none`` lacks."""
        if self.allocation is None:
            return None
        from ..allocation import AllocationError, load_allocation
        from ..strategies.compute_optimal import check_allocation

        try:
            policy = load_allocation(self.allocation)
            check_allocation(policy, self.prm_enabled)
        except (AllocationError, ValueError) as err:
            raise ValueError(f"allocation: {err}") from None
        return policy

    def policy_spec(self) -> PolicySpec:
        """The policy as a backend spec (:mod:`itscale.backends.spec`)."""
        return PolicySpec(model=_models(self.policy), served_model=self.policy_served_model,
                          tokenizer=self.policy_tokenizer,
                          threads=self.threads, max_batch=self.max_batch, device=self.policy_device or self.device,
                          dtype=self.policy_dtype or self.dtype)

    def prm_spec(self) -> PRMSpec:
        """The reward model as a backend spec (``model: none`` when there is none)."""
        optional = {k: v for k, v in (("template", self.prm_template), ("measure", self.prm_measure),
                                      ("good_token", self.prm_good_token), ("bad_token", self.prm_bad_token))
                    if v is not None}
        return PRMSpec(model=_models(self.prm), kind=self.prm_kind, served_model=self.prm_served_model,
                       tokenizer=self.prm_tokenizer, max_batch=self.prm_max_batch, step_tag=self.prm_step_tag,
                       device=self.prm_device or self.device, dtype=self.prm_dtype or self.dtype, **optional)

    @property
    def prm_enabled(self) -> bool:
        return self.prm.lower() != "none"

    @property
    def step_format_name(self) -> str:
        return self.format or ("arithmetic" if self.policy == "embedded" else "math")

    @property
    def loopback(self) -> bool:
        """Whether the server listens on loopback only."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def model_name(self, resolved_policy: str | None = None) -> str:
        """The base model name of ``/v1/models``: ``served_model_name``, else ``tiny`` for
        the embedded policy, the served name of a remote one, or the folder's name."""
        if self.served_model_name:
            return self.served_model_name
        if self.policy == "embedded":
            return EMBEDDED_NAME
        if self.policy_spec().is_http:
            return resolved_policy or self.policy_served_model or "remote"
        return Path(self.policy).expanduser().resolve().name


def _models(value: str) -> str | list[str]:
    """``URL1,URL2``: several servers of one model (load-balanced); anything else as it is."""
    parts = [p.strip() for p in value.split(",")]
    return parts if len(parts) > 1 and any(is_url(p) for p in parts) else value
