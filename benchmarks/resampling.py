"""Time per call of each resampler, as the driver calls it (validation included).

Run: python benchmarks/resampling.py   (needs only numpy and itscale)

For each scheme and N, n = N offspring are drawn from random weights (half the
cases Dirichlet(1), half lognormal(σ=2), alternated over calls). Each repeat times
enough calls to last ≈ 20 ms; the table shows the median over repeats.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

try:
    from itscale.core.resampling import RESAMPLERS, SELECTORS
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from itscale.core.resampling import RESAMPLERS, SELECTORS

SIZES = (16, 256, 4096, 65536)
REPEATS = 7
TARGET_S = 20e-3  # wall time per repeat
SYSTEMATIC_TARGET_S = 5e-3  # at N = 65,536


def weight_vectors(size: int, rng: np.random.Generator) -> list[np.ndarray]:
    dirichlet = rng.dirichlet(np.ones(size))
    lognormal = rng.lognormal(sigma=2.0, size=size)
    return [dirichlet, lognormal / lognormal.sum()]


def seconds_per_call(resampler, size: int, rng: np.random.Generator) -> float:
    ws = weight_vectors(size, rng)
    calls = 1
    while True:  # calibrate: calls per repeat
        t0 = time.perf_counter()
        for k in range(calls):
            resampler(ws[k % 2], size, rng)
        elapsed = time.perf_counter() - t0
        if elapsed >= TARGET_S / 4 or calls >= 1 << 20:
            break
        calls *= 2
    calls = max(1, int(calls * TARGET_S / max(elapsed, 1e-9)))
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for k in range(calls):
            resampler(ws[k % 2], size, rng)
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def fmt(seconds: float) -> str:
    return f"{seconds * 1e6:9.1f} µs" if seconds < 1e-3 else f"{seconds * 1e3:9.2f} ms"


def main() -> None:
    rng = np.random.default_rng(20250101)
    schemes = {**RESAMPLERS, "top_k": SELECTORS["top_k"]}
    print(f"numpy {np.__version__}; time per call, n = N offspring, median of {REPEATS} repeats")
    print(f"{'scheme':<12}" + "".join(f"{f'N={size}':>14}" for size in SIZES))
    results = {}
    for name, resampler in schemes.items():
        row = [seconds_per_call(resampler, size, rng) for size in SIZES]
        results[name] = row
        print(f"{name:<12}" + "".join(f"{fmt(t):>14}" for t in row))
    t_sys = results["systematic"][SIZES.index(65536)]
    verdict = "meets" if t_sys < SYSTEMATIC_TARGET_S else "MISSES"
    print(
        f"systematic at N=65,536: {t_sys * 1e3:.2f} ms per call, "
        f"{verdict} the target of < {SYSTEMATIC_TARGET_S * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
