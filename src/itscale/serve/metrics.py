"""Counters the server exposes at ``GET /metrics`` (Prometheus text format, like vLLM's).

Every sample carries the label ``replica="NAME"`` (``--replica-id``, default
``HOSTNAME:PORT``), so the pages of several replicas can be told apart and summed:

- ``itscale_replica_info``: 1 (a gauge naming the replica);
- ``itscale_requests_total{outcome=...}``: finished requests by outcome: ``ok``,
  ``invalid`` (4xx other than 401/429), ``unauthorized`` (401), ``rejected`` (429),
  ``timeout`` (504), ``cancelled`` (the client went away, or shutdown), ``error`` (5xx);
- ``itscale_requests_running`` / ``itscale_requests_waiting``: gauges;
- ``itscale_prompt_tokens_total``, ``itscale_completion_tokens_total``,
  ``itscale_prm_tokens_total``: the ``usage`` of answered requests;
- ``itscale_generated_tokens_total`` and ``itscale_policy_calls_total``: everything
  the policy did for any request, answered or not (a cancelled request stops adding);
- ``itscale_request_seconds_sum`` / ``_count``: latency of answered requests;
- ``itscale_backend_calls_total{backend=...}``: calls to each local model, each
  serving every request that was waiting (fewer than ``policy_calls`` under load);
- for a policy or PRM given as URLs, per URL (``backend``: ``policy`` / ``prm``,
  ``endpoint``: the base URL without credentials, query or fragment):
  ``itscale_upstream_requests_total`` (HTTP requests sent there, retries included),
  ``itscale_upstream_errors_total`` (those that failed there) and the gauge
  ``itscale_upstream_in_flight`` (waiting for its answer now).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

OUTCOMES = ("ok", "invalid", "unauthorized", "rejected", "timeout", "cancelled", "error")


def outcome_of(status: int) -> str:
    if status < 400:
        return "ok"
    if status == 401:
        return "unauthorized"
    if status == 429:
        return "rejected"
    if status == 504:
        return "timeout"
    if status == 499:
        return "cancelled"
    return "invalid" if status < 500 else "error"


@dataclass
class Metrics:
    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prm_tokens: int = 0
    seconds_sum: float = 0.0
    seconds_count: int = 0

    def count(self, outcome: str) -> None:
        self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def answered(self, usage: dict, seconds: float) -> None:
        self.prompt_tokens += usage["prompt_tokens"]
        self.completion_tokens += usage["completion_tokens"]
        self.prm_tokens += usage["prm_tokens"]
        self.seconds_sum += seconds
        self.seconds_count += 1

    def render(self, running: int, waiting: int, generated_tokens: int, policy_calls: int,
               backend_calls: dict[str, int] | None = None, *, replica: str = "",
               upstream: Iterable["Upstream"] = ()) -> str:
        """The page: every sample labelled ``replica``; ``upstream``: the counts per URL."""
        def sample(name: str, value, **labels: str) -> str:
            return f"{name}{_labels(replica=replica, **labels)} {value}"

        lines = ["# HELP itscale_replica_info The replica serving this page (--replica-id).",
                 "# TYPE itscale_replica_info gauge", sample("itscale_replica_info", 1),
                 "# HELP itscale_requests_total Finished requests by outcome.",
                 "# TYPE itscale_requests_total counter"]
        lines += [sample("itscale_requests_total", v, outcome=k) for k, v in self.requests.items()]
        gauges = {"itscale_requests_running": running, "itscale_requests_waiting": waiting}
        counters = {"itscale_prompt_tokens_total": self.prompt_tokens,
                    "itscale_completion_tokens_total": self.completion_tokens,
                    "itscale_prm_tokens_total": self.prm_tokens,
                    "itscale_generated_tokens_total": generated_tokens,
                    "itscale_policy_calls_total": policy_calls,
                    "itscale_request_seconds_sum": round(self.seconds_sum, 6),
                    "itscale_request_seconds_count": self.seconds_count}
        for name, value in gauges.items():
            lines += [f"# TYPE {name} gauge", sample(name, value)]
        for name, value in counters.items():
            lines += [f"# TYPE {name} counter", sample(name, value)]
        if backend_calls:
            lines.append("# TYPE itscale_backend_calls_total counter")
            lines += [sample("itscale_backend_calls_total", v, backend=k) for k, v in backend_calls.items()]
        upstream = list(upstream)
        if upstream:
            for name, kind, what, attr in (
                    ("itscale_upstream_requests_total", "counter", "HTTP requests sent to each URL of a backend "
                                                                  "(retries included).", "requests"),
                    ("itscale_upstream_errors_total", "counter", "Of those, the requests that failed there.",
                     "errors"),
                    ("itscale_upstream_in_flight", "gauge", "Requests waiting for each URL's answer now.",
                     "in_flight")):
                lines += [f"# HELP {name} {what}", f"# TYPE {name} {kind}"]
                lines += [sample(name, getattr(u, attr), backend=u.backend, endpoint=u.endpoint) for u in upstream]
        return "\n".join(lines) + "\n"


class Upstream(NamedTuple):
    """One URL of an HTTP backend, as ``/metrics`` shows it."""

    backend: str  # policy | prm
    endpoint: str  # the base URL (without credentials)
    requests: int
    errors: int
    in_flight: int


def escape(value: str) -> str:
    """A label value as the text format writes it (backslash, double quote and newline escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{escape(str(v))}"' for k, v in labels.items()) + "}" if labels else ""


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$')
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def parse_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """``(name, labels, value)`` of every sample line of the text format, label values unescaped;
    a line that is not a sample raises ``ValueError`` naming it."""
    out = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            raise ValueError(f"not a sample line: {line!r}")
        name, body, value = match.groups()
        labels: dict[str, str] = {}
        at = 0
        while body and at < len(body):
            label = _LABEL.match(body, at)
            if label is None or label.end() == at:
                raise ValueError(f"bad labels in {line!r}")
            labels[label[1]] = re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], label[2])
            at = label.end()
        out.append((name, labels, float(value)))
    return out


def parse(text: str, drop: Iterable[str] = ()) -> dict[str, float]:
    """``{"name{labels}": value}`` from the text format (for tests and scripts), the labels
    written back as they came (escaped, in their order) without those named in ``drop``
    (e.g. ``drop=("replica",)`` gives one page's keys without its replica name)."""
    dropped = set(drop)
    out = {}
    for name, labels, value in parse_samples(text):
        out[name + _labels(**{k: v for k, v in labels.items() if k not in dropped})] = value
    return out
