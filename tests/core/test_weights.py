import math

import numpy as np
import pytest

from itscale.core import ess, ess_fraction, log_normalize, logsumexp, normalize
from itscale.core.weights import alive, as_log_weights, check_weights


def test_normalize_matches_softmax_and_sums_to_one():
    lw = np.array([0.0, math.log(3.0), -1e3, 1e3 - 1e3])
    w = normalize(lw)
    expected = np.exp(lw - lw.max())
    np.testing.assert_allclose(w, expected / expected.sum(), rtol=1e-15)
    assert w.dtype == np.float64 and abs(w.sum() - 1) < 1e-15


def test_large_log_weights_do_not_overflow():
    lw = np.array([1000.0, 1000.0 + math.log(3)])
    np.testing.assert_allclose(normalize(lw), [0.25, 0.75])
    assert logsumexp(lw) == pytest.approx(1000.0 + math.log(4))


def test_dead_particles_get_zero_weight():
    lw = np.array([-np.inf, 0.0, -np.inf, 0.0])
    np.testing.assert_array_equal(normalize(lw), [0.0, 0.5, 0.0, 0.5])
    np.testing.assert_array_equal(alive(lw), [False, True, False, True])
    assert ess(lw) == pytest.approx(2.0)


def test_all_dead_is_zero_not_nan():
    lw = np.full(3, -np.inf)
    with np.errstate(all="raise"):
        assert logsumexp(lw) == -np.inf
        np.testing.assert_array_equal(normalize(lw), np.zeros(3))
        np.testing.assert_array_equal(log_normalize(lw), np.full(3, -np.inf))
        assert ess(lw) == 0.0 and ess_fraction(lw) == 0.0


def test_nan_counts_as_dead_and_plus_inf_is_rejected():
    np.testing.assert_array_equal(as_log_weights([np.nan, 0.0]), [-np.inf, 0.0])
    with pytest.raises(ValueError, match=r"\+inf"):
        as_log_weights([np.inf, 0.0])


def test_ess_bounds_and_log_space_accuracy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        lw = 50 * rng.standard_normal(64)
        w = normalize(lw)
        assert ess(lw) == pytest.approx(1.0 / np.sum(w**2), rel=1e-12)
        assert 1.0 - 1e-12 <= ess(lw) <= 64 + 1e-9
    assert ess(np.zeros(10)) == pytest.approx(10.0)
    assert ess(np.array([0.0, -np.inf, -np.inf])) == pytest.approx(1.0)


def test_log_normalize_is_log_of_normalize():
    lw = np.array([0.1, -2.0, 3.0, -np.inf])
    np.testing.assert_allclose(np.exp(log_normalize(lw)), normalize(lw), rtol=1e-14)


@pytest.mark.parametrize("bad, msg", [
    ([0.5, 0.6], "sum to 1"),
    ([1.5, -0.5], "non-negative"),
    ([np.nan, 1.0], "finite"),
    ([], "empty"),
])
def test_check_weights_names_the_problem(bad, msg):
    with pytest.raises(ValueError, match=msg):
        check_weights(bad)
