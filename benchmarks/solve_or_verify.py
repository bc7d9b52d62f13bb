"""When to solve, when to verify (2025): at a fixed compute budget, more solutions under a
majority vote, or fewer solutions checked by a verifier?

Reads the ``metrics.csv`` of ``itscale bench`` runs and, for each budget N of the solving
method (majority vote over N samples: cost ≈ N·cost(solution)), finds the verifying
method's best accuracy at no more cost (S solutions each scored by a PRM or an LLM judge:
cost ≈ S·(cost(solution) + cost(verification))). Cost is FLOPs (2 × parameters × tokens,
policy and verifier; ``--cost flops``, the default) or tokens (generated + read by the
verifier; ``--cost tokens``). No interpolation: a verifying budget counts only if it costs no
more than the vote it is compared with.

    .venv/bin/python benchmarks/solve_or_verify.py runs/scaling
    .venv/bin/python benchmarks/solve_or_verify.py runs/real_llm/hf-none runs/real_llm/hf-judge \\
        --verify best_of_n
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def read(folders: list[Path]) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for folder in folders:
        with (folder / "metrics.csv").open() as f:
            for r in csv.DictReader(f):
                rows.setdefault(r["method"], []).append({
                    "budget": int(r["budget"]), "accuracy": float(r["accuracy"]),
                    "flops": float(r["flops"]) if r["flops"] else float("nan"),
                    "tokens": float(r["generated_tokens"]) + float(r["prm_tokens"])})
    for method in rows:
        rows[method].sort(key=lambda r: r["budget"])
    return rows


def best_within(points: list[dict], cost: float, key: str) -> dict | None:
    """The most accurate point whose cost is ≤ ``cost`` (None if every point costs more)."""
    affordable = [p for p in points if p[key] <= cost * (1 + 1e-9)]
    return max(affordable, key=lambda p: p["accuracy"]) if affordable else None


def compare(rows: dict[str, list[dict]], solve: str, verify: list[str], key: str) -> list[str]:
    missing = [m for m in [solve, *verify] if m not in rows]
    if missing:
        raise SystemExit(f"no rows for {missing}; methods present: {sorted(rows)}")
    head = f"{'N':>4} {key:>10} {solve:>14} " + " ".join(f"{m:>26}" for m in verify) + "  winner"
    out = [head]
    wins = {m: 0 for m in [solve, *verify]}
    for p in rows[solve]:
        cells, best = [], (solve, p["accuracy"])
        for m in verify:
            q = best_within(rows[m], p[key], key)
            if q is None:
                cells.append(f"{'(costs more)':>26}")
                continue
            cells.append(f"{q['accuracy']:>12.1%} (S={q['budget']:>3}, {q[key] / p[key]:>4.2f}×)")
            if q["accuracy"] > best[1]:
                best = (m, q["accuracy"])
        wins[best[0]] += 1
        out.append(f"{p['budget']:>4} {p[key]:>10.3g} {p['accuracy']:>14.1%} " + " ".join(cells) + f"  {best[0]}")
    out.append("wins: " + ", ".join(f"{m} {n}" for m, n in wins.items()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="bench output folders (their metrics.csv)")
    parser.add_argument("--solve", default="majority_vote", help="the method that only solves (default: majority_vote)")
    parser.add_argument("--verify", nargs="+", default=["best_of_n", "weighted_best_of_n"],
                        help="methods that verify their solutions (default: best_of_n weighted_best_of_n)")
    parser.add_argument("--cost", choices=("flops", "tokens"), default="flops")
    args = parser.parse_args()
    print("\n".join(compare(read(args.folders), args.solve, args.verify, args.cost)))


if __name__ == "__main__":
    main()
