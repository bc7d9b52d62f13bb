"""Running ``itscale bench`` as a user does, for the reward-model tests."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path


def bench_metrics(folder: Path, config: str) -> dict[str, dict[str, str]]:
    """Write ``config`` (YAML, without ``output``) under ``folder``, run ``python -m itscale bench`` on it
    in a subprocess (it must succeed), and return its ``metrics.csv`` rows by method."""
    path = folder / "bench.yaml"
    path.write_text(config + f"output: {folder / 'out'}\n")
    done = subprocess.run([sys.executable, "-m", "itscale", "bench", str(path)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(folder / "out" / "metrics.csv") as f:
        return {r["method"]: r for r in csv.DictReader(f)}
