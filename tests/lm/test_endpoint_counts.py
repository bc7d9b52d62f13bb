"""``EndpointPool.endpoint_counts``: the attempts sent to each base URL, failed there and in
flight there, checked against what two real loopback HTTP servers saw (no mocked transport)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

httpx = pytest.importorskip("httpx")

from itscale.lm.http import BackendError, EndpointCount, EndpointPool  # noqa: E402


class CountingServer:
    """A loopback HTTP server answering every POST with a small JSON body; it counts what it
    receives, can answer 500 to the next ``fail`` requests, and can hold requests until ``release``."""

    def __init__(self):
        self.received = 0
        self.fail = 0
        self.hold = threading.Event()
        self.hold.set()  # not holding
        self.arrived = threading.Semaphore(0)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with server.lock:
                    server.received += 1
                    failing = server.fail > 0
                    server.fail -= failing
                server.arrived.release()
                server.hold.wait(30)
                status, body = (500, {"error": {"message": "injected"}}) if failing else (200, {"ok": True})
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "CountingServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.hold.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def two():
    with CountingServer() as a, CountingServer() as b:
        yield a, b


def closed_port_url() -> str:
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def test_sequential_requests_are_counted_at_the_url_that_got_them(two):
    a, b = two
    pool = EndpointPool([a.url, b.url], retries=0)

    async def go():
        async with pool:
            for _ in range(7):
                await pool.post("completions", {"prompt": "x"})

    asyncio.run(go())
    counts = pool.endpoint_counts()
    assert [c.url for c in counts] == [a.url, b.url]
    assert [c.requests for c in counts] == [a.received, b.received] == [4, 3]  # round-robin when idle
    assert [c.errors for c in counts] == [0, 0] and [c.in_flight for c in counts] == [0, 0]
    assert pool.usage.requests == 7


def test_retries_and_failures_count_where_they_happened(two):
    a, b = two
    b.fail = 2  # b's next two answers are 500s: each is retried, on the other (idle) URL
    pool = EndpointPool([b.url, a.url], retries=3, backoff_base=0.0)

    async def go():
        async with pool:
            for _ in range(4):
                await pool.post("completions", {"prompt": "x"})

    asyncio.run(go())
    by_url = {c.url: c for c in pool.endpoint_counts()}
    assert by_url[b.url].requests == b.received and by_url[a.url].requests == a.received
    assert by_url[b.url].errors == 2 and by_url[a.url].errors == 0
    assert sum(c.requests for c in by_url.values()) == 4 + 2  # every request once, plus one retry per 500
    assert pool.usage.retries == 2 and pool.usage.requests == 4


def test_a_refused_connection_is_an_error_at_its_url_that_no_server_saw(two):
    a, _ = two
    dead = closed_port_url()
    pool = EndpointPool([dead, a.url], retries=0)

    async def go():
        async with pool:
            with pytest.raises(BackendError):
                await pool.post("completions", {})  # the first goes to `dead`
            await pool.post("completions", {})  # the next to the other URL

    asyncio.run(go())
    assert pool.endpoint_counts() == [EndpointCount(dead, 1, 1, 0), EndpointCount(a.url, 1, 0, 0)]
    assert a.received == 1


def test_in_flight_shows_the_requests_waiting_at_each_url(two):
    a, b = two
    a.hold.clear()
    b.hold.clear()
    pool = EndpointPool([a.url, b.url], retries=0)
    seen = {}

    async def go():
        async with pool:
            tasks = [asyncio.create_task(pool.post("completions", {"i": i})) for i in range(3)]
            for server, n in ((a, 2), (b, 1)):  # least-busy first: a, b, then a again
                for _ in range(n):
                    assert await asyncio.to_thread(server.arrived.acquire, True, 30), "a request never arrived"
            seen["held"] = pool.endpoint_counts()
            a.hold.set()
            b.hold.set()
            await asyncio.gather(*tasks)

    asyncio.run(go())
    assert [(c.requests, c.in_flight) for c in seen["held"]] == [(2, 2), (1, 1)]
    assert [(c.requests, c.in_flight) for c in pool.endpoint_counts()] == [(2, 0), (1, 0)]
