"""Head-to-head: itscale against its_hub (PyPI ``its-hub``) on identical work.

    .venv/bin/python benchmarks/vs_its_hub.py [--problems 50] [--budgets 1 2 4 8 16 32]
        [--methods particle_filtering beam_search self_consistency] [--level medium]
        [--seed 0] [--repeats 1] [--beam-width 4] [--max-concurrency 64]
        [--vllm-args FLAGS] [--output results.json] [--policy-url URL --prm-url URL]

its_hub lives in its own virtual environment, ``.venv-itshub`` (created here on first
use: ``python -m venv`` + ``pip install its-hub[lm]==1.2.0``; a stamp file skips it
afterwards), and runs in a worker process (``benchmarks/its_hub_side.py``) that this
driver feeds over JSON lines. Without URLs two vLLM servers (CPU, from ``.venv-vllm``,
which ``make test`` creates) serve the embedded policy and PRM, started with
``tests/servers.py`` as in ``benchmarks/http_backend.py``; with ``--policy-url`` /
``--prm-url`` running servers are used.

For every method × budget each library solves the same N held-out arithmetic problems,
all N concurrently, and the table shows accuracy (95% Wilson interval), wall time per
problem, generated tokens per problem, the requests each sent, and the ratios.

What is the same on both sides (the fairness choices)
-----------------------------------------------------
- **Server and model.** One vLLM server for the policy and one for the PRM, used by
  one library at a time. Before every timed run both servers' prefix caches are reset
  (``POST /reset_prefix_cache``; the servers started here run with
  ``VLLM_SERVER_DEV_MODE=1`` for it), so no run reuses another's prefill; each
  library's clients make one untimed warm-up request first.
- **Prompt text.** itscale applies the chat template client-side and continues the
  exact text on ``/v1/completions``; its_hub sends ``/v1/chat/completions`` with the
  steps so far as an assistant message and vLLM's ``continue_final_message``. The
  embedded chat template keeps the message verbatim, so the server sees the same
  tokens (checked at start-up: equal ``usage.prompt_tokens``).
- **Steps and stop rules.** Step delimiter ``"\\n"`` (``arithmetic.STEP_FORMAT``) as the
  stop string; a solution finishes at the answer marker ``"Answer:"`` or after
  ``max_steps`` = 10 steps (its_hub counts one more step than its ``max_steps``, so it
  gets 9); at most ``--max-step-tokens`` (24) tokens per step; temperature 0.8 and
  top-p 1 (its_hub leaves top-p at the server default, which is 1: the model has no
  sampling defaults). Whole solutions (self-consistency) may use max_step_tokens ×
  max_steps tokens on both sides. its_hub ignores end-of-sequence when deciding
  that a particle is finished; the embedded policy ends with an ``Answer:`` line, so
  this only matters for the rare solution that stops without one.
- **PRM scores.** its_hub's ``AbstractProcessRewardModel`` is answered by this driver
  with itscale's own ``RemoteTagPRM`` (a fresh client per run, same server, same
  ``--max-concurrency``): its_hub's response text is cut back into steps at the
  delimiter, scored step by step, and aggregated with ``last`` — itscale's default for
  particle filtering and beam search. Identical scores by construction; the extra
  hop (a pipe to this process) is the only cost its_hub pays that itscale does not.
- **Methods**, each library's own implementation with its defaults where the other
  has no counterpart. Particle filtering: its_hub's ``ParticleFiltering`` (resample
  every round with multinomial resampling, weights softmax(logit(score)), answer: the
  particle with the highest final score) against itscale's ``particle_filtering``
  defaults (``EveryStep`` log-odds at T = 1, i.e. the same weights, resampling every
  round, systematic, answer: the solution with the largest total weight, copies
  merged). One difference in the algorithms themselves remains: its_hub keeps
  re-weighting a finished particle by its final score at every later round, whereas
  itscale's finished particles weigh 1 (increment 0) after they finish. Beam search: itscale's ``beam_width`` M is the number of
  children per beam (N/M beams kept); its_hub's ``beam_width`` is the number of beams
  kept, so it gets N/M (both expand N candidates per round, except that its_hub starts
  from M candidates and grows to N over its first rounds); M is ``--beam-width`` or the largest divisor of the budget
  below it. Self-consistency: its_hub's ``SelfConsistency`` voting on itscale's answer
  key (``answer_key(extract_answer(text))``).
- **Concurrency.** All problems run at once on both sides: itscale through
  ``run_many`` (its HTTP backends decide how a round's requests travel; the table's
  request columns show what they sent), its_hub as ``asyncio.gather`` over ``ainfer``
  (its algorithms send every particle of one prompt at once, one chat request each;
  it has no cross-prompt batching API). its_hub's HTTP client has no cap on requests in
  flight; its ``LMOrchestrator`` (self-consistency) would cap them at 32 by default and
  is given no cap here. itscale's clients keep at most ``--max-concurrency`` requests
  in flight.
- **Server flags.** ``--vllm-args`` go to both servers, which serve both libraries alike.
- **itscale's client** aligns its step requests to the policy server's KV blocks
  (``OpenAIGenerator(kv_block=--kv-block)``, look-ahead: a particle's request runs to the
  next block boundary and the text after its step serves its next round; ``--kv-block 0``
  sends plain step requests that stop at the delimiter, as its_hub does).
- **Seeds.** Run r of ``--repeats`` uses seed ``--seed`` + r on both sides: itscale's
  per-problem random streams; its_hub's global ``random`` / ``numpy.random`` generators,
  seeded in its worker. Sampling on the server is unseeded for its_hub (its client has
  no seed field) and for itscale's merged prompt-list requests (which carry none).
- **Accounting.** Generated and prompt tokens and request counts come from the
  servers' own ``/metrics`` counters (deltas over each run), the same accounting for
  both libraries; wall time is measured around the whole concurrent batch (inside the
  worker for its_hub, so its process start and imports are not counted). Answers are
  graded by the bench grader (``Grader``: ``extract_answer`` then equivalence) on the
  final text each library chose.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import json
import math
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the vLLM launcher of the integration tests

from http_backend import SAMPLING, backends, parse_counters, root_of, warm_up  # noqa: E402  (benchmarks/ is on sys.path)
from servers import BLOCK_SIZE, VLLM_VENV, prm_dir, start_vllms, vllm_missing_message  # noqa: E402

from itscale import zoo  # noqa: E402
from itscale.backends import served_model  # noqa: E402
from itscale.bench.grading import Grader  # noqa: E402
from itscale.bench.problems import load_problems  # noqa: E402
from itscale.rewards.aggregate import aggregate  # noqa: E402
from itscale.stats import wilson  # noqa: E402
from itscale.strategies import make_strategy, run_many  # noqa: E402
from itscale.tasks import arithmetic  # noqa: E402
from itscale.types import Problem, SamplingParams, ScoreRequest  # noqa: E402

ITS_HUB_VERSION = "1.2.0"
ITS_HUB_VENV = ROOT / ".venv-itshub"
ITS_HUB_STAMP_NAME = f".installed-its-hub-{ITS_HUB_VERSION}"
WORKER = Path(__file__).resolve().parent / "its_hub_side.py"
METHODS = ("particle_filtering", "beam_search", "self_consistency")
LIBRARIES = ("itscale", "its_hub")
AGGREGATION = "last"  # itscale's default for particle filtering and beam search


# -- set-up ----------------------------------------------------------------------------

def ensure_its_hub(venv: Path) -> Path:
    """The its_hub interpreter; creates ``venv`` with its-hub[lm] unless its stamp file exists."""
    python, stamp = venv / "bin" / "python", venv / ITS_HUB_STAMP_NAME
    if stamp.exists() and python.exists():
        return python
    print(f"installing its-hub[lm]=={ITS_HUB_VERSION} into {venv} (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"its-hub[lm]=={ITS_HUB_VERSION}"], check=True)
    subprocess.run([str(python), "-c", "import its_hub, aiohttp"], check=True)
    stamp.touch()
    return python


def beam_widths(budget: int, width: int) -> tuple[int, int]:
    """(itscale's children per beam M, its_hub's beams kept N/M): M is the largest divisor of
    the budget that is at most ``width``."""
    m = max(d for d in range(1, min(width, budget) + 1) if budget % d == 0)
    return m, budget // m


@dataclass
class Settings:
    problems: list[Problem]
    budgets: list[int]
    methods: list[str]
    seed: int
    repeats: int
    beam_width: int
    max_concurrency: int
    sampling: SamplingParams
    policy_url: str
    prm_url: str
    its_hub_python: Path
    resampler: str
    log_dir: Path
    server_pgids: dict[str, int] | None = None
    kv_block: int | None = None


# -- server counters -------------------------------------------------------------------

async def counters(client, url: str) -> dict[str, float]:
    """The server's token and request counters, and HTTP requests by endpoint."""
    return parse_counters((await client.get(root_of(url) + "/metrics")).text)


async def settled(client, url: str) -> dict[str, float]:
    """Counters once they stop moving (the server updates them just after answering)."""
    last = await counters(client, url)
    while True:
        await asyncio.sleep(0.5)
        now = await counters(client, url)
        if now == last:
            return now
        last = now


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU time of the live processes of a process group (Linux ``/proc``)."""
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on
        if int(fields[2]) == pgid:  # field 5: process group
            ticks += int(fields[11]) + int(fields[12])  # fields 14, 15: utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


class Servers:
    """Counter snapshots and prefix-cache resets for the policy and PRM servers, and their CPU
    time when they were started here (``pgids``: each server's process group)."""

    def __init__(self, policy_url: str, prm_url: str, pgids: dict[str, int] | None = None):
        import httpx

        self.urls = {"policy": policy_url, "prm": prm_url}
        self.pgids = pgids or {}
        self.client = httpx.AsyncClient(timeout=30.0)
        self.reset_ok: bool | None = None

    async def snapshot(self) -> dict[str, dict[str, float]]:
        out = {k: await settled(self.client, u) for k, u in self.urls.items()}
        for k, pgid in self.pgids.items():
            out[k]["cpu_s"] = group_cpu_seconds(pgid)
        return out

    async def reset_prefix_caches(self) -> None:
        if self.reset_ok is False:
            return
        for url in self.urls.values():
            reply = await self.client.post(root_of(url) + "/reset_prefix_cache")
            if reply.status_code != 200:
                self.reset_ok = False
                print(f"note: {root_of(url)}/reset_prefix_cache answered {reply.status_code}: runs may reuse "
                      "each other's prefix cache (start vLLM with VLLM_SERVER_DEV_MODE=1 to allow resets)")
                return
        self.reset_ok = True

    async def before_run(self) -> dict[str, dict[str, float]]:
        await self.settle_and_reset()
        return await self.snapshot()

    async def settle_and_reset(self) -> None:
        await self.snapshot()
        await self.reset_prefix_caches()

    async def since(self, before: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        after = await self.snapshot()
        return {k: delta(after[k], before[k]) for k in after}

    async def aclose(self) -> None:
        await self.client.aclose()


# -- one run per library -----------------------------------------------------------------

@dataclass
class Run:
    library: str
    method: str
    budget: int
    wall: float
    texts: dict[str, str]
    errors: dict[str, str]
    server: dict[str, dict[str, float]]
    seed: int = 0
    params: dict = field(default_factory=dict)
    client_cpu: float = 0.0  # CPU seconds of the library's own process(es) during the timed run
    correct: int = 0


def itscale_params(method: str, budget: int, s: Settings) -> dict:
    if method == "beam_search":
        return {"beam_width": beam_widths(budget, s.beam_width)[0]}
    if method == "particle_filtering":
        return {"resampler": s.resampler}
    return {}


async def run_itscale(method: str, budget: int, seed: int, s: Settings, servers: Servers) -> Run:
    """itscale's ``run_many`` over all problems at once (as ``benchmarks/http_backend.py``)."""
    policy, prm = backends(s.policy_url, s.prm_url, s.max_concurrency, s.kv_block)
    params = itscale_params(method, budget, s)
    strategy = make_strategy(method, policy, prm, format=arithmetic.STEP_FORMAT, sampling=s.sampling, **params)
    try:
        await warm_up(policy, prm)
        before = await servers.before_run()
        start, cpu = time.perf_counter(), time.process_time()
        results = await run_many(strategy, s.problems, budget, seed=seed)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        server = await servers.since(before)
    finally:
        await policy.inner.aclose()
        await prm.inner.aclose()
    texts = {r.problem.id: r.solution or "" for r in results}
    errors = {r.problem.id: f"{r.status}: {r.message}" for r in results if not r.ok}
    return Run("itscale", method, budget, wall, texts, errors, server, seed, params, cpu)


def its_hub_job(method: str, budget: int, seed: int, s: Settings) -> dict:
    fmt = arithmetic.STEP_FORMAT
    return {
        "method": method, "budget": budget, "seed": seed,
        "problems": [{"id": p.id, "prompt": p.prompt} for p in s.problems],
        "policy_url": s.policy_url, "model": served_model(s.policy_url, None, "policy"),
        "temperature": s.sampling.temperature, "max_step_tokens": s.sampling.max_step_tokens,
        "max_full_tokens": s.sampling.max_step_tokens * fmt.max_steps,
        "max_steps": fmt.max_steps, "delimiter": fmt.delimiter, "stop_token": fmt.answer_markers[0],
        "its_hub_beam_width": beam_widths(budget, s.beam_width)[1],
        "sc_max_concurrency": -1, "max_tries": 3,
    }


def its_hub_steps(response: str, delimiter: str) -> tuple[str, ...]:
    """its_hub's steps back from its response text (the steps joined by the delimiter).

    Every step gets its delimiter back, as itscale's steps carry it (the PRM strips it
    again, so the scored text is the same either way); that keeps a step's prefix-cache
    key the same from one round to the next, when its_hub's newest step (sent without a
    delimiter) has become an inner one. Empty steps are kept, so the count is its_hub's."""
    return tuple(part + delimiter for part in response.split(delimiter))


async def run_its_hub(method: str, budget: int, seed: int, s: Settings, servers: Servers) -> Run:
    """its_hub's algorithm in its worker; its PRM requests are answered with itscale's PRM."""
    _, prm = backends(s.policy_url, s.prm_url, s.max_concurrency)
    prm = prm.inner
    delimiter = arithmetic.STEP_FORMAT.delimiter
    job = its_hub_job(method, budget, seed, s)
    log = (s.log_dir / f"its_hub-{method}-{budget}-seed{seed}.log").open("wb")
    worker = await asyncio.create_subprocess_exec(
        str(s.its_hub_python), str(WORKER), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=log, limit=1 << 26, cwd=ROOT)
    tasks: set[asyncio.Task] = set()

    def reply(message: dict) -> None:
        worker.stdin.write((json.dumps(message) + "\n").encode())

    async def score(message: dict) -> None:
        problem = Problem("its_hub", message["prompt"])
        requests = [ScoreRequest(problem, its_hub_steps(r, delimiter)) for r in message["responses"]]
        out = await prm.score_steps(requests)
        values = [aggregate(o.scores, AGGREGATION) for o in out]
        reply({"id": message["id"], "scores": [None if math.isnan(v) else v for v in values]})

    try:
        await prm.check()
        reply(job)
        before = None
        while True:
            line = await worker.stdout.readline()
            if not line:
                await worker.wait()
                raise RuntimeError(f"its_hub worker exited with status {worker.returncode}; log {log.name}")
            message = json.loads(line)
            kind = message.get("type")
            if kind == "score":
                if before is None:  # the warm-up's PRM round trip
                    await score(message)
                    continue
                task = asyncio.create_task(score(message))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif kind == "ready":
                before = await servers.before_run()
                prm.clear_cache()  # forget the warm-up's scores
                cpu = time.process_time()
                reply({"id": message["id"], "scores": []})
            elif kind == "result":
                adapter_cpu = time.process_time() - cpu  # this process answering its_hub's PRM calls
                break
            elif kind == "failed":
                raise RuntimeError(f"its_hub worker failed:\n{message['error']}")
        server = await servers.since(before)
    finally:
        for task in tasks:
            task.cancel()
        if worker.returncode is None:
            worker.stdin.close()
            try:
                await asyncio.wait_for(worker.wait(), 10)
            except asyncio.TimeoutError:
                worker.kill()
                await worker.wait()
        log.close()
        await prm.aclose()
    texts = {r["id"]: r["text"] for r in message["results"]}
    errors = {r["id"]: r["error"] for r in message["results"] if r["error"]}
    return Run("its_hub", method, budget, message["wall"], texts, errors, server, seed,
               {"its_hub_beam_width": job["its_hub_beam_width"]} if method == "beam_search" else {},
               message["cpu"] + adapter_cpu)


async def check_same_prompt(s: Settings) -> None:
    """Fail unless its_hub's chat continuation and itscale's completion prompt are the same
    tokens on this server (the premise of the comparison; see the module docstring)."""
    import httpx

    policy, prm = backends(s.policy_url, s.prm_url, 1, kv_block=None)  # the plain generator: it has context_text
    gen = policy.inner
    problem, prefix = s.problems[0], "1+1=2" + arithmetic.DELIMITER
    base = s.policy_url.rstrip("/")
    try:
        async with httpx.AsyncClient(timeout=60.0) as client:
            chat = await client.post(base + "/chat/completions", json={
                "model": gen.model, "max_completion_tokens": 1,
                "messages": [{"role": "user", "content": problem.prompt}, {"role": "assistant", "content": prefix}],
                "add_generation_prompt": False, "continue_final_message": True})
            completion = await client.post(base + "/completions", json={
                "model": gen.model, "max_tokens": 1, "prompt": gen.context_text(problem.prompt, prefix),
                "add_special_tokens": False})
        chat.raise_for_status()
        completion.raise_for_status()
        a, b = chat.json()["usage"]["prompt_tokens"], completion.json()["usage"]["prompt_tokens"]
    finally:
        await gen.aclose()
        await prm.inner.aclose()
    if a != b:
        raise SystemExit(f"its_hub's chat prompt has {a} tokens, itscale's completion prompt {b}: the server's "
                         "chat template does not continue the assistant message verbatim; the comparison "
                         "would not be like for like")


# -- the comparison ----------------------------------------------------------------------

def grade(run: Run, problems: list[Problem], grader: Grader) -> None:
    run.correct = sum(grader.grade(grader.extract(run.texts.get(p.id, "")), p.answer) for p in problems)


async def compare(s: Settings, on_row) -> list[Run]:
    """Every method × budget, ``s.repeats`` times (seed, seed + 1, ...) per library; the order
    of the two libraries alternates from one run to the next (ABBA...), so that neither
    always runs first or after the other, on a machine whose load may drift."""
    servers = Servers(s.policy_url, s.prm_url, s.server_pgids)
    runs: list[Run] = []
    try:
        await check_same_prompt(s)
        with Grader() as grader:
            i = 0
            for method in s.methods:
                for budget in s.budgets:
                    group: dict[str, list[Run]] = {library: [] for library in LIBRARIES}
                    for repeat in range(s.repeats):
                        for library in (LIBRARIES if i % 2 == 0 else LIBRARIES[::-1]):
                            runner = run_itscale if library == "itscale" else run_its_hub
                            run = await runner(method, budget, s.seed + repeat, s, servers)
                            grade(run, s.problems, grader)
                            group[library].append(run)
                            runs.append(run)
                        i += 1
                    on_row(group, len(s.problems))
    finally:
        await servers.aclose()
    return runs


def _http(counters: dict[str, float]) -> dict[str, int]:
    """HTTP requests by endpoint (``completions``, ``chat/completions``)."""
    return {k[len("http /v1/"):]: int(v) for k, v in counters.items() if k.startswith("http ")}


def summary(runs: list[Run], problems: int) -> dict:
    """One library's row: accuracy pooled over the repeats (n = problems × repeats), the
    median wall time, and the other costs averaged over the repeats, per problem."""
    n = problems * len(runs)
    first = runs[0]
    correct = sum(r.correct for r in runs)
    lo, hi = wilson(correct / n, n)

    def total(server: str, key: str) -> float:  # summed over the repeats
        return sum(r.server.get(server, {}).get(key, 0.0) for r in runs)

    has_cpu = any("cpu_s" in r.server.get(k, {}) for r in runs for k in ("policy", "prm"))
    policy_http: dict[str, int] = {}
    prm_http: dict[str, int] = {}
    for r in runs:
        for k, v in _http(r.server.get("policy", {})).items():
            policy_http[k] = policy_http.get(k, 0) + v
        for k, v in _http(r.server.get("prm", {})).items():
            prm_http[k] = prm_http.get(k, 0) + v
    walls = sorted(r.wall for r in runs)
    wall = walls[len(walls) // 2] if len(walls) % 2 else sum(walls[len(walls) // 2 - 1:len(walls) // 2 + 1]) / 2
    return {
        "library": first.library, "method": first.method, "budget": first.budget, "problems": problems,
        "repeats": len(runs), "seeds": [r.seed for r in runs], "n": n, "correct": correct,
        "accuracy": correct / n, "ci95": [lo, hi], "errors": sum(len(r.errors) for r in runs),
        "wall_s": wall, "wall_s_runs": [r.wall for r in runs], "wall_s_per_problem": wall / problems,
        "client_cpu_s_per_problem": sum(r.client_cpu for r in runs) / n,
        "server_cpu_s_per_problem": (total("policy", "cpu_s") + total("prm", "cpu_s")) / n if has_cpu else None,
        "generated_tokens_per_problem": total("policy", "generated") / n,
        "prompt_tokens_per_problem": total("policy", "prompt") / n,
        "prefilled_tokens_per_problem": (total("policy", "prompt") - total("policy", "cached")) / n,
        "policy_http_requests_per_problem": sum(policy_http.values()) / n,
        "policy_endpoints": policy_http,
        "policy_sequences_per_problem": total("policy", "sequences") / n,
        "policy_engine_steps_per_run": total("policy", "engine_steps") / len(runs),
        "policy_queue_s_per_sequence": total("policy", "queue_s") / max(total("policy", "requests"), 1.0),
        "prm_http_requests_per_problem": sum(prm_http.values()) / n,
        "prm_prompts_per_problem": total("prm", "requests") / n,
        "prm_prompt_tokens_per_problem": total("prm", "prompt") / n,
        "prm_engine_steps_per_run": total("prm", "engine_steps") / len(runs),
        "params": first.params, "error_examples": {k: v for r in runs for k, v in list(r.errors.items())[:3]},
        "server_counters": [r.server for r in runs],
    }


ENDPOINT_NAMES = {"completions": "compl", "chat/completions": "chat"}


def print_table(rows: list[dict], console) -> None:
    from rich import box
    from rich.table import Table

    repeats = rows[0]["repeats"] if rows else 1
    table = Table(box=box.SIMPLE_HEAD, caption=(
        "per problem, all problems concurrently on each side"
        + (f"; {repeats} runs each: accuracy pooled, median wall time, costs averaged" if repeats > 1 else "")
        + "; tokens, requests and forward passes from the vLLM servers' /metrics; errors count as wrong"))
    for header in ("method", "N", "library", "accuracy [95% CI]", "wall s", "CPU s\nclient+vLLM", "generated\ntokens",
                   "prefilled\ntokens", "policy HTTP\nrequests", "sequences", "policy fwd\npasses/run",
                   "PRM prompts\n(HTTP reqs)", "errors", "its_hub wall\n/ itscale", "Δ accuracy\nitscale−its_hub"):
        table.add_column(header, justify="left" if header in ("method", "library") else "right", no_wrap=True)
    for i in range(0, len(rows), 2):
        a, b = rows[i], rows[i + 1]  # itscale, its_hub
        for r in (a, b):
            lo, hi = r["ci95"]
            mine = r is a
            endpoints = "+".join(ENDPOINT_NAMES.get(k, k) for k in r["policy_endpoints"])
            server_cpu = r["server_cpu_s_per_problem"]
            table.add_row(
                r["method"] if mine else "", str(r["budget"]) if mine else "", r["library"],
                f"{100 * r['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]",
                f"{r['wall_s_per_problem']:.3f}",
                f"{r['client_cpu_s_per_problem']:.3f}+" + ("?" if server_cpu is None else f"{server_cpu:.3f}"),
                f"{r['generated_tokens_per_problem']:.0f}", f"{r['prefilled_tokens_per_problem']:.0f}",
                f"{r['policy_http_requests_per_problem']:.1f} {endpoints}",
                f"{r['policy_sequences_per_problem']:.0f}", f"{r['policy_engine_steps_per_run']:.0f}",
                f"{r['prm_prompts_per_problem']:.0f} ({r['prm_http_requests_per_problem']:.1f})", str(r["errors"]),
                f"{b['wall_s'] / a['wall_s']:.2f}×" if mine else "",
                f"{100 * (a['accuracy'] - b['accuracy']):+.1f} pp" if mine else "",
                end_section=not mine)
    console.print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=50, help="held-out problems, all run concurrently (default 50)")
    ap.add_argument("--level", default=zoo.DEFAULT_LEVEL, choices=sorted(arithmetic.LEVELS))
    ap.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per library and method × budget (seeds seed, seed+1, ...; accuracy pooled, "
                         "median wall time); the libraries alternate which goes first")
    ap.add_argument("--beam-width", type=int, default=4,
                    help="itscale's children per beam M (its_hub keeps budget/M beams); reduced to a divisor")
    ap.add_argument("--temperature", type=float, default=SAMPLING.temperature)
    ap.add_argument("--max-step-tokens", type=int, default=SAMPLING.max_step_tokens)
    ap.add_argument("--max-concurrency", type=int, default=64, help="itscale's HTTP requests in flight per client")
    ap.add_argument("--resampler", default="systematic", help="itscale's particle-filtering resampler")
    ap.add_argument("--kv-block", type=int, default=BLOCK_SIZE,
                    help=f"the policy server's KV block size, for itscale's block-aligned look-ahead (default "
                         f"{BLOCK_SIZE}, as the servers started here; 0: off)")
    ap.add_argument("--vllm-args", default="", help="extra flags for the vLLM servers this script starts (both "
                    "libraries use them), e.g. '--max-num-seqs 1024'")
    ap.add_argument("--policy-url", help="a running OpenAI-compatible server for the policy (default: start vLLM)")
    ap.add_argument("--prm-url", help="a running OpenAI-compatible server for the PRM (default: start vLLM)")
    ap.add_argument("--its-hub-venv", type=Path, default=ITS_HUB_VENV)
    ap.add_argument("--output", type=Path, help="write every result (and the settings) as JSON here")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the vLLM servers (ExitStack) on kill, too
    if (args.policy_url is None) != (args.prm_url is None):
        ap.error("give both --policy-url and --prm-url, or neither")
    if any(b < 1 for b in args.budgets):
        ap.error("budgets must be positive")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    from rich.console import Console

    console = Console(width=max(Console().width, 200))  # the table is wide: never squeeze its columns
    its_hub_python = ensure_its_hub(args.its_hub_venv)
    problems = list(load_problems(f"arithmetic:{args.level}", limit=args.problems))
    sampling = SamplingParams(temperature=args.temperature, max_step_tokens=args.max_step_tokens)
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"vs_its_hub-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def on_row(group: dict[str, list[Run]], n: int) -> None:
        new = [summary(group[lib], n) for lib in LIBRARIES]
        rows.extend(new)
        a, b = new
        console.print(f"{a['method']:>18} N={a['budget']:<3} itscale {100 * a['accuracy']:5.1f}% "
                      f"{a['wall_s']:7.1f} s | its_hub {100 * b['accuracy']:5.1f}% {b['wall_s']:7.1f} s | "
                      f"its_hub/itscale wall {b['wall_s'] / a['wall_s']:.2f}×")

    with ExitStack() as stack:
        if args.policy_url:
            policy_url, prm_url, startup = args.policy_url, args.prm_url, None
        else:
            if not (VLLM_VENV / "bin" / "python").exists():
                raise SystemExit(vllm_missing_message())
            os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # for POST /reset_prefix_cache between runs
            console.print(f"starting vLLM for {zoo.policy_path()} and {prm_dir()} ...")
            t = time.perf_counter()
            policy_server, prm_server = stack.enter_context(
                start_vllms(zoo.policy_path(), prm_dir(), extra_args=args.vllm_args.split()))
            startup = time.perf_counter() - t
            policy_url, prm_url = policy_server.url, prm_server.url
            pgids = {"policy": policy_server.process.pid, "prm": prm_server.process.pid}  # session leaders
            console.print(f"vLLM ready in {startup:.1f} s")
        settings = Settings(problems, args.budgets, args.methods, args.seed, args.repeats, args.beam_width,
                            args.max_concurrency,
                            sampling, policy_url, prm_url, its_hub_python, args.resampler, log_dir,
                            None if args.policy_url else pgids, args.kv_block or None)
        console.print(f"{len(problems)} '{args.level}' problems, all concurrently; budgets {args.budgets}; "
                      f"methods {args.methods}; temperature {sampling.temperature}, max {sampling.max_step_tokens} "
                      f"tokens/step, max {arithmetic.STEP_FORMAT.max_steps} steps; policy {policy_url}, PRM {prm_url}; "
                      f"its_hub worker logs in {log_dir}")
        t = time.perf_counter()
        asyncio.run(compare(settings, on_row))
        total = time.perf_counter() - t

    print_table(rows, console)
    console.print(f"total {total:.0f} s" + (f" (+ vLLM start-up {startup:.0f} s)" if startup else ""))
    if args.output:
        settings_out = {"problems": [p.id for p in problems], "level": args.level, "budgets": args.budgets,
                        "methods": args.methods, "seed": args.seed, "repeats": args.repeats,
                        "beam_width": args.beam_width,
                        "max_concurrency": args.max_concurrency, "resampler": args.resampler,
                        "sampling": asdict(sampling), "step_format": asdict(arithmetic.STEP_FORMAT),
                        "aggregation": AGGREGATION, "policy_url": policy_url, "prm_url": prm_url,
                        "vllm_args": args.vllm_args, "kv_block": args.kv_block,
                        "its_hub_version": ITS_HUB_VERSION, "vllm_startup_s": startup, "total_s": total}
        args.output.write_text(json.dumps({"settings": settings_out, "rows": rows}, indent=1, default=str))
        console.print(f"results written to {args.output}")


if __name__ == "__main__":
    main()
