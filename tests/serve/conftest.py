"""Real ``itscale serve`` processes for the server tests (embedded models, loopback only).

:class:`ServeProcess` runs ``python -m itscale.cli serve`` on a free loopback port in
its own session, logs to a file in pytest's temporary folder, and is ready once ``GET /health``
answers. The session fixture starts every server the tests need at once, so their
model loading overlaps; each is stopped (SIGTERM, then SIGKILL) at the end.

Servers:

- ``server``: keys from a key file (``alice``, ``small`` with low limits, ``solo``
  with ``max_running=1`` and a large budget), 16 running + 128 queued;
- ``tight``: one running, no queue, keys from ``ITSCALE_API_KEYS``;
- ``doomed``: for the graceful-shutdown test, which stops it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from itscale.serve.config import default_replica
from itscale.serve.metrics import parse as parse_metrics
from itscale.serve.metrics import parse_samples

ALICE = "sk-test-alice-0123456789"
SMALL = "sk-test-small-0123456789"
SOLO = "sk-test-solo-01234567890"
TIGHT = "sk-test-tight-0123456789"
LOW = "sk-test-low-012345678901"
PROBLEM = "Start at 3. Apply in order: +4, *2, -1."
LONG_PROBLEM = "Start at 3. Apply in order: +4, *2, -1, +17, *3, -5."

KEY_FILE = f"""\
# test keys
{ALICE}  name=alice max_budget=64 max_tokens=256
{SMALL}  name=small max_budget=4 max_tokens=32   # low limits
{SOLO}   name=solo max_running=1 max_budget=1024
{LOW}    name=low max_budget=2                   # below the main server's default budget (4)
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """One ``itscale serve`` process (see the module docstring)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None, log_dir: Path | None = None,
                 replica: str | None = None):
        self.name, self.port = name, free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = self.root + "/v1"
        # the replica name it labels its metrics and responses with (--replica-id, else the default)
        self.replica = replica or default_replica(self.port)
        named = ["--replica-id", replica] if replica else []
        self.command = [sys.executable, "-m", "itscale.cli", "serve", "--port", str(self.port), "--no-access-log",
                        "--threads", "1", *named, *args]
        self.env = {**os.environ, "ITSCALE_API_KEYS": "", **(env or {})}
        self.process: subprocess.Popen | None = None
        fd, log = tempfile.mkstemp(prefix=f"itscale-serve-{name}-", suffix=".log", dir=log_dir)
        os.close(fd)
        self.log = Path(log)

    def start(self) -> "ServeProcess":
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        atexit.register(self.stop)
        return self

    @contextlib.contextmanager
    def running(self):
        """Started and ready for the block (for a fixture: ``with ServeProcess(...).running() as s: yield s``);
        stopped after it."""
        self.start()
        try:
            yield self.wait_ready()
        finally:
            self.stop()

    def wait_ready(self, timeout: float = 180.0) -> "ServeProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"itscale serve ({self.name}) exited with {self.process.returncode}:\n"
                                   f"{self.log_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.root + "/health", timeout=1.0).status_code == 200:
                    return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"itscale serve ({self.name}) not ready after {timeout} s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as ``{"name{labels}": value}`` without the replica label, once checked that
        every ``itscale_*`` sample carries this server's replica name."""
        text = httpx.get(self.root + "/metrics", timeout=5.0).text
        wrong = [(name, labels) for name, labels, _ in parse_samples(text)
                 if name.startswith("itscale_") and labels.get("replica") != self.replica]
        assert not wrong, f"samples without replica={self.replica!r}: {wrong[:3]}"
        return parse_metrics(text, drop=("replica",))

    def outcome(self, name: str) -> int:
        return int(self.metrics()[f'itscale_requests_total{{outcome="{name}"}}'])

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "condition") -> dict[str, float]:
        """Poll /metrics until ``predicate(metrics)``; the metrics that satisfied it."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if predicate(m):
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not reached within {timeout} s; metrics: {m}")
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self) -> int | None:
        process, self.process = self.process, None
        atexit.unregister(self.stop)
        if process is None or process.poll() is not None:
            return process.returncode if process else None
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(timeout=10)


@pytest.fixture(scope="session")
def serve_processes(tmp_path_factory) -> dict[str, ServeProcess]:
    logs = tmp_path_factory.mktemp("serve-logs")  # pytest keeps the last few runs' folders
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(KEY_FILE)
    keys.chmod(0o600)
    common = ["--progress-interval", "0.2", "--request-timeout", "120"]
    procs = {
        "server": ServeProcess("main", [*common, "--api-key-file", str(keys), "--max-running", "16",
                                        "--max-queue", "128", "--default-budget", "4"], log_dir=logs),
        "tight": ServeProcess("tight", [*common, "--max-running", "1", "--max-queue", "0", "--max-budget", "1024"],
                              env={"ITSCALE_API_KEYS": f"{TIGHT}, sk-test-other-0123456789"}, log_dir=logs),
        "doomed": ServeProcess("doomed", [*common, "--max-budget", "512", "--graceful-timeout", "12"],
                               log_dir=logs),
    }
    for p in procs.values():
        p.start()
    try:
        for p in procs.values():
            p.wait_ready()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


@pytest.fixture(scope="session")
def server(serve_processes) -> ServeProcess:
    return serve_processes["server"]


@pytest.fixture(scope="session")
def tight(serve_processes) -> ServeProcess:
    return serve_processes["tight"]


@pytest.fixture(scope="session")
def doomed(serve_processes) -> ServeProcess:
    return serve_processes["doomed"]


@pytest.fixture
def client(server):
    import openai

    with openai.OpenAI(base_url=server.url, api_key=ALICE, max_retries=0, timeout=120) as c:
        yield c


def chat_body(model: str = "tiny", problem: str = PROBLEM, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": problem}], **fields}


class Background:
    """A raw HTTP request in a thread (to hold a server slot while a test looks on)."""

    def __init__(self, url: str, key: str | None, body: dict[str, Any], read_timeout: float = 120.0):
        self.url, self.key, self.body, self.read_timeout = url, key, body, read_timeout
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        try:
            timeout = httpx.Timeout(10.0, read=self.read_timeout)
            self.response = httpx.post(self.url + "/chat/completions", json=self.body, headers=headers,
                                       timeout=timeout)
        except BaseException as err:  # noqa: BLE001 - reported to the test
            self.error = err

    def start(self) -> "Background":
        self.thread.start()
        return self

    def join(self, timeout: float = 120.0) -> httpx.Response:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "background request still running"
        if self.error is not None:
            raise self.error
        return self.response
