"""The scaling study's answer: how much less budget particle filtering needs than sampling.

Reads the ``metrics.csv`` of an ``itscale bench`` run (default: ``runs/scaling``, written by
``itscale bench benchmarks/configs/scaling.yaml``) and prints

1. accuracy per method (rows) and budget (columns);
2. Puri et al. (2025)'s comparison: the best accuracy that best-of-N, weighted best-of-N or
   majority vote reach at their largest budget, and the smallest particle-filtering budget
   whose accuracy reaches it (and the smallest whose 95% interval does), with the ratio of
   the two budgets (the "scaling rate").

    .venv/bin/python benchmarks/scaling_rate.py [runs/scaling]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

SAMPLING = ("best_of_n", "weighted_best_of_n", "majority_vote")
PARTICLES = "particle_filtering"


def read(folder: Path) -> dict[str, dict[int, dict]]:
    rows: dict[str, dict[int, dict]] = {}
    with (folder / "metrics.csv").open() as f:
        for r in csv.DictReader(f):
            rows.setdefault(r["method"], {})[int(r["budget"])] = {
                "accuracy": float(r["accuracy"]), "ci_low": float(r["ci_low"]), "ci_high": float(r["ci_high"]),
                "n": int(r["n"])}
    return rows


def table(rows: dict[str, dict[int, dict]]) -> list[str]:
    budgets = sorted({b for by in rows.values() for b in by})
    width = max(len(m) for m in rows)
    out = [f"{'method':<{width}}  " + "".join(f"{b:>7}" for b in budgets)]
    for method, by in rows.items():
        cells = "".join(f"{by[b]['accuracy']:>7.1%}" if b in by else f"{'':>7}" for b in budgets)
        out.append(f"{method:<{width}}  {cells}")
    return out


def scaling_rate(rows: dict[str, dict[int, dict]]) -> list[str]:
    refs = {m: rows[m][max(rows[m])] | {"budget": max(rows[m])} for m in SAMPLING if m in rows}
    if not refs or PARTICLES not in rows:
        raise SystemExit(f"metrics need {PARTICLES} and one of {', '.join(SAMPLING)}")
    best_method, best = max(refs.items(), key=lambda kv: kv[1]["accuracy"])
    out = [f"{m} at {r['budget']}: {r['accuracy']:.1%} [{r['ci_low']:.1%}, {r['ci_high']:.1%}]" for m, r in refs.items()]
    pf = rows[PARTICLES]
    reach = [b for b in sorted(pf) if pf[b]["accuracy"] >= best["accuracy"]]
    within = [b for b in sorted(pf) if pf[b]["ci_high"] >= best["accuracy"]]
    target = f"{best['accuracy']:.1%} ({best_method} at {best['budget']})"
    if reach:
        b = reach[0]
        out.append(f"smallest particle-filtering budget reaching {target}: {b} "
                   f"({pf[b]['accuracy']:.1%}); scaling rate {best['budget'] / b:.0f}x")
    else:
        top = max(pf, key=lambda b: pf[b]["accuracy"])
        out.append(f"particle filtering never reaches {target}; its best is {pf[top]['accuracy']:.1%} at {top} "
                   f"({best['accuracy'] - pf[top]['accuracy']:.1%} short)")
    if within:
        out.append(f"smallest particle-filtering budget whose 95% interval reaches it: {within[0]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default="runs/scaling", help="an itscale bench output folder")
    folder = Path(ap.parse_args().folder)
    rows = read(folder)
    print("\n".join(table(rows)))
    print()
    print("\n".join(scaling_rate(rows)))


if __name__ == "__main__":
    main()
