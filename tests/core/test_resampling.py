"""Resampler properties: unbiased offspring, count bounds, zero weights, CSMC law.

Every statistical test runs with a fixed seed and is paired with a deliberately
broken variant that it must reject, so that the test can fail. Observed
statistics go to the ``report_statistic`` fixture (tests/conftest.py: a table at
the end of the run) and into the assertion messages.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from itscale.core.resampling import (
    RESAMPLERS,
    SELECTORS,
    Resampler,
    conditional_ancestors,
    get_resampler,
    multinomial,
    offspring_counts,
    systematic,
    tempered,
    top_k,
)
from itscale.core.weights import check_weights, normalize

Z_MAX = 4.5  # ~520 per-particle z-tests below: two-sided P(|z| > 4.5) = 6.8e-6 each
P_MIN = 1e-3  # goodness of fit of a correct scheme
P_BROKEN = 1e-6  # a broken variant must be rejected at least this strongly

ALL_SPECS = [*RESAMPLERS, *SELECTORS, "tempered:0.5", "tempered:2:systematic"]


# ---------------------------------------------------------------------------
# Helpers


def max_offspring_z(resample_fn, weights, n: int, reps: int, rng: np.random.Generator) -> float:
    """max_i |z_i|, z_i = (mean O_i − n·W_i) / sqrt(s_i² / reps) over ``reps`` calls.

    s_i² is the sample variance of O_i, floored at f_i(1 − f_i) with f_i = frac(n·W_i):
    the smallest variance any integer-valued count with mean n·W_i can have, so the
    floor never inflates z beyond what the true variance would give. A count with
    zero variance at an integral mean gives z = 0 if it hits the mean, else ∞.
    """
    w = np.asarray(weights, dtype=np.float64)
    counts = np.stack([offspring_counts(resample_fn(w, n, rng), w.size) for _ in range(reps)])
    expected = n * w
    f = expected - np.floor(expected)
    var = np.maximum(counts.var(axis=0, ddof=1), f * (1.0 - f))
    diff = counts.mean(axis=0) - expected
    with np.errstate(divide="ignore", invalid="ignore"):
        exact = np.where(np.abs(diff) < 1e-9, 0.0, np.inf)
        z = np.where(var > 0, diff / np.sqrt(var / reps), exact)
    return float(np.max(np.abs(z)))


def _case_weights() -> dict[str, tuple[np.ndarray, int]]:
    rng = np.random.default_rng(1234)
    d10 = rng.dirichlet(np.ones(10))
    zeros = rng.dirichlet(np.ones(12))
    zeros[[0, 4, 11]] = 0.0  # leading, interior and trailing zeros
    dominant = np.concatenate([[0.9], 0.1 * rng.dirichlet(np.ones(7))])
    heavy = rng.lognormal(sigma=1.5, size=50)
    return {
        "dirichlet N=n=10": (d10, 10),
        "dirichlet N=10 n=7": (d10, 7),
        "dirichlet N=6 n=23": (rng.dirichlet(np.ones(6)), 23),
        "zeros N=n=12": (zeros / zeros.sum(), 12),
        "dominant N=n=8": (dominant, 8),
        "lognormal N=n=50": (heavy / heavy.sum(), 50),
        "uniform N=n=8": (np.full(8, 1 / 8), 8),
    }


CASES = _case_weights()


def _squared_multinomial(weights, n, rng):
    """Broken: multinomial from W² / ΣW² instead of W."""
    w2 = np.asarray(weights) ** 2
    return multinomial(w2 / w2.sum(), n, rng)


def _rounding(weights, n, rng):
    """Broken: deterministic 'systematic' with V = 1/2 (counts ≈ round(n·W))."""
    return systematic(weights, n, _ConstantRng(0.5))


class _ConstantRng:
    """Adversarial stand-in for a Generator: every uniform equals ``value``."""

    def __init__(self, value: float):
        self.value = value

    def random(self, size=None):
        return self.value if size is None else np.full(size, self.value)


def _verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def _rejected(ok: bool) -> str:
    return "rejected" if ok else "NOT REJECTED"


def _chisquare(observed: np.ndarray, probs: np.ndarray) -> float:
    observed = np.asarray(observed, dtype=np.float64)
    return float(stats.chisquare(observed, observed.sum() * probs).pvalue)


# ---------------------------------------------------------------------------
# Unbiasedness: E[O_i] = n·W_i


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(RESAMPLERS))
def test_offspring_mean_is_n_w(name, case, report_statistic):
    weights, n = CASES[case]
    rng = np.random.default_rng(7)
    z = max_offspring_z(RESAMPLERS[name], weights, n, reps=3000, rng=rng)
    report_statistic("correct", "max |z| offspring", z, _verdict(z < Z_MAX))
    assert z < Z_MAX, f"{name} on {case}: max |z| = {z:.2f} >= {Z_MAX}"


@pytest.mark.parametrize("broken", [_squared_multinomial, _rounding], ids=["W^2", "round"])
@pytest.mark.parametrize("case", ["dirichlet N=n=10", "dominant N=n=8"])
def test_offspring_mean_rejects_broken_scheme(broken, case, report_statistic):
    weights, n = CASES[case]
    z = max_offspring_z(broken, weights, n, reps=3000, rng=np.random.default_rng(7))
    report_statistic("broken", "max |z| offspring", z, _rejected(z > 4 * Z_MAX))
    assert z > 4 * Z_MAX, f"broken {broken.__name__} on {case} not rejected: max |z| = {z:.2f}"


def test_every_registered_resampler_is_unbiased_and_every_selector_is_not():
    assert all(r.unbiased for r in RESAMPLERS.values())
    assert not any(r.unbiased for r in SELECTORS.values())
    assert set(RESAMPLERS) == {"multinomial", "stratified", "systematic", "residual", "ssp"}
    assert set(SELECTORS) == {"top_k", "argmax"}


# ---------------------------------------------------------------------------
# Count bounds per scheme


def _random_draws(scheme: str, trials: int = 300):
    """(n·W, counts) for random weights of several shapes and n ≠ N."""
    rng = np.random.default_rng(11)
    for t in range(trials):
        size = int(rng.integers(1, 40))
        w = rng.dirichlet(np.full(size, [0.2, 1.0, 5.0][t % 3]))
        w[rng.random(size) < 0.2] = 0.0
        if w.sum() == 0:
            w[0] = 1.0
        w /= w.sum()
        n = int([size, max(1, size // 2), 3 * size + 1][t % 3])
        yield n * w, offspring_counts(RESAMPLERS[scheme](w, n, rng), size)


@pytest.mark.parametrize("scheme", ["systematic", "ssp"])
def test_counts_are_floor_or_ceil(scheme):
    for expected, counts in _random_draws(scheme):
        assert np.all(counts >= np.floor(expected - 1e-9)), (expected, counts)
        assert np.all(counts <= np.ceil(expected + 1e-9)), (expected, counts)


def test_stratified_counts_within_two():
    worst = max(np.max(np.abs(c - e)) for e, c in _random_draws("stratified"))
    assert worst < 2, f"max |O - nW| = {worst}"


def test_residual_keeps_the_floor():
    for expected, counts in _random_draws("residual"):
        assert np.all(counts >= np.floor(expected + 1e-9)), (expected, counts)
        assert np.all(counts[expected == 0] == 0)


def test_multinomial_keeps_draw_order():
    rng = np.random.default_rng(5)
    w = rng.dirichlet(np.ones(10))
    draws = [RESAMPLERS["multinomial"](w, 10, rng) for _ in range(20)]
    assert any(np.any(np.diff(a) < 0) for a in draws), "multinomial output looks sorted"


def test_ssp_counts_are_negatively_associated_and_systematic_may_not_be(report_statistic):
    """Cov(O_i, O_j) ≤ 0 for i ≠ j under SSP; systematic has +0.24 on this example."""
    w = np.array([0.08, 0.32, 0.4, 0.08, 0.12])

    def max_offdiag_cov(scheme):
        rng = np.random.default_rng(3)
        resample = RESAMPLERS[scheme]
        x = np.stack([offspring_counts(resample(w, w.size, rng), w.size) for _ in range(20000)])
        cov = np.cov(x.T)
        return float(cov[~np.eye(w.size, dtype=bool)].max())

    tol = 0.01  # ≈ 8 standard errors of a covariance estimate here
    ssp_cov = max_offdiag_cov("ssp")
    sys_cov = max_offdiag_cov("systematic")
    report_statistic("correct", "max Cov(O_i,O_j)", ssp_cov, _verdict(ssp_cov <= tol))
    report_statistic("broken", "max Cov(O_i,O_j)", sys_cov, _rejected(sys_cov > 10 * tol))
    assert ssp_cov <= tol, f"ssp max off-diagonal Cov = {ssp_cov:.4f}"
    assert sys_cov > 10 * tol, f"systematic max off-diagonal Cov = {sys_cov:.4f}"


# ---------------------------------------------------------------------------
# Edge cases, every scheme and selector

ROUNDOFF_WEIGHTS = [
    [0.5, 0.5 - 1e-17, 0.0, 0.0],
    [0.1] * 10 + [0.0, 0.0],  # cumulative sum ends at 0.9999999999999999
    [0.0] + [0.05] * 10 + [0.0] + [0.05] * 10 + [0.0, 0.0],  # ends at 1.0000000000000002
    [0.0, 0.0, 0.3, 0.0, 0.7, 0.0],
    [0.0, 1e-300, 0.0, 1.0, 0.0],
    [1 / 3, 0.0, 1 / 3, 0.0, 1 / 3, 0.0],
    list(normalize([-np.inf, 0.0, -1.0, -np.inf, 2.0, -np.inf])),
]


def test_roundoff_weights_cover_both_directions():
    ends = [np.cumsum(w)[np.flatnonzero(np.array(w) > 0)[-1]] for w in ROUNDOFF_WEIGHTS]
    assert min(ends) < 1.0 < max(ends)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_one_particle(spec):
    r = get_resampler(spec)
    rng = np.random.default_rng(0)
    for n in (1, 3):
        out = r([1.0], n, rng)
        assert out.dtype == np.int64 and out.tolist() == [0] * n


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_all_mass_on_one_particle(spec):
    r = get_resampler(spec)
    rng = np.random.default_rng(0)
    for k in (0, 2, 4):
        w = np.zeros(5)
        w[k] = 1.0
        for n in (5, 7, 2):
            assert r(w, n, rng).tolist() == [k] * n


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("weights", ROUNDOFF_WEIGHTS, ids=range(len(ROUNDOFF_WEIGHTS)))
def test_zero_weights_never_chosen(spec, weights):
    r = get_resampler(spec)
    w = np.array(weights)
    size = w.size
    rng = np.random.default_rng(9)
    for n in (size, 2 * size + 1, 2):
        seen = np.concatenate([r(w, n, rng) for _ in range(300)])
        assert seen.dtype == np.int64
        assert np.all(w[seen] > 0), f"{spec} chose a zero weight: {np.unique(seen)}"
        # extreme uniforms (0 and the largest double below 1) for every draw
        for u in (0.0, float(np.nextafter(1.0, 0.0))):
            out = np.asarray(r.fn(check_weights(w), n, _ConstantRng(u)))
            assert out.shape == (n,) and np.all((out >= 0) & (out < size)), (spec, u, out)
            assert np.all(w[out] > 0), f"{spec} with u={u} chose a zero weight: {out}"


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_output_shape_dtype_and_range(spec):
    r = get_resampler(spec)
    rng = np.random.default_rng(2)
    for size, n in [(10, 10), (10, 3), (4, 17), (1000, 64)]:
        out = r(rng.dirichlet(np.ones(size)), n, rng)
        assert out.dtype == np.int64 and out.shape == (n,)
        assert out.min() >= 0 and out.max() < size


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_invalid_input_raises(spec):
    r = get_resampler(spec)
    rng = np.random.default_rng(0)
    for bad in ([-0.1, 1.1], [np.nan, 1.0], [np.inf, 0.0], [0.5, 0.4], [0.0, 0.0], []):
        with pytest.raises(ValueError):
            r(bad, 2, rng)
    for bad_n in (0, -1, 2.5, True, "3", None):
        with pytest.raises(ValueError, match=r"\bn\b"):
            r([0.5, 0.5], bad_n, rng)
    with pytest.raises(TypeError, match="rng"):
        r([0.5, 0.5], 2, np.random.RandomState(0))
    assert r([0.5, 0.5], np.int64(3), rng).shape == (3,)


# ---------------------------------------------------------------------------
# Conditional SMC: conditional_ancestors

CSMC_W = np.array([0.1, 0.2, 0.3, 0.4])
CSMC_REF_SLOT, CSMC_REF_ANCESTOR = 2, 0
CSMC_REPS = 20000


def _overwrite_slot(weights, ref_slot, ref_ancestor, rng):
    """Broken: systematic N draws, then overwrite the reference slot."""
    out = systematic(weights, len(weights), rng)
    out[ref_slot] = ref_ancestor
    return out


def _csmc_draws(fn) -> np.ndarray:
    rng = np.random.default_rng(17)
    return np.stack([fn(CSMC_W, CSMC_REF_SLOT, CSMC_REF_ANCESTOR, rng) for _ in range(CSMC_REPS)])


def _csmc_pvalues(draws: np.ndarray) -> dict[str, float]:
    """Chi-square p-values: slot 0 marginal, slots (1, 3) joint, pooled non-ref slots vs W."""
    size = CSMC_W.size
    joint = offspring_counts(draws[:, 1] * size + draws[:, 3], size * size)
    others = np.delete(draws, CSMC_REF_SLOT, axis=1).reshape(-1)
    return {
        "marginal slot 0": _chisquare(offspring_counts(draws[:, 0], size), CSMC_W),
        "joint slots 1,3": _chisquare(joint, np.outer(CSMC_W, CSMC_W).reshape(-1)),
        "pooled non-ref": _chisquare(offspring_counts(others, size), CSMC_W),
    }


def test_conditional_ancestors_law(report_statistic):
    draws = _csmc_draws(conditional_ancestors)
    assert draws.dtype == np.int64
    assert np.all(draws[:, CSMC_REF_SLOT] == CSMC_REF_ANCESTOR)
    pvalues = _csmc_pvalues(draws)
    for what, p in pvalues.items():
        report_statistic("correct", f"p {what}", p, _verdict(p > P_MIN))
    assert min(pvalues.values()) > P_MIN, pvalues


def test_conditional_ancestors_rejects_overwrite_slot(report_statistic):
    draws = _csmc_draws(_overwrite_slot)
    pvalues = _csmc_pvalues(draws)
    for what, p in pvalues.items():
        report_statistic("broken", f"p {what}", p, _rejected(p < P_BROKEN))
    assert pvalues["marginal slot 0"] < P_BROKEN, pvalues
    assert pvalues["joint slots 1,3"] < P_BROKEN, pvalues


def test_conditional_ancestors_edge_cases():
    rng = np.random.default_rng(0)
    assert conditional_ancestors([1.0], 0, 0, rng).tolist() == [0]
    # the reference may carry zero weight; nobody else may pick it
    w = np.array([0.0, 0.5, 0.5])
    for _ in range(200):
        out = conditional_ancestors(w, 1, 0, rng)
        assert out[1] == 0 and np.all(np.delete(out, 1) > 0)
    for slot, anc in [(-1, 0), (3, 0), (0, -1), (0, 3), (0.0, 0), (True, 0)]:
        with pytest.raises(ValueError, match="ref_"):
            conditional_ancestors(w, slot, anc, rng)
    with pytest.raises(ValueError):
        conditional_ancestors([0.5, 0.6], 0, 0, rng)


# ---------------------------------------------------------------------------
# Selectors, tempering and the registry


def test_top_k_matches_brute_force_sort():
    rng = np.random.default_rng(21)
    for _ in range(200):
        size = int(rng.integers(1, 30))
        w = rng.integers(0, 4, size).astype(np.float64)  # many ties and zeros
        if w.sum() == 0:
            w[-1] = 1.0
        w /= w.sum()
        n = int(rng.integers(1, 2 * size + 3))
        positive = sorted((i for i in range(size) if w[i] > 0), key=lambda i: (-w[i], i))
        expected = [positive[m % len(positive)] for m in range(n)]
        assert SELECTORS["top_k"](w, n, rng).tolist() == expected


def test_top_k_ignores_rng_and_argmax_takes_lowest_tied_index():
    w = np.array([0.1, 0.3, 0.05, 0.3, 0.25, 0.0])
    assert top_k(w, 4, None).tolist() == [1, 3, 4, 0]
    assert SELECTORS["argmax"](w, 3, np.random.default_rng(0)).tolist() == [1, 1, 1]


@pytest.mark.parametrize("base", list(RESAMPLERS))
def test_tempered_flags_and_temperature_one_matches_base(base, report_statistic):
    t = tempered(1.0, base)
    assert t.unbiased is False and t.name == f"tempered(1,{base})"
    weights, n = CASES["dirichlet N=n=10"]
    z = max_offspring_z(t, weights, n, reps=2000, rng=np.random.default_rng(6))
    report_statistic("correct", "max |z| offspring", z, _verdict(z < Z_MAX))
    assert z < Z_MAX, f"tempered(1,{base}): max |z| = {z:.2f}"
    if base == "multinomial":  # same uniforms, same draws (W^1 differs from W by ulps)
        rng = np.random.default_rng(4)
        for _ in range(20):
            w = rng.dirichlet(np.ones(9))
            seed = int(rng.integers(2**32))
            a = t(w, 9, np.random.default_rng(seed))
            assert a.tolist() == multinomial(w, 9, np.random.default_rng(seed)).tolist()


def test_tempered_half_samples_w_squared(report_statistic):
    w = np.array([0.1, 0.2, 0.3, 0.4, 0.0])
    rng = np.random.default_rng(8)
    draws = np.concatenate([tempered(0.5)(w, 50, rng) for _ in range(400)])
    target = w**2 / (w**2).sum()
    counts = offspring_counts(draws, w.size)
    assert counts[-1] == 0
    p_target, p_untempered = _chisquare(counts[:-1], target[:-1]), _chisquare(counts[:-1], w[:-1])
    report_statistic("correct", "p vs W^2", p_target, _verdict(p_target > P_MIN))
    report_statistic("broken", "p vs W", p_untempered, _rejected(p_untempered < P_BROKEN))
    assert p_target > P_MIN
    assert p_untempered < P_BROKEN  # the untempered law is rejected


def test_tempered_extremes_and_errors():
    w = np.array([0.2, 0.4, 0.4, 0.0])
    rng = np.random.default_rng(0)
    assert set(tempered(1e-300)(w, 200, rng).tolist()) == {1, 2}  # T → 0: the tied maxima
    for bad in (0, -1.0, np.nan, np.inf, "1", True):
        with pytest.raises(ValueError, match="temperature"):
            tempered(bad)
    with pytest.raises(ValueError, match="base"):
        tempered(0.5, "top_k")


def test_get_resampler():
    assert get_resampler("ssp") is RESAMPLERS["ssp"]
    assert get_resampler("argmax") is SELECTORS["argmax"]
    custom = Resampler("mine", multinomial, unbiased=True)
    assert get_resampler(custom) is custom
    t = get_resampler("tempered:0.5:systematic")
    assert t.name == "tempered(0.5,systematic)" and not t.unbiased
    assert get_resampler("tempered:2").name == "tempered(2,multinomial)"
    for bad in ("nope", "tempered", "tempered:x", "tempered:-1", "tempered:1:argmax", 3):
        with pytest.raises(ValueError) as info:
            get_resampler(bad)
        if bad in ("nope", "tempered", 3):
            for name in [*RESAMPLERS, *SELECTORS, "tempered:T"]:
                assert name in str(info.value)


def test_offspring_counts():
    assert offspring_counts([2, 0, 2, 2], 4).tolist() == [1, 0, 3, 0]
    assert offspring_counts([], 3).tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        offspring_counts([0, 4], 4)
