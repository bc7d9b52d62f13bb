"""Particle filtering vs best-of-N on the embedded models served by vLLM over HTTP.

    python benchmarks/http_backend.py [--problems 50] [--particles 16] [--level medium]
                                      [--policy-url URL --prm-url URL] [--max-concurrency 64]

Without URLs it starts two vLLM servers (CPU, from ``.venv-vllm``; ``make test``
creates it) for the embedded policy and PRM with ``tests/servers.py`` and reports
their start-up time; with ``--policy-url``/``--prm-url`` it uses running servers
(the served model is the only one each serves).

Then, on the same held-out problems, all problems concurrently through
``run_many`` (one policy call and one PRM call per round, every request sent at
once), it runs

- particle filtering with N particles: one step per round, ``/v1/completions``
  with ``stop="\\n"`` for every live particle, then a PRM request per particle;
- best-of-N: one request per problem with ``n=N`` whole solutions, then one PRM
  request per sample,

so both spend roughly the same generated tokens. It prints wall time, policy and
PRM time, generated tokens, tokens/s, HTTP requests, accuracy, and the PF / BoN
wall-time ratio (target ≤ 1.3: the step-by-step round trips and resampling cost
little over the fully parallel baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import re
import sys
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the vLLM launcher of the integration tests

from servers import BLOCK_SIZE, prm_dir, start_vllms  # noqa: E402

from itscale import zoo  # noqa: E402
from itscale.backends import served_model  # noqa: E402
from itscale.bench.backends import Timed  # noqa: E402
from itscale.lm import Lookahead, OpenAIGenerator  # noqa: E402
from itscale.rewards.remote import RemoteTagPRM  # noqa: E402
from itscale.strategies import make_strategy, run_many  # noqa: E402
from itscale.tasks import arithmetic  # noqa: E402
from itscale.types import Problem, SamplingParams, ScoreRequest, StepRequest  # noqa: E402

SAMPLING = SamplingParams(temperature=0.8, max_step_tokens=24)
METHODS = {"particle_filtering": "particle filtering", "best_of_n": "best-of-N"}


#: vLLM's Prometheus counters read by the benchmarks, and the keys they are reported under.
COUNTERS = {
    "vllm:generation_tokens_total": "generated",
    "vllm:prompt_tokens_total": "prompt",
    "vllm:prompt_tokens_cached_total": "cached",
    "vllm:prefix_cache_hits_total": "prefix_hits",
    "vllm:request_params_n_count": "requests",
    "vllm:request_params_n_sum": "sequences",
    "vllm:iteration_tokens_total_count": "engine_steps",  # forward passes (scheduler iterations)
    "vllm:request_queue_time_seconds_sum": "queue_s",  # summed over requests: time waiting to be scheduled
}
_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$")
_HANDLER = re.compile(r'handler="([^"]*)"')


def root_of(url: str) -> str:
    """The server root of an API base URL (``http://h:p/v1`` → ``http://h:p``)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def parse_counters(text: str) -> dict[str, float]:
    """The :data:`COUNTERS` in a ``/metrics`` page (summed over label sets), and HTTP
    requests by endpoint (``"http /v1/completions"``)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.groups()
        if name in COUNTERS:
            key = COUNTERS[name]
        elif name == "http_requests_total" and labels and "/v1/" in labels:
            key = "http " + _HANDLER.search(labels).group(1)
        else:
            continue
        out[key] = out.get(key, 0.0) + float(value)
    return out


def server_counters(url: str) -> dict[str, float]:
    """:func:`parse_counters` of a server's ``/metrics``; empty if it has none (not vLLM)."""
    import httpx

    try:
        return parse_counters(httpx.get(root_of(url) + "/metrics", timeout=5).text)
    except httpx.HTTPError:
        return {}


def backends(policy_url: str, prm_url: str, max_concurrency: int, kv_block: int | None = BLOCK_SIZE
             ) -> tuple[Timed, Timed]:
    """Fresh clients (no client-side PRM cache carried between methods), timed; the policy
    aligns its look-ahead to ``kv_block`` (the servers' KV block; ``None``: no look-ahead)."""
    policy = OpenAIGenerator(policy_url, served_model(policy_url, None, "policy"), tokenizer=zoo.policy_path(),
                             max_concurrency=max_concurrency)
    if kv_block is not None:
        policy = Lookahead(policy, kv_block)
    prm = RemoteTagPRM(prm_url, served_model(prm_url, None, "prm"), tokenizer=prm_dir(),
                       delimiter=arithmetic.DELIMITER, max_concurrency=max_concurrency)
    return Timed(policy), Timed(prm)


async def warm_up(policy: Timed, prm: Timed) -> None:
    """A first request to each server (vLLM's first batch pays one-off set-up)."""
    problem = Problem("warm-up", "Start at 1. Apply in order: +1.")
    await policy.inner.check()
    await prm.inner.check()
    await policy.generate_steps([StepRequest(problem, (), 4, SamplingParams(max_step_tokens=8, seed=0), ("\n",))])
    await prm.score_steps([ScoreRequest(problem, ("1+1=2\n",))])


def run_method(name: str, problems, budget: int, policy_url: str, prm_url: str, max_concurrency: int) -> dict:
    policy, prm = backends(policy_url, prm_url, max_concurrency)
    strategy = make_strategy(name, policy, prm, format=arithmetic.STEP_FORMAT, sampling=SAMPLING)

    server: dict[str, float] = {}

    async def go():
        await warm_up(policy, prm)
        policy.seconds = prm.seconds = 0.0
        usage_before = (policy.inner.http.usage.requests, prm.inner.http.usage.requests)
        before = server_counters(policy_url)
        t, cpu = time.perf_counter(), time.process_time()
        results = await run_many(strategy, problems, budget, seed=0)
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        after = server_counters(policy_url)
        server.update({k: after[k] - before[k] for k in after if k in before})
        requests = (policy.inner.http.usage.requests - usage_before[0], prm.inner.http.usage.requests - usage_before[1])
        await policy.inner.aclose()
        await prm.inner.aclose()
        return results, wall, cpu, requests

    results, wall, cpu, (policy_requests, prm_requests) = asyncio.run(go())
    generated = sum(r.cost.generated_tokens for r in results)
    correct = sum(bool(r.solution) and arithmetic.is_correct(r.problem, r.solution) for r in results)
    return dict(wall=wall, client_cpu=cpu, server=server, policy_s=policy.seconds, prm_s=prm.seconds, generated=generated,
                prm_tokens=sum(r.cost.prm_tokens for r in results), policy_requests=policy_requests,
                prm_requests=prm_requests, accuracy=correct / len(results),
                failed=sum(not r.ok for r in results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=50)
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--level", default=zoo.DEFAULT_LEVEL)
    ap.add_argument("--policy-url", help="a running OpenAI-compatible server for the policy (default: start vLLM)")
    ap.add_argument("--prm-url", help="a running OpenAI-compatible server for the PRM (default: start vLLM)")
    ap.add_argument("--max-concurrency", type=int, default=64, help="HTTP requests in flight per client")
    ap.add_argument("--vllm-args", default="", help="extra flags for the vLLM servers this script starts, "
                                                    "e.g. '--max-num-seqs 512'")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the vLLM servers (ExitStack) on kill, too
    if (args.policy_url is None) != (args.prm_url is None):
        ap.error("give both --policy-url and --prm-url, or neither")
    problems = arithmetic.eval_set(args.level)[: args.problems]

    with ExitStack() as stack:
        if args.policy_url:
            policy_url, prm_url, startup = args.policy_url, args.prm_url, None
        else:
            print(f"starting vLLM for {zoo.policy_path()} and {prm_dir()} ...", flush=True)
            t = time.perf_counter()
            policy_server, prm_server = stack.enter_context(start_vllms(zoo.policy_path(), prm_dir(), extra_args=args.vllm_args.split()))
            startup = time.perf_counter() - t
            policy_url, prm_url = policy_server.url, prm_server.url
            print(f"vLLM ready in {startup:.1f} s (policy {policy_server.ready_after:.1f} s, "
                  f"PRM {prm_server.ready_after:.1f} s, started together)")
        print(f"{len(problems)} '{args.level}' problems concurrently, N = {args.particles}, "
              f"temperature {SAMPLING.temperature}, policy {policy_url}, PRM {prm_url}")
        rows = {name: run_method(name, problems, args.particles, policy_url, prm_url, args.max_concurrency)
                for name in METHODS}

    print(f"\n{'':<20}{'wall s':>8}{'client CPU s':>14}{'policy s':>10}{'PRM s':>8}{'generated':>11}{'tokens/s':>10}"
          f"{'PRM tokens':>12}{'requests':>16}{'accuracy':>10}{'failed':>8}")
    for name, label in METHODS.items():
        r = rows[name]
        print(f"{label:<20}{r['wall']:>8.1f}{r['client_cpu']:>14.1f}{r['policy_s']:>10.1f}{r['prm_s']:>8.1f}{r['generated']:>11,}"
              f"{r['generated'] / r['wall']:>10,.0f}{r['prm_tokens']:>12,}"
              f"{r['policy_requests']:>8,}/{r['prm_requests']:<7,}{100 * r['accuracy']:>9.1f}%{r['failed']:>8}")
    if all(rows[name]["server"] for name in METHODS):
        print(f"\npolicy server (vLLM counters){'iterations':>14}{'prompt tokens':>16}{'prefix-cached':>15}"
              f"{'prefilled':>11}{'generated':>11}")
        for name, label in METHODS.items():
            c = rows[name]["server"]
            print(f"{label:<29}{c['engine_steps']:>14,.0f}{c['prompt']:>16,.0f}{c['prefix_hits']:>15,.0f}"
                  f"{c['prompt'] - c['prefix_hits']:>11,.0f}{c['generated']:>11,.0f}")
    pf, bon = rows["particle_filtering"], rows["best_of_n"]
    print("(requests: policy/PRM HTTP requests; policy s and PRM s: wall time during which a call to that "
          "backend was in flight; client CPU s: this process's CPU time, which the servers do not get)")
    print(f"\nPF / BoN wall time = {pf['wall'] / bon['wall']:.2f} (target ≤ 1.3); "
          f"generated tokens PF / BoN = {pf['generated'] / max(bon['generated'], 1):.2f}")
    if startup is not None:
        print(f"vLLM start-up (both servers, concurrently): {startup:.1f} s")


if __name__ == "__main__":
    main()
