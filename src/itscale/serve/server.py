"""Starting the server: keys, models, then uvicorn with a graceful shutdown.

:func:`serve` checks the settings that can fail without models first (keys, the
open-server rule), loads the models, and only then listens, so ``/health`` answers
200 as soon as the port is open. On SIGINT/SIGTERM uvicorn stops accepting
connections and the app starts draining (``/health`` 503, new requests 503); the
requests in flight get ``graceful_timeout`` seconds, then they are cancelled and
answered 503 (see :mod:`~itscale.serve.app`). A drained server exits with status 0.

Open servers: with no key configured every request is accepted, which is allowed
only on a loopback address unless ``allow_open`` is set (``--allow-open``).
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

from .auth import KeyRing, env_keys, key_file_warning, load_key_file, plain_keys
from .config import ServeConfig

log = logging.getLogger("itscale.serve")


def configure_logging(level: str = "info") -> None:
    """Our log lines next to uvicorn's (which keeps its own handlers)."""
    logging.basicConfig(level=level.upper(), format="%(levelname)-9s %(name)s: %(message)s")


class StartupError(ValueError):
    """A setting that prevents the server from starting; the message names it."""


def key_ring(config: ServeConfig, api_keys: Sequence[str] = (), key_file: str | os.PathLike | None = None,
             environ: dict[str, str] | None = None) -> KeyRing:
    """The accepted keys from the flag, the environment and the key file; checks the open-server rule."""
    keys = plain_keys(api_keys, "--api-key", config.limits) + env_keys(config.limits, environ)
    if key_file is not None:
        keys += load_key_file(key_file, config.limits)
        warning = key_file_warning(key_file)
        if warning:
            log.warning(warning)
    ring = KeyRing(keys)
    if ring.open and not config.loopback and not config.allow_open:
        raise StartupError(f"no API key is configured and --host {config.host} is not a loopback address: give "
                           "--api-key-file FILE (or ITSCALE_API_KEYS), or pass --allow-open to serve without "
                           "authentication")
    return ring


def serve(config: ServeConfig, keys: KeyRing, *, log_level: str = "info", access_log: bool = True) -> None:
    """Load the models and serve until SIGINT/SIGTERM (blocking)."""
    import uvicorn

    from .admission import Admission
    from .app import ServerState, create_app
    from .engine import Engine
    from .protocol import with_header_timeout

    configure_logging(log_level)
    engine = Engine.load(config, log.info)
    state = ServerState(engine, config, keys, Admission(config.max_running, config.max_queue))
    app = create_app(engine, config, keys, state)
    if keys.open:
        log.warning("no API key configured: every request is accepted (listening on %s only)", config.host)
    else:
        log.info("%d API key(s) configured", len(keys.keys))
    log.info("model %r: default %s with budget %d; limits: budget <= %d, max_tokens <= %d; %d running + %d queued; "
             "caches %s", engine.model_name, config.default_method, config.default_budget, config.limits.max_budget,
             config.limits.max_tokens, config.max_running, config.max_queue,
             "per key" if config.cache_isolation == "per-key" else "shared by all keys")

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not state.draining:  # the first signal: drain (a second one forces uvicorn's exit)
                log.info("shutting down: finishing %d request(s) in flight (up to %g s)",
                         state.admission.running + len(state.admission.waiting), config.graceful_timeout)
                state.draining = True
                if state.loop is not None:
                    state.loop.call_soon_threadsafe(state.drain)
                super().handle_exit(sig, frame)
                # uvicorn re-raises captured signals once it has stopped, so a clean drain would
                # end with status 143; a drain is a clean exit (0). A second signal keeps uvicorn's way.
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list) and captured and captured[-1] == sig:
                    captured.pop()
                return
            super().handle_exit(sig, frame)

    uv = uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level, access_log=access_log,
                        timeout_graceful_shutdown=config.graceful_timeout, lifespan="on",
                        http=with_header_timeout(config.header_timeout))
    sockets = None
    if config.port == 0:  # the system picks the port: bind now, so the default replica name has it
        sockets = [uv.bind_socket()]
        state.replica = config.replica(sockets[0].getsockname()[1])
    log.info("replica %s", state.replica)
    Server(uv).run(sockets=sockets)
