"""Throughput and latency of ``itscale serve`` under concurrent load (embedded models, CPU).

    python benchmarks/serve_load.py [--budget 8] [--concurrency 1 8 32] [--requests 64]
                                    [--methods bon pf] [--max-tokens 128] [--url URL --api-key KEY]

Without ``--url`` it starts ``itscale serve`` (embedded policy and PRM, loopback, no
keys, enough slots that nothing queues at the highest concurrency) and stops it at
the end. Then, for each method and each concurrency c, ``c`` clients (the official
``openai`` async client) send held-out medium arithmetic problems back to back, each
client starting its next request when the previous one is answered, until
``--requests`` requests are answered (at least 2c). It reports

- requests/s and generated tokens/s (``usage.completion_tokens``: every token the
  method generated, not just the returned text) over the cell's wall time,
- p50 / p95 of the client-side latency, accuracy of the answers, and errors.

Requests of one cell run concurrently in the server and share batched policy and PRM
calls, so throughput should grow with concurrency while latency grows more slowly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import openai
from rich.console import Console
from rich.table import Table

from itscale.serve.methods import ALIASES
from itscale.tasks import arithmetic


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_server(max_running: int, budget: int):
    """``itscale serve`` on a free loopback port; yields its base URL."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="serve-load-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "itscale.cli", "serve", "--port", str(port), "--no-access-log",
           "--max-running", str(max_running), "--max-queue", "1024", "--max-budget", str(max(64, budget)),
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "ITSCALE_API_KEYS": ""},
                            start_new_session=True)
    root = f"http://127.0.0.1:{port}"
    try:
        t = time.perf_counter()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"itscale serve exited:\n{Path(log.name).read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(root + "/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        print(f"itscale serve ready in {time.perf_counter() - t:.1f} s")
        yield root + "/v1"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        Path(log.name).unlink(missing_ok=True)


async def cell(url: str, key: str, model: str, concurrency: int, n_requests: int, problems, max_tokens: int):
    """``concurrency`` closed-loop clients until ``n_requests`` are answered."""
    latencies, tokens, correct, errors = [], 0, 0, 0
    queue = list(range(n_requests))
    async with openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=600) as client:
        async def worker():
            nonlocal tokens, correct, errors
            while queue:
                i = queue.pop()
                problem = problems[i % len(problems)]
                t = time.perf_counter()
                try:
                    r = await client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": problem.prompt}], max_tokens=max_tokens,
                        seed=i)
                except openai.APIError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t)
                tokens += r.usage.completion_tokens
                correct += arithmetic.is_correct(problem, r.choices[0].message.content)

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"requests": len(latencies), "wall": wall, "rps": len(latencies) / wall, "tps": tokens / wall,
            "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
            "accuracy": correct / max(1, len(latencies)), "errors": errors}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=64, help="requests per cell (at least 2 x concurrency)")
    ap.add_argument("--methods", nargs="+", default=["bon", "pf"], help="method names or aliases")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--url", help="a running server's base URL (…/v1); default: start one")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--model", default="tiny", help="the server's base model name [tiny]")
    ns = ap.parse_args(argv)
    problems = arithmetic.eval_set("medium")
    rows = []
    with (contextlib.nullcontext(ns.url) if ns.url else local_server(max(ns.concurrency), ns.budget)) as url:
        model = lambda m: f"{ns.model}:{m}-{ns.budget}"  # noqa: E731
        asyncio.run(cell(url, ns.api_key, model(ns.methods[0]), 4, 8, problems, ns.max_tokens))  # warm-up
        for m in ns.methods:
            for c in ns.concurrency:
                r = asyncio.run(cell(url, ns.api_key, model(m), c, max(ns.requests, 2 * c), problems, ns.max_tokens))
                rows.append((ALIASES.get(m, m), c, r))
                print(f"{m} c={c}: {r['rps']:.2f} req/s, p50 {r['p50']:.2f} s", flush=True)
    table = Table(title=f"itscale serve: embedded models, budget {ns.budget}, max_tokens {ns.max_tokens} "
                        f"({os.cpu_count()} CPU cores)")
    for col in ("method", "concurrency", "requests", "req/s", "gen tok/s", "p50 s", "p95 s", "accuracy", "errors"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name, c, r in rows:
        table.add_row(name, str(c), str(r["requests"]), f"{r['rps']:.2f}", f"{r['tps']:.0f}", f"{r['p50']:.3f}",
                      f"{r['p95']:.3f}", f"{r['accuracy']:.0%}", str(r["errors"]))
    Console(width=120).print(table)
    return 1 if any(r["errors"] for _, _, r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
