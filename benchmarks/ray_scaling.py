"""The same bench sweep on one machine, on one Ray worker and on two; then a projection of a
paper-sized study on a GPU cluster from the per-unit costs measured here.

    .venv/bin/python benchmarks/ray_scaling.py                      # 48 problems, ~5 minutes on 2 cores
    .venv/bin/python benchmarks/ray_scaling.py --problems 96 --budgets 4 8 16 32

Part 1 starts a Ray cluster on this machine (two one-CPU worker slots) and runs the sweep
(majority vote, best-of-N, beam search and particle filtering on the embedded pair) three times
into fresh stores: without Ray (``policy.threads`` 1, one process), on one Ray worker and on two.
It prints each run's wall time (the sweep itself, after the workers loaded their models, and in
all), the speed-up, and checks that the three stores hold the same answers.

Part 2 projects the wall time of a study the size of Puri et al.'s (models × methods × budgets
1–128 × seeds × 500 problems) on ``--nodes`` × ``--gpus`` GPUs. Measured here, per method: the
generated and PRM tokens per problem at each budget (fitted as linear in the budget and
extrapolated to 128), the driver's time per written unit, and the parallel efficiency of two
workers. Assumed (flags; the figures are not measurable without the GPUs): the length of a real
model's solution relative to the embedded policy's, and a GPU's decode throughput for the policy
under vLLM. It prints the GPU-hours, the wall time, and which of three limits binds first: the
GPUs' throughput, the driver (one process writes every record), or the longest single unit.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from itscale.bench.config import validate_config
from itscale.bench.run import run_bench

METHODS = [{"name": "self_consistency", "label": "majority_vote"}, {"name": "best_of_n", "params": {"aggregation": "min"}},
           {"name": "beam_search", "params": {"beam_width": 2, "aggregation": "min"}},
           {"name": "particle_filtering", "params": {"aggregation": "min"}}]


def config(problems: int, budgets: list[int], out: Path, workers: int | None, chunk: int):
    data = {"problems": {"source": "arithmetic:medium", "limit": problems}, "policy": {"threads": 1},
            "methods": METHODS, "budgets": budgets, "output": str(out)}
    if workers is not None:
        data["ray"] = {"workers": workers, "chunk": chunk}
    return validate_config(data)


def answers(folder: Path) -> dict:
    db = sqlite3.connect(folder / "bench.sqlite")
    try:
        return {r[:4]: r[4:] for r in db.execute("SELECT problem_id, method, budget, seed, answer, score FROM records")}
    finally:
        db.close()


def costs(folder: Path) -> dict[str, dict[int, tuple[float, float, float]]]:
    """(generated tokens, PRM tokens, wall seconds) per problem, by method and budget."""
    db = sqlite3.connect(folder / "bench.sqlite")
    try:
        rows = db.execute("SELECT method, budget, AVG(generated_tokens), AVG(prm_tokens), AVG(wall_time) "
                          "FROM records GROUP BY method, budget").fetchall()
    finally:
        db.close()
    out: dict[str, dict[int, tuple[float, float, float]]] = {}
    for method, budget, gen, prm, wall in rows:
        out.setdefault(method, {})[budget] = (gen, prm, wall or 0.0)
    return out


def part1(ns) -> tuple[dict, dict]:
    import os
    import secrets

    import ray

    # a token of this run's own: a new local cluster turns token authentication on, and would
    # otherwise write ~/.ray/auth_token, which every later `ray start` on this machine then requires
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             object_store_memory=200_000_000)
    quiet = Console(file=open("/dev/null", "w"))
    rows, stores = [], {}
    for label, workers in (("one machine, no Ray", None), ("Ray, 1 worker", 1), ("Ray, 2 workers", 2)):
        out = Path(tempfile.mkdtemp(prefix="ray-scaling-", dir=ns.output))
        t0 = time.perf_counter()
        outcome = run_bench(config(ns.problems, ns.budgets, out, workers, ns.chunk), console=quiet)
        total = time.perf_counter() - t0
        summary = outcome.ray
        sweep = summary.seconds if summary is not None else None
        rows.append((label, workers, sweep, total, summary))
        stores[label] = out
        print(f"  {label}: {total:.1f} s", file=sys.stderr)
    ray.shutdown()
    base = rows[1][2]
    print(f"\nPart 1: the same sweep ({ns.problems} problems; {', '.join(m.get('label', m['name']) for m in METHODS)}; "
          f"budgets {ns.budgets}; units of {ns.chunk} problems) on this machine ({_cpus()} CPU cores)\n")
    print(f"{'run':<22}{'sweep s':>10}{'all s':>10}{'speed-up':>10}{'units':>8}{'per node':>10}{'driver':>15}")
    for label, workers, sweep, total, summary in rows:
        speed = f"{base / sweep:.2f}x" if sweep else "—"
        units = summary.units if summary else "—"
        writes = f"{1000 * summary.driver / summary.units:.1f} ms/unit" if summary else "—"
        nodes = len(summary.by_node) if summary else "—"
        print(f"{label:<22}{(f'{sweep:.1f}' if sweep else '—'):>10}{total:>10.1f}{speed:>10}{units!s:>8}{nodes!s:>10}"
              f"{writes:>15}")
    ref = answers(stores["one machine, no Ray"])
    for label, out in stores.items():
        got = answers(out)
        same = sum(got.get(k, (None,))[0] == v[0] for k, v in ref.items())
        print(f"  {label}: {len(got)} records, {same} of {len(ref)} answers equal to one machine's")
    two = rows[2][4]
    efficiency = (rows[1][2] / rows[2][2]) / 2
    return {"costs": costs(stores["Ray, 2 workers"]), "efficiency": efficiency,
            "write_per_unit": two.driver / two.units, "chunk": ns.chunk}, stores


def _cpus() -> int:
    import os

    return os.cpu_count() or 1


def fit(by_budget: dict[int, tuple[float, float, float]], index: int) -> tuple[float, float]:
    """Least-squares ``a + b·budget`` of one cost column."""
    budgets = np.array(sorted(by_budget), dtype=float)
    values = np.array([by_budget[b][index] for b in sorted(by_budget)])
    if len(budgets) == 1:
        return 0.0, float(values[0] / budgets[0])
    b, a = np.polyfit(budgets, values, 1)
    return float(a), float(b)


def part2(measured: dict, ns) -> None:
    budgets = [2 ** k for k in range(8)]  # 1..128
    gpus = ns.nodes * ns.gpus
    scale = ns.solution_tokens / ns.embedded_solution_tokens
    total_gen = total_prm = 0.0
    longest = 0.0
    print(f"\nPart 2: projection. Study: {ns.models} models × {len(measured['costs'])} methods × budgets "
          f"{budgets[0]}–{budgets[-1]} ({len(budgets)}) × {ns.seeds} seeds × {ns.study_problems} problems on "
          f"{ns.nodes} nodes × {ns.gpus} GPUs\n")
    print(f"{'method':<20}{'gen tok/problem at 128':>24}{'PRM tok at 128':>16}{'(fit: a + b·budget)':>28}")
    for method, by in measured["costs"].items():
        ga, gb = fit(by, 0)
        pa, pb = fit(by, 1)
        gen = sum(max(ga + gb * b, 0.0) for b in budgets) * scale
        prm = sum(max(pa + pb * b, 0.0) for b in budgets) * scale
        if method == "majority_vote":  # the best-of-N family is one pool per problem at the largest budget
            gen = (ga + gb * budgets[-1]) * scale
        if method == "best_of_n":
            gen, prm = 0.0, (pa + pb * budgets[-1]) * scale  # its pool is majority vote's; it adds the scores
        total_gen += gen
        total_prm += prm
        g128 = (ga + gb * 128) * scale
        # a unit's problems decode together on one GPU: its time is its tokens at the GPU's rate, or
        # at least one solution at one sequence's speed
        longest = max(longest, measured["chunk"] * g128 / ns.gpu_tokens_per_s, ns.solution_tokens / ns.stream_tokens_per_s)
        print(f"{method:<20}{g128:>24,.0f}{(pa + pb * 128) * scale:>16,.0f}{f'{ga:.0f} + {gb:.1f}·b (gen)':>28}")
    work = ns.models * ns.seeds * ns.study_problems
    tokens = work * total_gen
    prm_tokens = work * total_prm
    # prefill of the PRM's tokens costs ~1/prefill_ratio of a decoded token
    gpu_seconds = (tokens + prm_tokens / ns.prefill_ratio) / ns.gpu_tokens_per_s
    wall_gpu = gpu_seconds / gpus / measured["efficiency"]
    pooled = {"majority_vote", "best_of_n"} & set(measured["costs"])
    phases = len(budgets) * (len(measured["costs"]) - len(pooled)) + (1 if pooled else 0)  # one pool per problem
    units = work * phases / measured["chunk"]
    wall_driver = units * measured["write_per_unit"]
    wall_tail = longest
    print(f"\ngenerated tokens {tokens:.3g}, PRM tokens {prm_tokens:.3g}; GPU time {gpu_seconds / 3600:,.0f} GPU-hours "
          f"at {ns.gpu_tokens_per_s:,.0f} decoded tokens/s per GPU")
    print(f"wall time, GPUs' throughput: {wall_gpu / 3600:,.1f} h (÷ {gpus} GPUs, efficiency "
          f"{measured['efficiency']:.2f} measured with two workers here)")
    print(f"wall time, driver: {wall_driver / 3600:,.2f} h ({units:,.0f} units × "
          f"{1000 * measured['write_per_unit']:.1f} ms of the driver's time each (ray.get and the store), measured)")
    print(f"longest unit: {wall_tail / 60:,.1f} min (a unit of {measured['chunk']} problems at budget 128 on one GPU)")
    limits = {"the GPUs' throughput": wall_gpu, "the driver": wall_driver, "the longest unit": wall_tail}
    first = max(limits, key=limits.get)
    print(f"first limit: {first}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", type=int, default=48)
    p.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--chunk", type=int, default=8, help="problems per Ray unit")
    p.add_argument("--output", default=tempfile.gettempdir(), help="where the three stores go")
    g = p.add_argument_group("projection (assumed, not measured here)")
    g.add_argument("--nodes", type=int, default=8)
    g.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    g.add_argument("--models", type=int, default=4)
    g.add_argument("--seeds", type=int, default=3)
    g.add_argument("--study-problems", type=int, default=500)
    g.add_argument("--solution-tokens", type=float, default=400.0,
                   help="a real model's whole solution (MATH-500 with a 1.5B-8B instruct model: ~300-600)")
    g.add_argument("--embedded-solution-tokens", type=float, default=49.5,
                   help="the embedded policy's (measured in the scaling study)")
    g.add_argument("--gpu-tokens-per-s", type=float, default=5000.0,
                   help="decoded tokens/s per GPU for the policy under vLLM at large batch (a 1.5B-7B model on "
                        "an H100: several thousand)")
    g.add_argument("--stream-tokens-per-s", type=float, default=60.0, help="decoded tokens/s of one sequence")
    g.add_argument("--prefill-ratio", type=float, default=10.0, help="decoded tokens' cost / a prefilled token's")
    ns = p.parse_args()
    measured, _ = part1(ns)
    part2(measured, ns)


if __name__ == "__main__":
    main()
