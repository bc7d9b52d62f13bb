"""Resampling: normalised weights W (length N) in, n ancestor indices out.

Unbiased schemes satisfy E[O_i] = n·W_i for the offspring counts
O_i = #{m : A_m = i}. They differ in how the n uniforms u_m ∈ [0, 1) are laid out
before inversion of the cumulative weights C_i = W_1 + … + W_i
(A_m = min{i : C_i > u_m}):

    multinomial   u_m i.i.d. U[0, 1)                        (unsorted: draw order kept)
    stratified    u_m = (m + V_m)/n,  V_m i.i.d. U[0, 1)    |O_i − n·W_i| < 2
    systematic    u_m = (m + V)/n,    one V ~ U[0, 1)       O_i ∈ {⌊nW_i⌋, ⌈nW_i⌉}
    residual      ⌊nW_i⌋ copies + multinomial on the fractional parts
    ssp           Srinivasan sampling process on the fractional parts:
                  O_i ∈ {⌊nW_i⌋, ⌈nW_i⌉} and (O_i) negatively associated

Zero weights are never selected. The cumulative sum is rescaled so that it equals
exactly 1 from the last positive weight on, every u is < 1, and the inversion uses
the strict inequality C_i > u; a zero weight has C_i = C_{i−1} and so can never be
the first index with C_i > u. Counting schemes (residual, ssp) only ever add
offspring to particles whose expected count n·W_i is positive.

Biased selectors (``unbiased=False``: beam search, best-of-N, weight temperature)
use the same calling convention; a driver using one reports ``log_z=None`` and
``exact=False``.

Every function takes an explicit ``numpy.random.Generator`` and only calls its
``random`` method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from itscale.core.weights import NEG_INF, check_weights, normalize

ResampleFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

# Largest float64 below 1: every uniform is clipped to it, since (m + V)/n can
# round up to exactly 1.0 for large n.
_BELOW_ONE = float(np.nextafter(1.0, 0.0))


# ---------------------------------------------------------------------------
# Building blocks


def _cdf(w: np.ndarray) -> np.ndarray:
    """C_i = Σ_{j≤i} w_j / Σ_j w_j, set to exactly 1 from the last positive w_j on.

    ``w`` is non-negative with at least one positive entry (it need not sum to 1).
    Division by a positive constant keeps C non-decreasing, and a zero w_i keeps
    C_i = C_{i−1} exactly.
    """
    c = np.cumsum(w, dtype=np.float64)
    last = int(np.flatnonzero(w > 0)[-1])
    c /= c[last]
    c[last:] = 1.0
    return c


def _invert(c: np.ndarray, u: np.ndarray) -> np.ndarray:
    """A_m = min{i : C_i > u_m} for u_m ∈ [0, 1): never a zero-weight index."""
    return np.searchsorted(c, np.minimum(u, _BELOW_ONE), side="right").astype(np.int64)


def _expected_counts(weights: np.ndarray, n: int) -> np.ndarray:
    """n·W_i in float64, with W renormalised to sum to 1 within round-off."""
    w = np.asarray(weights, dtype=np.float64)
    return w * (n / w.sum())


# ---------------------------------------------------------------------------
# Unbiased schemes


def multinomial(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n i.i.d. draws A_m ~ Categorical(W), returned in draw order (not sorted).

    Conditional SMC relies on the draws being exchangeable and unsorted.
    """
    return _invert(_cdf(np.asarray(weights, dtype=np.float64)), rng.random(n))


def stratified(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Stratified resampling: u_m = (m + V_m)/n, V_m i.i.d. U[0, 1); |O_i − n·W_i| < 2."""
    u = (np.arange(n, dtype=np.float64) + rng.random(n)) / n
    return _invert(_cdf(np.asarray(weights, dtype=np.float64)), u)


def systematic(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Systematic resampling: u_m = (m + V)/n with a single V ~ U[0, 1).

    O_i ∈ {⌊nW_i⌋, ⌈nW_i⌉} (up to round-off in C); the variance of estimates is not
    guaranteed to be below multinomial's in general.
    """
    u = (np.arange(n, dtype=np.float64) + rng.random()) / n
    return _invert(_cdf(np.asarray(weights, dtype=np.float64)), u)


def residual(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Residual resampling: O_i = ⌊nW_i⌋ + R_i, (R_i) ~ Multinomial(R, r/R).

    Here r_i = nW_i − ⌊nW_i⌋ and R = n − Σ_i ⌊nW_i⌋ = Σ_i r_i, so O_i ≥ ⌊nW_i⌋.
    The deterministic copies come first, then the R multinomial draws.
    """
    x = _expected_counts(weights, n)
    base = np.floor(x)
    r = x - base
    base = base.astype(np.int64)
    rest = n - int(base.sum())
    kept = np.repeat(np.arange(x.size, dtype=np.int64), base)
    if rest <= 0:
        return kept[:n]
    if not np.any(r > 0):  # only by round-off: all n·W_i integral but Σ < n
        r = x
    return np.concatenate([kept, multinomial(r, rest, rng)])


def ssp(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """SSP resampling (Srinivasan sampling process; Gerber, Chopin & Whiteley 2019).

    Start from x_i = n·W_i. Walk over the K particles with fractional part
    f_i = x_i − ⌊x_i⌋ > 0 in index order, pairing the one still fractional ("the
    carry", fraction a) with the next one (fraction b):

        a + b < 1:  (a, b) → (a + b, 0)  w.p. a/(a + b),      else (0, a + b)
        a + b ≥ 1:  (a, b) → (1, a + b − 1) w.p. (1−b)/(2−a−b), else (a + b − 1, 1)

    Each move keeps E[a], E[b] and fixes one of the two at an integer. Hence
    O_i ∈ {⌊nW_i⌋, ⌈nW_i⌉}, E[O_i] = nW_i and the counts are negatively associated.

    The carry's *value* is deterministic: before step k it is a_k = frac(S_{k−1})
    with S_k = f_1 + … + f_k, and step k fixes a unit exactly when ⌊S_k⌋ > ⌊S_{k−1}⌋.
    Only *who* holds the carry is random (it moves to particle k with probability
    b/(a+b), resp. (1−b)/(2−a−b)), so the K − 1 coin flips are vectorised.
    """
    x = _expected_counts(weights, n)
    counts = np.floor(x)
    f = x - counts
    counts = counts.astype(np.int64)
    frac_idx = np.flatnonzero(f > 0)
    rest = n - int(counts.sum())  # = Σ f_i up to round-off
    if frac_idx.size == 0 or rest <= 0:
        return np.repeat(np.arange(x.size, dtype=np.int64), counts)

    s = np.cumsum(f[frac_idx])
    floor_s = np.floor(s)
    a = s[:-1] - floor_s[:-1]  # carry value before steps k = 1..K−1
    b = f[frac_idx[1:]]
    cross = floor_s[1:] > floor_s[:-1]  # a + b ≥ 1: a unit is fixed at step k
    p_move = np.where(cross, (1.0 - b) / (2.0 - a - b), b / (a + b))
    move = rng.random(b.size) < p_move

    pos = np.arange(1, frac_idx.size)
    holder_after = np.maximum.accumulate(np.where(move, pos, 0))
    holder_before = np.concatenate(([0], holder_after[:-1]))
    fixed = np.where(move, holder_before, pos)  # particle settled at step k
    counts[frac_idx[fixed[cross]]] += 1  # each particle is settled once: no duplicates
    last = holder_after[-1] if holder_after.size else 0
    counts[frac_idx[last]] += rest - int(floor_s[-1])  # the final carry: 0 or 1
    return np.repeat(np.arange(x.size, dtype=np.int64), counts)


# ---------------------------------------------------------------------------
# Biased selectors


def top_k(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """The n largest weights, by decreasing W_i then increasing i (deterministic).

    With fewer than n positive weights, the positive ones are repeated cyclically
    in that order. ``rng`` is unused.
    """
    w = np.asarray(weights, dtype=np.float64)
    order = np.argsort(-w, kind="stable")
    return np.resize(order[: np.count_nonzero(w > 0)], n).astype(np.int64)


def argmax(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n copies of argmax_i W_i (lowest index on ties). ``rng`` is unused."""
    return np.full(n, int(np.argmax(weights)), dtype=np.int64)


# ---------------------------------------------------------------------------
# The Resampler record and registries


@dataclass(frozen=True)
class Resampler:
    """A named resampling function with its unbiasedness flag.

    ``unbiased=True`` promises E[O_i] = n·W_i; ``False`` marks a biased selector,
    after which the driver reports ``log_z=None`` and ``exact=False``.
    """

    name: str
    fn: ResampleFn
    unbiased: bool

    def __call__(self, weights, n: int, rng: np.random.Generator) -> np.ndarray:
        """Validate, then return n int64 ancestor indices into ``weights``."""
        w = check_weights(weights)
        n = _check_n(n)
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        return np.asarray(self.fn(w, n, rng), dtype=np.int64)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_n(n) -> int:
    if not _is_int(n) or n < 1:
        raise ValueError(f"n (number of offspring) must be an int >= 1, got {n!r}")
    return int(n)


RESAMPLERS: dict[str, Resampler] = {
    fn.__name__: Resampler(fn.__name__, fn, unbiased=True)
    for fn in (multinomial, stratified, systematic, residual, ssp)
}

SELECTORS: dict[str, Resampler] = {
    fn.__name__: Resampler(fn.__name__, fn, unbiased=False) for fn in (top_k, argmax)
}


def tempered(temperature: float, base: str = "multinomial") -> Resampler:
    """Resample with scheme ``base`` from W_i^{1/T} / Σ_j W_j^{1/T}; biased unless T = 1.

    Computed in log space (log W_i / T, then softmax), so small T does not underflow;
    zero weights stay zero. T → 0 approaches argmax, T → ∞ uniform over W_i > 0.
    """
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float, np.integer, np.floating))
        or not (math.isfinite(temperature) and temperature > 0)
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if base not in RESAMPLERS:
        raise ValueError(f"tempered base must be one of {sorted(RESAMPLERS)}, got {base!r}")
    inner = RESAMPLERS[base].fn
    inv_t = 1.0 / float(temperature)

    def fn(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        w = np.asarray(weights, dtype=np.float64)
        log_w = np.full(w.shape, NEG_INF)
        np.log(w, out=log_w, where=w > 0)
        gap = log_w - log_w.max()  # ≤ 0; scaling it cannot overflow to +inf
        with np.errstate(invalid="ignore"):  # 0·∞ when 1/T overflows
            scaled = np.where(gap == 0.0, 0.0, gap * inv_t)
        return inner(normalize(scaled), n, rng)

    return Resampler(f"tempered({float(temperature):g},{base})", fn, unbiased=False)


def get_resampler(spec: str | Resampler) -> Resampler:
    """A Resampler as is, or one by name: a key of RESAMPLERS or SELECTORS,
    ``"tempered:T"`` or ``"tempered:T:base"``."""
    if isinstance(spec, Resampler):
        return spec
    if isinstance(spec, str):
        if spec in RESAMPLERS:
            return RESAMPLERS[spec]
        if spec in SELECTORS:
            return SELECTORS[spec]
        head, _, rest = spec.partition(":")
        if head == "tempered" and rest:
            t, _, base = rest.partition(":")
            try:
                temperature = float(t)
            except ValueError:
                msg = f"bad temperature in {spec!r}: expected 'tempered:T' or 'tempered:T:base'"
                raise ValueError(msg) from None
            return tempered(temperature, base or "multinomial")
    valid = [*RESAMPLERS, *SELECTORS, "tempered:T", "tempered:T:<base>"]
    raise ValueError(f"unknown resampler {spec!r}; valid names: {', '.join(valid)}")


# ---------------------------------------------------------------------------
# Conditional SMC and helpers


def conditional_ancestors(
    weights, ref_slot: int, ref_ancestor: int, rng: np.random.Generator
) -> np.ndarray:
    """Conditional multinomial resampling for conditional SMC (N = len(W) outputs).

    A[ref_slot] = ref_ancestor (the reference trajectory's own ancestor); the other
    N − 1 entries are i.i.d. Categorical(W) over all N particles, reference included.

    This is the conditional law of multinomial resampling given A[ref_slot]: since
    the draws are i.i.d., fixing one leaves the others untouched, and the CSMC
    kernel leaves the target invariant. Drawing N ancestors with a sorted or
    dependent scheme (systematic, stratified, residual, ssp) and then overwriting
    the reference slot is *wrong*: there, the other slots depend on the value in
    ref_slot (e.g. systematic draws are sorted and all fixed by one V), so their
    conditional law given A[ref_slot] = ref_ancestor is not their unconditional
    law; overwriting samples them from the wrong distribution and the kernel is no
    longer invariant (biased particle Gibbs). ``weights[ref_ancestor]`` may be tiny
    or zero; only index ranges are checked.
    """
    w = check_weights(weights)
    size = w.size
    for name, value in (("ref_slot", ref_slot), ("ref_ancestor", ref_ancestor)):
        if not _is_int(value) or not 0 <= value < size:
            raise ValueError(f"{name} must be an int in [0, {size}), got {value!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    others = multinomial(w, size - 1, rng)
    return np.insert(others, int(ref_slot), int(ref_ancestor)).astype(np.int64)


def offspring_counts(ancestors, n_particles: int) -> np.ndarray:
    """O_i = #{m : A_m = i} for i < n_particles, as an int64 array."""
    a = np.asarray(ancestors, dtype=np.int64).reshape(-1)
    if a.size and (a.min() < 0 or a.max() >= n_particles):
        raise ValueError(f"ancestors must lie in [0, {n_particles})")
    return np.bincount(a, minlength=n_particles).astype(np.int64)
