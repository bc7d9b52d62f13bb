"""Back-pressure, timeouts, cancellation, load and shutdown of a real ``itscale serve``.

Slow requests are particle filtering with a large budget on a six-operation problem
(with the servers' one torch thread, pf-64 takes about 2 s and pf-512 over 15 s), so
that the tests can act while one runs.
"""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import openai
import pytest

from .conftest import ALICE, LONG_PROBLEM, PROBLEM, SOLO, TIGHT, Background, chat_body

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("serve")]

RUNNING = "itscale_requests_running"
CALLS = "itscale_policy_calls_total"


def test_full_server_answers_429_with_retry_after(tight):
    slow = Background(tight.url, TIGHT, chat_body("tiny:pf-64", LONG_PROBLEM, seed=0)).start()
    tight.wait_for(lambda m: m[RUNNING] == 1, what="the slow request running")
    rejected = tight.outcome("rejected")
    c = openai.OpenAI(base_url=tight.url, api_key=TIGHT, max_retries=0)
    with pytest.raises(openai.RateLimitError) as err:
        c.chat.completions.create(model="tiny:greedy", messages=[{"role": "user", "content": PROBLEM}])
    assert err.value.status_code == 429 and err.value.body["code"] == "server_busy"
    assert 1 <= int(err.value.response.headers["retry-after"]) <= 60
    with pytest.raises(openai.RateLimitError):  # a stream is refused before it starts
        c.chat.completions.create(model="tiny:greedy", messages=[{"role": "user", "content": PROBLEM}],
                                  stream=True)
    assert tight.outcome("rejected") == rejected + 2
    assert slow.join().status_code == 200  # the request in flight is unaffected
    tight.wait_for(lambda m: m[RUNNING] == 0)
    assert c.chat.completions.create(model="tiny:greedy", messages=[{"role": "user", "content": PROBLEM}]).choices


def test_per_key_running_limit(server):
    slow = Background(server.url, SOLO, chat_body("tiny:pf-64", LONG_PROBLEM, seed=0)).start()
    server.wait_for(lambda m: m[RUNNING] >= 1, what="the slow request running")
    solo = openai.OpenAI(base_url=server.url, api_key=SOLO, max_retries=0)
    with pytest.raises(openai.RateLimitError) as err:
        solo.chat.completions.create(model="tiny:greedy", messages=[{"role": "user", "content": PROBLEM}])
    assert err.value.body["code"] == "key_busy" and "retry-after" in err.value.response.headers
    alice = openai.OpenAI(base_url=server.url, api_key=ALICE, max_retries=0)  # other keys still get through
    assert alice.chat.completions.create(model="tiny:greedy", messages=[{"role": "user", "content": PROBLEM}]).choices
    assert slow.join().status_code == 200


def test_timeout_gives_504_and_is_not_retried(server):
    timeouts = server.outcome("timeout")
    c = openai.OpenAI(base_url=server.url, api_key=ALICE)  # default retries: the 504 says not to
    t = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        c.chat.completions.create(model="tiny:pf-64", messages=[{"role": "user", "content": LONG_PROBLEM}],
                                  extra_body={"itscale": {"timeout": 0.2}})
    assert err.value.status_code == 504 and err.value.body["code"] == "timeout"
    assert "timeout of 0.2 s" in err.value.body["message"]
    assert err.value.response.headers["x-should-retry"] == "false"
    assert time.monotonic() - t < 30
    assert server.outcome("timeout") == timeouts + 1
    server.wait_for(lambda m: m[RUNNING] == 0, what="the timed-out request released")


def _assert_cancelled(server, cancelled_before: int) -> None:
    """The request is counted as cancelled, leaves the server, and its work stops."""
    m = server.wait_for(lambda m: m['itscale_requests_total{outcome="cancelled"}'] == cancelled_before + 1
                        and m[RUNNING] == 0, timeout=20, what="the request cancelled")
    calls = m[CALLS]
    time.sleep(2.0)  # a pf-512 run would make a policy call about every 1.4 s
    assert server.metrics()[CALLS] <= calls + 1  # at most the call already in flight


def test_client_disconnect_cancels_the_work(server):
    cancelled = server.outcome("cancelled")
    # the client gives up after 1.5 s and closes the connection; the run needs ~10 s
    gone = Background(server.url, SOLO, chat_body("tiny:pf-512", LONG_PROBLEM, seed=0), read_timeout=1.5).start()
    with pytest.raises(httpx.ReadTimeout):
        gone.join()
    _assert_cancelled(server, cancelled)


def test_stream_disconnect_cancels_the_work(server):
    cancelled = server.outcome("cancelled")
    with httpx.stream("POST", server.url + "/chat/completions", headers={"Authorization": f"Bearer {SOLO}"},
                      json=chat_body("tiny:pf-512", LONG_PROBLEM, stream=True, seed=0), timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith(": progress"):
                break  # the method is running: hang up
    _assert_cancelled(server, cancelled)


def test_64_concurrent_requests_complete_without_errors(server):
    methods = ["tiny:bon-2", "tiny:pf-2", "tiny:greedy", "tiny:sc-2"]

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url, api_key=ALICE, max_retries=0, timeout=120) as c:
            async def one(i):
                problem = f"Start at {i % 40 + 1}. Apply in order: +{i % 9 + 1}, *2, -3."
                if i % 8 == 0:  # some streams in the mix
                    stream = await c.chat.completions.create(
                        model=methods[i % 4], messages=[{"role": "user", "content": problem}], max_tokens=64,
                        seed=i, stream=True)
                    return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
                r = await c.chat.completions.create(model=methods[i % 4], max_tokens=64, seed=i,
                                                    messages=[{"role": "user", "content": problem}])
                return r.choices[0].message.content

            return await asyncio.gather(*(one(i) for i in range(64)), return_exceptions=True)

    before = server.metrics()
    ok_before = server.outcome("ok")
    t = time.monotonic()
    answers = asyncio.run(main())
    elapsed = time.monotonic() - t
    after = server.metrics()
    errors = [a for a in answers if isinstance(a, BaseException)]
    assert not errors, errors[:3]
    assert all(a for a in answers)
    assert server.outcome("ok") == ok_before + 64
    assert elapsed < 90, f"64 requests took {elapsed:.1f} s"
    # concurrent requests share backend calls: far fewer model calls than requests' calls
    asked = after[CALLS] - before[CALLS]
    made = after['itscale_backend_calls_total{backend="policy"}'] - before['itscale_backend_calls_total{backend="policy"}']
    assert made < asked / 2, (made, asked)
    print(f"64 concurrent requests in {elapsed:.1f} s; {asked:.0f} policy calls served by {made:.0f} model calls")


def test_graceful_shutdown_finishes_short_requests_and_cancels_long_ones(doomed):
    # --graceful-timeout 12: pf-8 (1-3 s) finishes in time; particle Gibbs with 256 sweeps
    # (a minute or more of small rounds) is cancelled at 11 s with a 503
    long = Background(doomed.url, None, chat_body("tiny:pg-512", LONG_PROBLEM, seed=0,
                                                  itscale={"params": {"sweeps": 256}})).start()
    doomed.wait_for(lambda m: m[RUNNING] == 1, what="the long request running")
    short = Background(doomed.url, None, chat_body("tiny:pf-8", LONG_PROBLEM, seed=0)).start()
    doomed.wait_for(lambda m: m[RUNNING] == 2, what="both requests running")
    t = time.monotonic()
    doomed.signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.ConnectError):  # no longer accepting connections
        httpx.get(doomed.root + "/health", timeout=2)
    response = short.join()
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]
    response = long.join()
    assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
    assert 9.0 < time.monotonic() - t < 30
    assert doomed.process.wait(timeout=30) == 0  # a clean drain is a clean exit (not 143)
    log = doomed.log_text()
    assert "shutting down: finishing 2 request(s) in flight" in log
    assert "shutdown: cancelling 1 request(s) still running" in log and "Application shutdown complete" in log
    assert "Traceback" not in log
