"""The records the SMC core exchanges: what a proposal returns, the per-step trace,
the result, and the ancestor-sampling hook of particle Gibbs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol, Sequence

import numpy as np

from .genealogy import Genealogy, Trajectory

STATUS_OK = "ok"
STATUS_ALL_DEAD = "all_dead"


@dataclass(frozen=True)
class Proposed:
    """What a proposal returns for the particles it was given, in order.

    ``states[i] is None`` marks a failed proposal: that particle dies.
    ``log_correction`` is log p/q per particle; ``None`` means q = p (all zeros).
    """

    states: Sequence[Any]
    finished: Sequence[bool]
    log_correction: Sequence[float] | None = None


Propose = Callable[[Sequence[Any], np.random.Generator], "Proposed | Awaitable[Proposed]"]


class AncestorSampling(Protocol):
    """Hook for particle Gibbs with ancestor sampling (PGAS).

    ``log_weights(states, reference, step)`` returns, for each candidate ancestor
    state at ``step``, log γ(x_{1:step}, x*_{step+1:T}) − log γ(x_{1:step}) up to a
    constant: the teacher-forced score of continuing that prefix with the
    reference's remaining steps. ``splice(state, reference, step)`` returns the
    reference slot's state at ``step`` given its (new) state at ``step − 1``.
    """

    def log_weights(self, states: Sequence[Any], reference: Trajectory, step: int): ...

    def splice(self, previous_state: Any, reference: Trajectory, step: int) -> Any: ...


@dataclass(frozen=True)
class StepTrace:
    step: int
    population: int  # particles weighted this step (N·k with expansion)
    n_alive: int
    n_finished: int
    ess: float  # before resampling
    ess_fraction: float
    resampled: bool
    n_unique_parents: int  # distinct ancestors kept by resampling (N if not resampled)


@dataclass(frozen=True)
class SMCResult:
    states: list  # final population
    log_weights: np.ndarray  # final unnormalised log-weights
    weights: np.ndarray  # normalised (all zero if every particle died)
    finished: np.ndarray
    log_z: float | None  # log Ẑ; None when a biased selector was used
    exact: bool  # every selection was an unbiased resampling of a valid run
    status: str  # "ok" or "all_dead"
    message: str
    trace: tuple[StepTrace, ...]
    genealogy: Genealogy
    retired: tuple = ()  # kernel.Retired records of particles that left the population finished

    @property
    def n_steps(self) -> int:
        return len(self.genealogy) - 1

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def trajectory(self, index: int) -> Trajectory:
        return self.genealogy.trajectory(index)

    def sample_index(self, rng: np.random.Generator) -> int:
        """One particle index drawn ∝ final weight (how particle Gibbs picks its next reference)."""
        if not self.ok:
            raise RuntimeError(f"cannot sample from a run that ended with status {self.status!r}: {self.message}")
        return int(rng.choice(len(self.weights), p=self.weights))
