"""Genealogy: who descends from whom, step by step.

Step 0 is the initial population. For every later step t the driver records the
population *after* any resampling at t, and ``ancestors[t][i]`` — the index in the
step t−1 population of particle i's parent. Steps without resampling record the
identity map. A particle's lineage is found by walking these arrays backwards:

    i_T = i,   i_{t−1} = ancestors[t][i_t].

States are stored by reference (particles are immutable values), so the memory
cost is one pointer and a few numbers per particle per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class Trajectory:
    """One particle's path: ``states[t]`` for t = 0..T.

    ``finished[t]`` says whether the path had finished by step t, and
    ``log_correction[t]`` is the proposal's log p/q for the move into step t (0 when
    the proposal is the model itself), and ``increments[t]`` the observation model's
    Δℓ_t for that move (0 where the path did not move; default all 0). A trajectory is
    what conditional SMC takes as its reference; Σ_t increments[t] is its log-potential
    (parallel tempering reads it instead of scoring the path again).
    """

    states: tuple
    finished: tuple
    log_correction: np.ndarray = field(repr=False)
    increments: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.increments is None:
            object.__setattr__(self, "increments", np.zeros(len(self.states)))
        if not len(self.states) == len(self.finished) == len(self.log_correction) == len(self.increments):
            raise ValueError("Trajectory: states, finished, log_correction and increments must have the same length")
        if len(self.states) == 0:
            raise ValueError("Trajectory: needs at least the initial state")

    @property
    def log_potential(self) -> float:
        """Σ_t Δℓ_t: the path's total observation log-weight (its log G, up to corrections)."""
        return float(np.sum(self.increments))

    @property
    def final(self) -> Any:
        return self.states[-1]

    @property
    def n_steps(self) -> int:
        return len(self.states) - 1


class Genealogy:
    """Per-step states, flags and ancestor indices of a particle population."""

    def __init__(self, initial_states: Sequence[Any]):
        n = len(initial_states)
        self.states: list[list[Any]] = [list(initial_states)]
        self.ancestors: list[np.ndarray] = [np.full(n, -1, dtype=np.int64)]
        self.finished: list[np.ndarray] = [np.zeros(n, dtype=bool)]
        self.log_correction: list[np.ndarray] = [np.zeros(n)]
        self.increments: list[np.ndarray] = [np.zeros(n)]

    def record(self, states: Sequence[Any], ancestors, finished, log_correction, increments=None) -> None:
        """Append step t = len(self) with parent indices into step t−1 and each particle's
        increment Δℓ_t (0 for particles that did not move; default all 0)."""
        ancestors = np.asarray(ancestors, dtype=np.int64)
        n_prev = len(self.states[-1])
        if len(states) != len(ancestors) or np.any(ancestors < 0) or np.any(ancestors >= n_prev):
            raise ValueError("Genealogy.record: ancestors must index the previous population, one per state")
        self.states.append(list(states))
        self.ancestors.append(ancestors)
        self.finished.append(np.asarray(finished, dtype=bool).copy())
        self.log_correction.append(np.asarray(log_correction, dtype=np.float64).copy())
        self.increments.append(np.zeros(len(states)) if increments is None
                               else np.asarray(increments, dtype=np.float64).copy())

    def __len__(self) -> int:
        """Number of recorded steps, including step 0."""
        return len(self.states)

    def lineage(self, index: int, step: int | None = None) -> np.ndarray:
        """Indices ``[i_0, …, i_t]`` of particle ``index`` at ``step`` (default: last) and its ancestors."""
        t = len(self.states) - 1 if step is None else step
        if not 0 <= t < len(self.states):
            raise IndexError(f"step {t} is out of range 0..{len(self.states) - 1}")
        if not 0 <= index < len(self.states[t]):
            raise IndexError(f"particle {index} is out of range at step {t}")
        path = np.empty(t + 1, dtype=np.int64)
        path[t] = index
        for s in range(t, 0, -1):
            path[s - 1] = self.ancestors[s][path[s]]
        return path

    def trajectory(self, index: int, step: int | None = None) -> Trajectory:
        """The full path of particle ``index`` as a :class:`Trajectory`."""
        path = self.lineage(index, step)
        return Trajectory(
            states=tuple(self.states[s][i] for s, i in enumerate(path)),
            finished=tuple(bool(self.finished[s][i]) for s, i in enumerate(path)),
            log_correction=np.array([self.log_correction[s][i] for s, i in enumerate(path)]),
            increments=np.array([self.increments[s][i] for s, i in enumerate(path)]),
        )

    def n_unique_ancestors(self, step: int = 0) -> int:
        """How many distinct particles at ``step`` still have descendants at the last step
        (path degeneracy diagnostic)."""
        current = np.arange(len(self.states[-1]))
        for s in range(len(self.states) - 1, step, -1):
            current = np.unique(self.ancestors[s][current])
        return int(current.size)
