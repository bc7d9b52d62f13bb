"""Errors in the OpenAI shape.

Every failure the server reports is an :class:`ApiError`, rendered as the body the
official clients parse::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "itscale.budget", "code": "..."}}

``param`` names the request field at fault (dotted for nested fields, e.g.
``itscale.params.temperature``), so a client can point at it; ``message`` says what
is wrong and how to fix it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from pydantic import ValidationError

#: The OpenAI error type of each status code this server uses.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


@dataclass(eq=False)  # compared and hashed by identity, like any exception
class ApiError(Exception):
    """An HTTP error with an OpenAI-shaped body. ``headers`` go on the response
    (``Retry-After`` on 429, ``WWW-Authenticate`` on 401, ``x-should-retry``)."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)
        if self.type is None:
            self.type = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def json(self) -> str:
        return json.dumps(self.body())


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 ``invalid_request_error``."""
    return ApiError(400, message, param, code)


def field_path(loc: Iterable[Any], prefix: str = "") -> str:
    """``("itscale", "params", "temperature")`` → ``itscale.params.temperature``; list
    indices as ``messages[2]``."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def from_validation(err: ValidationError, prefix: str = "") -> ApiError:
    """The first problem of a pydantic error as a 400 naming its field (the others are
    appended to the message, so one round trip shows them all)."""
    problems = []
    for e in err.errors():
        path = field_path([p for p in e["loc"] if not _is_union_tag(p)], prefix)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            msg = "this field is required"
        elif e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling)"
        problems.append((path, msg))
    path, msg = problems[0]
    message = f"{path}: {msg}" if path else msg
    if len(problems) > 1:
        message += "; also " + "; ".join(f"{p}: {m}" if p else m for p, m in problems[1:])
    return invalid(message, path or None)


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the union member's name in the location ("str", "list[...]", "function-after[...]")
    return isinstance(part, str) and (part in ("str", "int", "float", "list", "dict", "bool")
                                      or "[" in part or part.startswith("function-"))
