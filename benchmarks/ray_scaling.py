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
import os
import secrets
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console

# A token of this run's own, set before Ray is imported (it reads the mode once): a new local
# cluster turns token authentication on and would otherwise write ~/.ray/auth_token, which every
# later `ray start` on this machine would then require.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

from itscale.bench.config import validate_config  # noqa: E402
from itscale.bench.run import run_bench  # noqa: E402

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


def part1(ns) -> dict:
    import ray

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
            "write_per_unit": two.driver / two.units}


def _cpus() -> int:
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
    """GPU time of every unit of the study: its tokens at the rate its concurrency allows,
    rate = min(a GPU's throughput, sequences in flight × one sequence's speed), where a worker has
    DEPTH units in flight, each decoding chunk × budget sequences at once (a pool: 128 per problem)."""
    from itscale.bench.ray_sweep import DEPTH

    budgets = [2 ** k for k in range(8)]  # 1..128
    gpus = ns.nodes * ns.gpus
    scale = ns.solution_tokens / ns.embedded_solution_tokens
    runs = ns.models * ns.seeds  # each (model, seed) is one pass over the problems
    units_per_phase = -(-ns.study_problems // ns.study_chunk)
    print(f"\nPart 2: projection. Study: {ns.models} models × {len(measured['costs'])} methods × budgets "
          f"{budgets[0]}–{budgets[-1]} × {ns.seeds} seeds × {ns.study_problems} problems on {ns.nodes} nodes × "
          f"{ns.gpus} GPUs, units of {ns.study_chunk} problems. Measured here: tokens per problem (fitted linear in "
          f"the budget), the driver's time per unit, two workers' efficiency. Assumed: a real solution is "
          f"{ns.solution_tokens:.0f} tokens ({scale:.1f}× the embedded policy's), a GPU decodes "
          f"{ns.gpu_tokens_per_s:,.0f} tokens/s at full batch and one sequence {ns.stream_tokens_per_s:.0f}/s, a "
          f"PRM token costs 1/{ns.prefill_ratio:.0f} of a decoded one, a worker loads a model in "
          f"{ns.load_minutes:g} min.\n")
    fits = {m: (fit(by, 0), fit(by, 1)) for m, by in measured["costs"].items()}
    work = []  # (method, budget, tokens of one unit in decode-equivalents, sequences in flight per GPU)
    for method, ((ga, gb), (pa, pb)) in fits.items():
        pooled = method in ("majority_vote", "best_of_n")
        takes = [b for b in budgets if b >= 2] if method in ("beam_search", "dvts") else budgets  # beam width 2
        for b in ([budgets[-1]] if pooled else takes):
            gen = 0.0 if method == "best_of_n" else max(ga + gb * b, 0.0) * scale  # best-of-N scores majority vote's pool
            prm = max(pa + pb * b, 0.0) * scale
            work.append((method, b, ns.study_chunk * (gen + prm / ns.prefill_ratio), ns.study_chunk * b * DEPTH))
    print(f"{'method':<20}{'budget':>7}{'tokens/unit':>13}{'in flight':>11}{'tok/s per GPU':>15}{'GPU-hours':>11}")
    gpu_s = ideal_s = longest = 0.0
    for method, b, tokens, flight in work:
        rate = min(ns.gpu_tokens_per_s, flight * ns.stream_tokens_per_s)
        seconds = runs * units_per_phase * tokens / rate
        gpu_s += seconds
        ideal_s += runs * units_per_phase * tokens / ns.gpu_tokens_per_s
        longest = max(longest, tokens / rate)
        if b in (2, 8, 128):
            print(f"{method:<20}{b:>7}{tokens:>13,.0f}{flight:>11,}{rate:>15,.0f}{seconds / 3600:>11,.1f}")
    units = runs * units_per_phase * len(work)
    wall_gpu = gpu_s / gpus / measured["efficiency"]
    wall_driver = units * measured["write_per_unit"]
    wall_load = ns.models * ns.load_minutes * 60  # one bench run per model; each loads its model once per worker
    print(f"\nGPU time {gpu_s / 3600:,.0f} GPU-hours ({ideal_s / 3600:,.0f} if every unit filled its GPU); "
          f"{units:,} units")
    print(f"wall time on {gpus} GPUs: {(wall_gpu + wall_load) / 3600:,.1f} h = GPUs {wall_gpu / 3600:,.1f} h "
          f"(÷ {gpus}, ÷ efficiency {measured['efficiency']:.2f}) + model loading {wall_load / 60:.0f} min")
    print(f"the driver's share: {wall_driver / 60:,.1f} min ({units:,} units × "
          f"{1000 * measured['write_per_unit']:.1f} ms each for ray.get and the store), in parallel with the GPUs")
    print(f"longest unit: {longest / 60:,.1f} min (the tail after the last unit starts)")
    limits = {"the GPUs' decode throughput": wall_gpu - (gpu_s - ideal_s) / gpus / measured["efficiency"],
              "units too small to fill a GPU": (gpu_s - ideal_s) / gpus / measured["efficiency"],
              "model loading": wall_load, "the driver": wall_driver, "the longest unit": longest}
    print("what the wall time is made of: " + ", ".join(f"{k} {v / 3600:.2f} h" for k, v in
                                                        sorted(limits.items(), key=lambda kv: -kv[1])))


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
    g.add_argument("--study-chunk", type=int, default=16, help="problems per unit in the study")
    g.add_argument("--load-minutes", type=float, default=2.0, help="a worker loading a 7B model from local disk")
    ns = p.parse_args()
    measured = part1(ns)
    part2(measured, ns)


if __name__ == "__main__":
    main()
