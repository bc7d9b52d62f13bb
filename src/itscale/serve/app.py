"""The FastAPI application: routes, authentication, and the life of one request.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``
(and ``/v1/models/{id}``) need a key when keys are configured; ``GET /health`` and
``GET /metrics`` do not. Every response carries ``x-itscale-replica: NAME`` (``--replica-id``),
so a client or a load balancer's log can tell which replica answered.

One request
-----------
1. Authenticate (401), read and validate the body (400/404/413), resolve method,
   budget and limits (:mod:`~itscale.serve.jobs`), bind the strategy (400).
2. Admission (:mod:`~itscale.serve.admission`): a ticket, or 429 with ``Retry-After``.
3. The work runs as its own task: wait for a slot, then the strategy. The request's
   timeout covers both (504 when it expires, with ``x-should-retry: false`` so the
   official client does not repeat it).
4. The handler waits for the task *or* the client's disconnect, whichever comes
   first. A disconnect cancels the task (counted as ``cancelled``); so does any
   other way the response ends early (a streaming client that goes away, shutdown).

While shutting down, ``/health`` answers 503 and new requests get 503; requests in
flight have ``--graceful-timeout`` seconds to finish. Shortly before that deadline
(one second, or half of it when it is under two) the ones still running are cancelled
and answered with 503 ``shutting_down`` (an error event on a stream), which the
official client retries.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..types import Result
from .admission import Admission, Ticket
from .auth import ApiKey, KeyRing
from .config import ServeConfig
from .engine import Engine, Run
from .errors import ApiError, invalid
from .jobs import parse_body, resolve
from .metrics import Metrics, outcome_of
from .responses import chunks, response_body, sse, sse_comment, usage

log = logging.getLogger("itscale.serve")

SHUTDOWN_ERROR = ApiError(503, "the server shut down before the request finished; send it again (to another "
                                "replica)", code="shutting_down")
MAX_BODY_BYTES = 4 << 20
CLIENT_CLOSED = 499  # nginx's code for "client closed request" (never reaches the client)


@dataclass
class ServerState:
    engine: Engine
    config: ServeConfig
    keys: KeyRing
    admission: Admission
    metrics: Metrics = field(default_factory=Metrics)
    draining: bool = False
    tasks: set[asyncio.Task] = field(default_factory=set)
    loop: asyncio.AbstractEventLoop | None = None
    replica: str = ""  # this server's name among replicas (default: the configuration's)

    def __post_init__(self) -> None:
        self.replica = self.replica or self.config.replica()

    # -- shutdown -------------------------------------------------------------------
    def drain(self) -> None:
        """Shutdown has begun: refuse new work, and cancel whatever still runs shortly
        before the graceful deadline, so that its client gets a clean 503."""
        if self.loop is None:
            return
        self.draining = True
        grace = self.config.graceful_timeout
        self.loop.call_later(max(0.0, grace - min(1.0, grace / 2)), self.cancel_all)

    def cancel_all(self) -> None:
        left = [t for t in self.tasks if not t.done()]
        if left:
            log.warning("shutdown: cancelling %d request(s) still running", len(left))
        for t in left:
            t.cancel()

    # -- authentication -----------------------------------------------------------
    def authenticate(self, request: Request) -> ApiKey:
        if self.keys.open:
            return ApiKey("open", b"", self.config.limits)
        token = KeyRing.bearer(request.headers.get("authorization"))
        key = self.keys.match(token) if token is not None else None
        if key is None:
            self.metrics.count("unauthorized")
            why = "no API key given" if token is None else "invalid API key"
            raise ApiError(401, f"{why}: send 'Authorization: Bearer KEY' (the openai client's api_key)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return key

    # -- the work of one request ----------------------------------------------------
    async def execute(self, run: Run, ticket: Ticket) -> Result:
        job = run.job
        deadline = asyncio.timeout(job.timeout)
        try:
            async with deadline:
                await ticket.start()
                result = await self.engine.run(run)
        except TimeoutError as err:
            if not deadline.expired():  # a backend's own timeout, not the request's
                log.exception("%s: %s failed", job.id, job.method)
                raise ApiError(502, f"{job.method} failed: a backend timed out ({err or 'TimeoutError'})",
                               code="backend_timeout") from None
            where = "waiting for a slot" if ticket.state == "waiting" else "running"
            raise ApiError(504, f"the request did not finish within its timeout of {job.timeout:g} s (it was "
                                f"{where}); ask for a smaller budget or max_tokens, or a longer itscale.timeout "
                                f"(at most the server's --request-timeout)", code="timeout",
                           headers={"x-should-retry": "false"}) from None
        except (ApiError, asyncio.CancelledError):
            raise
        except Exception as err:
            log.exception("%s: %s failed", job.id, job.method)
            raise ApiError(500, f"{job.method} failed: {type(err).__name__}: {err}", code="method_failed") from None
        if not result.ok or result.solution is None:
            why = result.message or "every candidate failed"  # (with the backend's own words when it failed)
            raise ApiError(502, f"{job.method} produced no answer ({result.status}: {why})", code="no_answer")
        return result

    def start(self, run: Run, key: ApiKey) -> tuple[asyncio.Task, Ticket]:
        if self.draining:
            raise ApiError(503, "the server is shutting down; retry on another replica", code="shutting_down",
                           headers={"Retry-After": "5"})
        ticket = self.admission.admit(key.name, key.limits.max_running)
        task = asyncio.create_task(self.execute(run, ticket), name=run.job.id)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(lambda _: ticket.release())  # runs even if cancelled before starting
        return task, ticket

    def finish(self, run: Run, status: int, started: float, result: Result | None = None,
               outcome: str | None = None) -> None:
        outcome = outcome or outcome_of(status)
        self.metrics.count(outcome)
        seconds = time.perf_counter() - started
        if result is not None:
            self.metrics.answered(usage(result), seconds)
        job = run.job
        log.info("%s key=%s %s budget=%d status=%d %s %.3fs tokens=%d", job.id, job.key_name, job.method,
                 job.budget, status, outcome, seconds, result.cost.generated_tokens if result is not None else 0)


class ReplicaHeader:
    """ASGI middleware: ``x-itscale-replica: NAME`` on every HTTP response (streamed ones too),
    NAME read from the server's state when the response starts."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), replica_header(self.state)]}
            await send(message)

        await self.app(scope, receive, send_named)


def replica_header(state: ServerState) -> tuple[bytes, bytes]:
    return b"x-itscale-replica", state.replica.encode("ascii")


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class EventStream(StreamingResponse):
    """An SSE response that cancels its work task however the response ends."""

    def __init__(self, content: AsyncIterator[str], task: asyncio.Task, on_abandon):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.task, self.on_abandon = task, on_abandon

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.task.done():
                self.task.cancel()
                self.on_abandon()


def create_app(engine: Engine, config: ServeConfig, keys: KeyRing, state: ServerState | None = None) -> FastAPI:
    """The application serving ``engine`` (``state`` is created when not given)."""
    state = state or ServerState(engine, config, keys, Admission(config.max_running, config.max_queue))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop = asyncio.get_running_loop()
        yield
        state.draining = True
        left = [t for t in state.tasks if not t.done()]
        state.cancel_all()
        if left:
            await asyncio.gather(*left, return_exceptions=True)

    app = FastAPI(title="itscale", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.itscale = state
    app.add_middleware(ReplicaHeader, state=state)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return _error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        message = (f"no route {request.method} {request.url.path}; see /v1/models, /v1/chat/completions, "
                   "/v1/completions" if err.status_code in (404, 405) else str(err.detail))
        return _error_response(ApiError(err.status_code, message))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        log.exception("unexpected error on %s", request.url.path)
        response = _error_response(ApiError(500, f"internal error: {type(err).__name__}"))
        response.headers.append(*(v.decode("ascii") for v in replica_header(state)))  # (sent outside the middleware)
        return response

    @app.get("/health")
    async def health():
        if state.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        adm = state.admission
        return PlainTextResponse(state.metrics.render(adm.running, len(adm.waiting), engine.generated_tokens,
                                                      engine.policy_calls, engine.backend_calls(),
                                                      replica=state.replica, upstream=engine.upstream()),
                                 media_type="text/plain; version=0.0.4")

    def model_card() -> dict[str, Any]:
        # "root" is the served name, never the policy's folder or URL: key holders need not
        # learn the server's file system or internal hosts
        return {"id": engine.model_name, "object": "model", "created": 0, "owned_by": "itscale",
                "root": engine.model_name, "parent": None}

    @app.get("/v1/models")
    async def models(request: Request):
        state.authenticate(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request):
        state.authenticate(request)
        if model != engine.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {engine.model_name!r}",
                           "model", "model_not_found")
        return model_card()

    async def complete(request: Request, kind: Literal["chat", "completion"]) -> Response:
        started = time.perf_counter()
        key = state.authenticate(request)
        try:
            run = prepare(await _read_json(request, config.body_timeout), kind, key)
            task, ticket = state.start(run, key)
        except ApiError as err:
            state.metrics.count(outcome_of(err.status))
            raise
        if run.job.stream:
            return EventStream(stream(run, task, ticket, started), task,
                               on_abandon=lambda: state.finish(run, CLIENT_CLOSED, started))
        return await answer(request, run, task, ticket, started)

    def prepare(body: Any, kind: Literal["chat", "completion"], key: ApiKey) -> Run:
        req = parse_body(kind, body)
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        job = resolve(req, job_id=prefix + secrets.token_hex(12), config=config, base_model=engine.model_name,
                      limits=key.limits, key_name=key.name, prm_enabled=engine.prm is not None,
                      allocation=engine.allocation)
        return engine.prepare(job)

    async def answer(request: Request, run: Run, task: asyncio.Task, ticket: Ticket, started: float) -> Response:
        watcher = asyncio.create_task(_wait_for_disconnect(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():  # the client went away (or this handler was cancelled)
                task.cancel()
                state.finish(run, CLIENT_CLOSED, started)
                with suppress(asyncio.CancelledError, Exception):
                    await task
        if task.cancelled() and state.draining:  # cancelled at the graceful deadline
            err = SHUTDOWN_ERROR
            state.finish(run, err.status, started, outcome="cancelled")
            return _error_response(err)
        if task.cancelled():
            return Response(status_code=CLIENT_CLOSED)
        try:
            result = task.result()
        except ApiError as err:
            state.finish(run, err.status, started)
            raise
        state.finish(run, 200, started, result)
        return JSONResponse(response_body(run, result, ticket.queued_seconds))

    async def stream(run: Run, task: asyncio.Task, ticket: Ticket, started: float) -> AsyncIterator[str]:
        changed = asyncio.Event()
        run.progress.listeners.append(lambda _: changed.set())
        yield sse_comment("accepted", {"id": run.job.id, "method": run.job.method, "budget": run.job.budget})
        while not task.done():
            waiter = asyncio.ensure_future(changed.wait())
            try:
                await asyncio.wait({task, waiter}, timeout=config.progress_interval,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if task.done():
                break
            changed.clear()
            if ticket.state == "waiting":
                yield sse_comment("queued", {"position": ticket.position})
            else:
                yield sse_comment("progress", run.progress.snapshot())
        if task.cancelled():  # shutdown cancelled the work
            state.finish(run, SHUTDOWN_ERROR.status, started, outcome="cancelled")
            yield sse(SHUTDOWN_ERROR.body())
            yield sse("[DONE]")
            return
        try:
            result = task.result()
        except ApiError as err:
            state.finish(run, err.status, started)
            yield sse(err.body())
            yield sse("[DONE]")
            return
        state.finish(run, 200, started, result)
        for chunk in chunks(run, result, ticket.queued_seconds, engine.format.delimiter):
            yield sse(chunk)
        yield sse("[DONE]")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, "completion")

    return app


async def _read_json(request: Request, timeout: float) -> Any:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body has {size} bytes; the limit is {MAX_BODY_BYTES}")
    try:  # a client that sends half a body must not hold a connection and a worker for ever
        raw = await asyncio.wait_for(request.body(), timeout)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s (--body-timeout)") from None
    except ClientDisconnect:  # gone before its body arrived: counted as cancelled, nothing to answer
        raise ApiError(CLIENT_CLOSED, "the client closed the connection before its request body arrived") from None
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body has {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise invalid(f"the request body is not valid JSON: {err}") from None
    except RecursionError:  # e.g. 100,000 nested "[": the parser's recursion limit, not a server fault
        raise invalid("the request body nests arrays or objects too deeply to parse") from None
