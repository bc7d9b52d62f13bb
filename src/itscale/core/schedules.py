"""Resampling schedules: when the driver resamples.

A schedule is a callable ``schedule(step, ess_fraction) -> bool`` evaluated after
the weights of step ``step`` (1-based) are updated; ``ess_fraction`` is ESS/N in
[0, 1]. Schedules are frozen dataclasses so that they hash into config digests.

- ``Always()``       resample after every step (Puri et al. particle filtering);
- ``Never()``        sequential importance sampling: weights only;
- ``ESSBelow(τ)``    resample when ESS/N < τ (adaptive resampling; τ=0.5 is usual);
- ``EveryK(k)``      resample after steps k, 2k, 3k, …
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Always:
    def __call__(self, step: int, ess_fraction: float) -> bool:
        return True


@dataclass(frozen=True)
class Never:
    def __call__(self, step: int, ess_fraction: float) -> bool:
        return False


@dataclass(frozen=True)
class ESSBelow:
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"ESSBelow.threshold must be in (0, 1], got {self.threshold!r}")

    def __call__(self, step: int, ess_fraction: float) -> bool:
        return ess_fraction < self.threshold


@dataclass(frozen=True)
class EveryK:
    k: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"EveryK.k must be a positive integer, got {self.k!r}")

    def __call__(self, step: int, ess_fraction: float) -> bool:
        return step % self.k == 0


Schedule = Always | Never | ESSBelow | EveryK


def get_schedule(spec: "str | Schedule") -> Schedule:
    """Parse ``"always"``, ``"never"``, ``"ess:0.5"`` or ``"every:2"``; schedules pass through."""
    if not isinstance(spec, str):
        if callable(spec):
            return spec
        raise ValueError(f"schedule must be a string or a schedule object, got {spec!r}")
    name, _, arg = spec.partition(":")
    try:
        if name == "always" and not arg:
            return Always()
        if name == "never" and not arg:
            return Never()
        if name == "ess":
            return ESSBelow(float(arg) if arg else 0.5)
        if name == "every" and arg:
            return EveryK(int(arg))
    except ValueError as err:
        raise ValueError(f"bad schedule {spec!r}: {err}") from None
    raise ValueError(
        f"unknown schedule {spec!r}; use 'always', 'never', 'ess:THRESHOLD' (e.g. 'ess:0.5') or 'every:K'"
    )
