"""The train/test split of a problem set: by a hash of each problem's id.

A problem is in the training split iff h(id) < f, with h(id) = blake2b("itscale-allocation:" +
id) read as a number in [0, 1) and f the training fraction. The split is the same whatever
the order or the size of the problem set, so a problem added later never moves another one,
and the same ids split the same way in every run.
"""

from __future__ import annotations

import hashlib


def unit_hash(problem_id: str) -> float:
    """h(id) ∈ [0, 1)."""
    digest = hashlib.blake2b(f"itscale-allocation:{problem_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def in_train(problem_id: str, train_fraction: float) -> bool:
    """Whether the problem is in the training split (h(id) < ``train_fraction``)."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
    return unit_hash(problem_id) < train_fraction
