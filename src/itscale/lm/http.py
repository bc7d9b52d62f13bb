r"""Async HTTP plumbing shared by the OpenAI-compatible backends.

:class:`EndpointPool` sends JSON requests to one or more servers that speak the
OpenAI HTTP API (vLLM, llama.cpp's server, hosted APIs):

- **Base URLs.** Each is the API root, as for the ``openai`` client:
  ``http://host:8000/v1``. A URL with no path (``http://host:8000``) gets ``/v1``
  appended. A request path without a leading slash (``"completions"``) is relative
  to the API root (``…/v1/completions``); one with a leading slash (``"/pooling"``)
  is relative to the server root (vLLM serves ``/pooling`` there).
- **Load balancing.** Every attempt goes to the URL with the fewest requests in
  flight from this pool, round-robin among ties; a retry may go to another URL.
- **Concurrency.** At most ``max_concurrency`` requests are in flight at once
  (an ``asyncio.Semaphore``; a request waiting out its backoff holds no slot).
- **Timeouts.** ``timeout`` seconds per attempt (``connect_timeout`` to connect).
- **Retries.** Up to ``retries`` more attempts after HTTP 429, any 5xx, connection
  errors, connect/read/write/pool timeouts and dropped connections
  (``httpx.RemoteProtocolError``, ``httpx.ReadError`` …). The wait before retry
  ``a`` (0-based) is full-jitter exponential backoff, uniform in
  ``[0, min(backoff_cap, backoff_base · 2^a)]``, drawn from the pool's own
  ``random.Random`` / ``numpy.random.Generator``; on 429/503 a ``Retry-After`` header
  (seconds) is honoured as a lower bound (at most 60 s). Other 4xx are never retried.
- **Errors.** A request that fails for good raises :class:`BackendError`, whose text
  names the URL, the HTTP status (``None`` for connection errors) and the server's
  own message (``{"error": {"message": …}}``, ``{"detail": …}`` or the raw text), plus
  a hint at the usual fix.
- **Usage.** :attr:`EndpointPool.usage` sums the ``usage`` blocks of all responses.
- **Load per URL.** :meth:`EndpointPool.endpoint_counts` tells, for each base URL, the
  attempts sent to it (retries included), those that failed there (an error status, no
  response, a broken stream), and the requests in flight there now: what a server in
  front of several replicas of a model shows per replica (``itscale serve``'s ``/metrics``).
- **Streaming.** :meth:`EndpointPool.post_stream` posts a body that asks for a stream
  (``"stream": true``) and reads the server-sent events, one JSON object per ``data:``
  line up to ``data: [DONE]``, handing each to a callback as it arrives; the reply is the
  events merged into the shape of the non-streamed reply (:func:`merge_events`). Retries,
  load balancing and errors are those of :meth:`~EndpointPool.post` (an error event, or a
  connection dropped half-way, fails the attempt like an error status or a dropped
  connection). Cancelling the awaiting task closes the connection (the server sees the
  client go; vLLM then aborts the request) and counts in ``usage.cancelled``. A caller may
  also end a stream itself (``until``: a predicate over the events that returns True): the
  connection is closed the same way, the reply is the events read so far, and it counts in
  ``usage.stopped``.

The pool's ``httpx.AsyncClient`` belongs to the event loop it was first used in; if
a later call runs in a different loop (e.g. successive ``asyncio.run`` calls), a
fresh client is made for it, so one pool can serve one loop at a time. Close with
``await pool.aclose()`` or ``async with pool:``. An ``httpx`` transport (e.g.
``httpx.MockTransport``) can be injected for tests.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable, Mapping, NamedTuple, Sequence
from urllib.parse import urlsplit

import httpx

__all__ = ["BackendError", "EndpointCount", "EndpointPool", "Reply", "Usage", "merge_events", "normalize_base_url"]

#: Transport failures worth retrying: the request may well succeed next time.
RETRYABLE_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
_MAX_RETRY_AFTER = 60.0
#: Kept-alive connections per httpx client of an :class:`EndpointPool` (see ``_live``).
CONNECTIONS_PER_CLIENT = 8


class BackendError(RuntimeError):
    """A request to an HTTP backend failed for good.

    ``endpoint`` is the full URL, ``status`` the HTTP status (``None`` when there was
    no HTTP answer: connection refused, timeout, dropped connection, or a failed
    :meth:`EndpointPool.check`), ``message`` the server's error message or the cause.
    """

    def __init__(self, endpoint: str, status: int | None, message: str, *, attempts: int = 1):
        self.endpoint, self.status, self.message, self.attempts = endpoint, status, message, attempts
        super().__init__(self._text())

    def _text(self) -> str:
        what = f"HTTP {self.status}" if self.status is not None else "no HTTP response"
        tries = f" (after {self.attempts} attempts)" if self.attempts > 1 else ""
        hint = _hint(self.status)
        return f"{self.endpoint}: {what}{tries}: {self.message}" + (f" [{hint}]" if hint else "")


def _hint(status: int | None) -> str:
    if status is None:
        return "is the server running and reachable at this URL?"
    if status in (401, 403):
        return "check api_key"
    if status == 404:
        return "check the base URL (the API root, e.g. http://host:8000/v1) and the model name"
    if status == 429:
        return "the server is rate-limiting: lower max_concurrency"
    if status >= 500:
        return "server-side failure: see the server's log"
    return ""


@dataclass
class Usage:
    """What the pool's requests spent, summed over successful responses."""

    requests: int = 0  # successful responses
    failures: int = 0  # requests that raised BackendError
    cancelled: int = 0  # streamed requests whose caller cancelled them (their usage is unknown)
    stopped: int = 0  # streamed requests the caller's ``until`` ended early (their usage is unknown)
    retries: int = 0  # extra attempts
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens, where reported

    def add(self, usage: Mapping[str, Any] | None) -> None:
        self.requests += 1
        if not isinstance(usage, Mapping):
            return
        self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.completion_tokens += int(usage.get("completion_tokens") or 0)
        details = usage.get("prompt_tokens_details")
        if isinstance(details, Mapping):
            self.cached_tokens += int(details.get("cached_tokens") or 0)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class EndpointCount(NamedTuple):
    """What one base URL of a pool has seen (:meth:`EndpointPool.endpoint_counts`)."""

    url: str  # the base URL, as normalized
    requests: int  # attempts sent to it, retries included (a counter)
    errors: int  # of those, attempts that failed there: an error status, no response, a bad stream (a counter)
    in_flight: int  # attempts waiting for its answer now (a gauge)


class Reply(NamedTuple):
    """A successful JSON response and the URL that produced it."""

    data: dict[str, Any]
    endpoint: str


def normalize_base_url(url: str) -> str:
    """The API root: trailing slashes removed, ``/v1`` appended to a bare host."""
    url = str(url).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"base URL must look like http://host:port/v1, got {url!r}")
    return url if parts.path not in ("", "/") else url + "/v1"


def error_message(response: httpx.Response) -> str:
    """The server's own error message: OpenAI's ``{"error": {"message": …}}``, FastAPI's
    ``{"detail": …}``, ``{"message": …}``, or the (shortened) body text."""
    try:
        data = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        text = response.text.strip()
        return text[:500] or (response.reason_phrase or "empty response")
    if isinstance(data, Mapping):
        err = data.get("error")
        if isinstance(err, Mapping) and err.get("message"):
            return str(err["message"])
        for key in ("error", "detail", "message"):
            if data.get(key):
                return str(data[key])[:500]
    return json.dumps(data)[:500]


def merge_events(events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The reply that streamed events add up to, shaped as the non-streamed reply.

    Per choice ``index``: the ``text`` pieces (completions) and ``delta.content`` pieces (chat,
    merged as ``message.content``) joined, lists (the log-probabilities) concatenated, any
    other field the last value sent (``finish_reason`` / ``stop_reason`` arrive with the last
    token; a field sent only as ``null`` stays, as ``null``). ``usage`` is the last one sent
    (``stream_options.include_usage`` puts it in a final event without choices)."""
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for event in events:
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices") or ():
            index = int(choice.get("index", 0))
            _merge_into(choices.setdefault(index, {}), choice)
    return {"choices": [choices[i] for i in sorted(choices)], "usage": usage}


def _merge_into(into: dict[str, Any], part: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in part.items():
        key = "message" if key == "delta" else key
        old = into.get(key)
        if value is None:
            into.setdefault(key, None)
        elif isinstance(value, str) and key in ("text", "content"):
            into[key] = (old if isinstance(old, str) else "") + value
        elif isinstance(value, list):
            into[key] = (old if isinstance(old, list) else []) + value
        elif isinstance(value, Mapping):
            into[key] = _merge_into(old if isinstance(old, dict) else {}, value)
        else:
            into[key] = value
    return into


class _Retry(Exception):
    """An attempt that failed in a way worth retrying (HTTP 429 or 5xx)."""

    def __init__(self, error: BackendError, retry_after: float | None = None):
        super().__init__(str(error))
        self.error, self.retry_after = error, retry_after


def _check_status(response: httpx.Response, endpoint: str) -> None:
    """Nothing for a 2xx; :class:`_Retry` for 429/5xx; else the :class:`BackendError` to give up with."""
    status = response.status_code
    if 200 <= status < 300:
        return
    error = BackendError(endpoint, status, error_message(response))
    if status == 429 or status >= 500:
        raise _Retry(error, _retry_after(response) if status in (429, 503) else None)
    raise error


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return min(max(float(value), 0.0), _MAX_RETRY_AFTER) if value is not None else None
    except ValueError:  # an HTTP date: not worth parsing, fall back to backoff
        return None


class EndpointPool:
    """JSON over HTTP to one or more OpenAI-compatible servers (see the module docstring).

    ``rng`` drives the backoff jitter: a ``random.Random``, a ``numpy.random.Generator``,
    an int seed, or ``None`` for a fresh, privately seeded ``random.Random``.
    """

    def __init__(
        self,
        base_urls: str | Sequence[str],
        *,
        api_key: str | None = None,
        max_concurrency: int = 64,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        retries: int = 4,
        backoff_base: float = 0.25,
        backoff_cap: float = 8.0,
        rng: Any = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ValueError("EndpointPool needs at least one base URL")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.base_urls = [normalize_base_url(u) for u in urls]
        self.max_concurrency, self.retries = int(max_concurrency), int(retries)
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, connect_timeout))
        self.backoff_base, self.backoff_cap = float(backoff_base), float(backoff_cap)
        self.rng = random.Random(rng) if rng is None or isinstance(rng, int) else rng
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.transport = transport
        self.usage = Usage()
        self.in_flight = [0] * len(self.base_urls)
        self.sent = [0] * len(self.base_urls)  # attempts sent to each base URL (retries included)
        self.failed = [0] * len(self.base_urls)  # attempts that failed at each base URL
        self._turn = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: list[httpx.AsyncClient] = []
        self._client_turn = 0
        self._slots: asyncio.Semaphore | None = None

    # -- plumbing -----------------------------------------------------------------------
    def _live(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        """A client and the semaphore of the running event loop (made on first use).

        Requests are spread round-robin over several ``httpx.AsyncClient`` s of at most
        :data:`CONNECTIONS_PER_CLIENT` kept-alive connections each: httpcore checks every
        pooled connection (a ``poll`` of its socket) each time it places a request, which
        with 64 connections in one pool cost the client more CPU than the rest of a
        particle-filtering run."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or not self._clients or self._clients[0].is_closed:
            per_client = min(CONNECTIONS_PER_CLIENT, self.max_concurrency)
            self._clients = [
                httpx.AsyncClient(transport=self.transport, timeout=self.timeout, headers=self.headers,
                                  limits=httpx.Limits(max_connections=None, max_keepalive_connections=per_client))
                for _ in range(-(-self.max_concurrency // per_client))]
            self._slots = asyncio.Semaphore(self.max_concurrency)
            self._loop = loop
            self.in_flight = [0] * len(self.base_urls)
        self._client_turn = (self._client_turn + 1) % len(self._clients)
        return self._clients[self._client_turn], self._slots  # type: ignore[return-value]

    def _pick(self) -> int:
        """The base URL with the fewest requests in flight; round-robin among ties."""
        n = len(self.base_urls)
        order = [(self._turn + j) % n for j in range(n)]
        best = min(order, key=lambda i: self.in_flight[i])  # first minimum in round-robin order
        self._turn = (best + 1) % n
        return best

    def endpoint_counts(self) -> list[EndpointCount]:
        """Per base URL, in order: the attempts sent to it and failed there (counters since the
        pool was made) and those in flight there now (see "Load per URL" in the module docstring)."""
        return [EndpointCount(url, sent, failed, max(0, busy))
                for url, sent, failed, busy in zip(self.base_urls, self.sent, self.failed, self.in_flight)]

    def url(self, index: int, path: str) -> str:
        base = self.base_urls[index]
        if path.startswith("/"):
            return base.removesuffix("/v1") + path
        return f"{base}/{path}"

    def backoff(self, attempt: int) -> float:
        """Full-jitter exponential backoff before retry ``attempt`` (0-based)."""
        return float(self.rng.uniform(0.0, min(self.backoff_cap, self.backoff_base * 2.0**attempt)))

    # -- requests -----------------------------------------------------------------------
    async def post(self, path: str, body: Mapping[str, Any], timeout: float | None = None) -> Reply:
        """POST ``body`` as JSON; the decoded JSON reply, or :class:`BackendError`."""
        async def once(client: httpx.AsyncClient, endpoint: str) -> Reply:
            response = await client.post(endpoint, json=body, timeout=timeout or self.timeout)
            _check_status(response, endpoint)
            return self._decode(response, endpoint)

        return await self._attempts(path, once)

    async def post_stream(self, path: str, body: Mapping[str, Any],
                          on_event: Callable[[dict[str, Any]], None] | None = None,
                          until: Callable[[], Callable[[dict[str, Any]], bool]] | None = None) -> Reply:
        """POST ``body`` (which asks for ``"stream": true``) and read its events (see
        "Streaming" in the module docstring): ``on_event(event)`` is called on each event of
        every attempt as it arrives; the reply is the last attempt's events merged
        (:func:`merge_events`), or :class:`BackendError`. ``until`` makes a fresh predicate
        at the start of each attempt; when it returns True for an event, the stream ends
        there (its connection closed before the server has finished) and the reply is that
        attempt's events up to and including it."""
        async def once(client: httpx.AsyncClient, endpoint: str) -> Reply:
            events: list[dict[str, Any]] = []
            stop = until() if until is not None else None
            stopped = False
            async with client.stream("POST", endpoint, json=body, timeout=self.timeout) as response:
                if not 200 <= response.status_code < 300:
                    await response.aread()
                    _check_status(response, endpoint)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank lines between events, ": keep-alive" comments
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = self._event(data, endpoint)
                    events.append(event)
                    if on_event is not None:
                        on_event(event)
                    if stop is not None and stop(event):
                        stopped = True
                        break  # leaving the block closes the unfinished response's connection
            merged = merge_events(events)
            self.usage.add(merged.get("usage"))
            self.usage.stopped += stopped
            return Reply(merged, endpoint)

        try:
            return await self._attempts(path, once)
        except asyncio.CancelledError:
            self.usage.cancelled += 1
            raise

    @staticmethod
    def _event(data: str, endpoint: str) -> dict[str, Any]:
        """One streamed event; an error event fails the attempt (retried when its code is 5xx)."""
        try:
            event = json.loads(data)
        except ValueError:
            raise BackendError(endpoint, 200, f"a streamed event is not JSON: {data[:200]!r}") from None
        if not isinstance(event, dict):
            raise BackendError(endpoint, 200, f"expected a JSON object per event, got {data[:200]}")
        err = event.get("error")
        if err and not event.get("choices"):
            message = str(err.get("message") or err) if isinstance(err, Mapping) else str(err)
            code = err.get("code") if isinstance(err, Mapping) else None
            status = code if isinstance(code, int) and 400 <= code < 600 else 200
            error = BackendError(endpoint, status, f"error in the stream: {message}")
            if status >= 500:
                raise _Retry(error)
            raise error
        return event

    async def _attempts(self, path: str, once: Callable[[httpx.AsyncClient, str], Awaitable[Reply]]) -> Reply:
        """``once(client, endpoint)`` on the least-busy URL, retried as the module docstring says."""
        client, slots = self._live()
        attempt = 0
        while True:
            async with slots:
                index = self._pick()
                endpoint = self.url(index, path)
                self.in_flight[index] += 1
                self.sent[index] += 1
                retry_after = None
                try:
                    return await once(client, endpoint)
                except RETRYABLE_ERRORS as err:
                    self.failed[index] += 1
                    error = BackendError(endpoint, None, f"{type(err).__name__}: {err}".rstrip(": "))
                except _Retry as retry:
                    self.failed[index] += 1
                    error, retry_after = retry.error, retry.retry_after
                except BackendError:
                    self.failed[index] += 1
                    self.usage.failures += 1
                    raise
                except httpx.HTTPError as err:  # bad URL, unsupported protocol…: retrying cannot help
                    self.failed[index] += 1
                    self.usage.failures += 1
                    raise BackendError(endpoint, None, f"{type(err).__name__}: {err}") from err
                finally:
                    self.in_flight[index] -= 1
            if attempt >= self.retries:
                self.usage.failures += 1
                raise BackendError(error.endpoint, error.status, error.message, attempts=attempt + 1)
            delay = self.backoff(attempt)
            if retry_after is not None:
                delay = max(delay, retry_after)
            attempt += 1
            self.usage.retries += 1
            await asyncio.sleep(delay)

    def _decode(self, response: httpx.Response, endpoint: str) -> Reply:
        try:
            data = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            raise BackendError(endpoint, response.status_code, f"the reply is not JSON: {response.text[:200]!r}") from None
        if not isinstance(data, dict):
            raise BackendError(endpoint, response.status_code, f"expected a JSON object, got {json.dumps(data)[:200]}")
        self.usage.add(data.get("usage"))
        return Reply(data, endpoint)

    async def check(self, model: str | None = None, timeout: float = 5.0) -> dict[str, list[str]]:
        """GET ``models`` on every base URL, once each (no retries, short timeouts).

        Returns ``{base URL: served model ids}``. Raises :class:`BackendError` if a
        server is unreachable or answers with an error, or — when ``model`` is given —
        does not serve it (the message lists the ids it does serve).
        """
        client, _ = self._live()
        limit = httpx.Timeout(timeout, connect=min(timeout, 2.0))

        async def one(index: int) -> list[str]:
            endpoint = self.url(index, "models")
            try:
                response = await client.get(endpoint, timeout=limit)
            except httpx.HTTPError as err:
                raise BackendError(endpoint, None, f"cannot reach the server ({type(err).__name__}: {err})") from err
            if response.status_code != 200:
                raise BackendError(endpoint, response.status_code, error_message(response))
            try:
                served = [str(m["id"]) for m in response.json()["data"]]
            except (ValueError, KeyError, TypeError):
                raise BackendError(endpoint, 200, f"not an OpenAI model list: {response.text[:200]!r}") from None
            if model is not None and model not in served:
                raise BackendError(
                    endpoint, None,
                    f"model {model!r} is not served here; served model ids: {served} "
                    "(vLLM serves --served-model-name, by default the --model argument)",
                )
            return served

        results = await asyncio.gather(*(one(i) for i in range(len(self.base_urls))), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return dict(zip(self.base_urls, results))  # type: ignore[arg-type]

    # -- lifetime -----------------------------------------------------------------------
    async def aclose(self) -> None:
        """Close the clients (clients made in another, finished event loop are just dropped)."""
        clients, loop = self._clients, self._loop
        self._clients, self._loop = [], None
        if loop is asyncio.get_running_loop():
            for client in clients:
                if not client.is_closed:
                    await client.aclose()

    async def __aenter__(self) -> "EndpointPool":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
