import numpy as np
import pytest

from itscale.core import Genealogy, Trajectory


def build():
    g = Genealogy(["a", "b", "c"])
    g.record(["a1", "a2", "c1"], [0, 0, 2], [False, False, True], [0.0, 0.1, 0.2])
    g.record(["a1x", "c1", "c1"], [0, 2, 2], [False, True, True], [0.3, 0.0, 0.0])
    return g


def test_lineage_walks_ancestors_backwards():
    g = build()
    assert g.lineage(0).tolist() == [0, 0, 0]
    assert g.lineage(2).tolist() == [2, 2, 2]
    assert g.lineage(1, step=1).tolist() == [0, 1]
    assert len(g) == 3


def test_trajectory_collects_states_flags_and_corrections():
    t = build().trajectory(1)
    assert t.states == ("c", "c1", "c1") and t.finished == (False, True, True)
    np.testing.assert_allclose(t.log_correction, [0.0, 0.2, 0.0])
    assert t.final == "c1" and t.n_steps == 2


def test_path_degeneracy_counts_surviving_roots():
    g = build()
    assert g.n_unique_ancestors(0) == 2


def test_bad_records_and_indices_are_rejected():
    g = build()
    with pytest.raises(ValueError, match="ancestors"):
        g.record(["x"], [5], [False], [0.0])
    with pytest.raises(IndexError):
        g.lineage(7)
    with pytest.raises(ValueError, match="same length"):
        Trajectory(("a",), (False, True), np.zeros(1))
