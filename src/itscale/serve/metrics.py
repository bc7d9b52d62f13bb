"""Counters the server exposes at ``GET /metrics`` (Prometheus text format, like vLLM's).

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
  serving every request that was waiting (fewer than ``policy_calls`` under load).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
               backend_calls: dict[str, int] | None = None) -> str:
        lines = ["# HELP itscale_requests_total Finished requests by outcome.",
                 "# TYPE itscale_requests_total counter"]
        lines += [f'itscale_requests_total{{outcome="{k}"}} {v}' for k, v in self.requests.items()]
        gauges = {"itscale_requests_running": running, "itscale_requests_waiting": waiting}
        counters = {"itscale_prompt_tokens_total": self.prompt_tokens,
                    "itscale_completion_tokens_total": self.completion_tokens,
                    "itscale_prm_tokens_total": self.prm_tokens,
                    "itscale_generated_tokens_total": generated_tokens,
                    "itscale_policy_calls_total": policy_calls,
                    "itscale_request_seconds_sum": round(self.seconds_sum, 6),
                    "itscale_request_seconds_count": self.seconds_count}
        for name, value in gauges.items():
            lines += [f"# TYPE {name} gauge", f"{name} {value}"]
        for name, value in counters.items():
            lines += [f"# TYPE {name} counter", f"{name} {value}"]
        if backend_calls:
            lines.append("# TYPE itscale_backend_calls_total counter")
            lines += [f'itscale_backend_calls_total{{backend="{k}"}} {v}' for k, v in backend_calls.items()]
        return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, float]:
    """``{"name{labels}": value}`` from the text format (for tests and scripts)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
