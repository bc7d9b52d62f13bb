"""Observation models: how a scored step turns into a log-weight increment.

The user names the target distribution by choosing one of these. The
driver calls ``await model.increments(states, finished, carry)`` once per step with
only the particles that moved this step: their new states, whether each has just
finished (the step limit counts as finishing), and a per-particle float ``carry``
that the model owns (0 at the start; it follows particles through resampling).
It returns ``(increments, new_carry)``.

Scorers are callables ``score(states) -> array`` (sync or async). A NaN score, or a
score that makes the increment −∞, kills that particle; it never kills the run.

``EveryStep(prm, link="odds", temperature=T)``
    Δℓ_t = link(s_t)/T with s_t the PRM score of the whole partial solution and
    link(s) = log(s/(1−s)) ("odds", s clipped to ≤ 1 − eps) or log s ("log"). With resampling every step
    this is the particle filter of Puri et al. (2025). Its target is
    p(x)·Π_t link⁻¹-odds(s_t)^{1/T}, *not* a reward-tilted posterior.

``Twisted(reward, twist, beta)``
    Δℓ_t = β(log ψ_t − log ψ_{t−1}) while unfinished, and β(log r − log ψ_{t−1}) on
    finishing, with ψ_0 = 1. The sum telescopes to β·log r, so the target is
    p(x)·r(x)^β for *any* positive twist ψ; the twist only changes the variance, and
    Ẑ estimates E_p[r^β].

``Unweighted()``
    Δℓ_t = 0: plain Monte Carlo from the proposal (self-consistency's pool).

``Outcome(reward, beta)``
    Δℓ_t = 0 until the particle finishes, then β·log r. With one macro-step this is
    best-of-N (argmax selection) or sampling-importance-resampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol, Sequence

import numpy as np

from .sync import resolve

Scorer = Callable[[Sequence[Any]], "np.ndarray | Sequence[float] | Awaitable[np.ndarray | Sequence[float]]"]

LINKS = ("odds", "log")


class ObservationModel(Protocol):
    async def increments(
        self, states: Sequence[Any], finished: np.ndarray, carry: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]: ...


async def _scores(scorer: Scorer, states: Sequence[Any], what: str) -> np.ndarray:
    if len(states) == 0:
        return np.zeros(0)
    values = np.asarray(await resolve(scorer(list(states))), dtype=np.float64).reshape(-1)
    if values.size != len(states):
        raise ValueError(f"{what} returned {values.size} scores for {len(states)} states")
    return values


def _log(values: np.ndarray) -> np.ndarray:
    """log of non-negative values; negative or NaN become NaN (→ dead particle)."""
    out = np.full(values.shape, np.nan)
    ok = values >= 0
    with np.errstate(divide="ignore"):
        out[ok] = np.log(values[ok])
    return out


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


@dataclass(frozen=True)
class EveryStep:
    prm: Scorer
    link: str = "odds"
    temperature: float = 1.0
    eps: float = 1e-7

    def __post_init__(self) -> None:
        if self.link not in LINKS:
            raise ValueError(f"EveryStep.link must be one of {LINKS}, got {self.link!r}")
        _check_positive("EveryStep.temperature", self.temperature)

    async def increments(self, states, finished, carry):
        s = await _scores(self.prm, states, "EveryStep.prm")
        bad = ~((s >= 0) & (s <= 1))
        if self.link == "odds":
            # A score of exactly 1 (a saturated float32 sigmoid) would give +inf odds.
            s = np.clip(s, 0.0, 1.0 - self.eps)
            incr = _log(s) - np.log1p(-s)
        else:
            incr = _log(s)
        incr = incr / self.temperature
        incr[bad] = np.nan
        return incr, np.asarray(carry, dtype=np.float64)


@dataclass(frozen=True)
class Twisted:
    reward: Scorer
    twist: Scorer
    beta: float = 1.0

    def __post_init__(self) -> None:
        _check_positive("Twisted.beta", self.beta)

    async def increments(self, states, finished, carry):
        finished = np.asarray(finished, dtype=bool)
        carry = np.asarray(carry, dtype=np.float64)
        log_value = np.empty(len(states))
        if finished.any():
            done = [s for s, f in zip(states, finished) if f]
            log_value[finished] = _log(await _scores(self.reward, done, "Twisted.reward"))
        if (~finished).any():
            going = [s for s, f in zip(states, finished) if not f]
            log_value[~finished] = _log(await _scores(self.twist, going, "Twisted.twist"))
        with np.errstate(invalid="ignore"):
            incr = self.beta * (log_value - carry)
        # A dead twist (ψ = 0) makes the increment −∞; NaN from (−∞) − (−∞) cannot
        # arise because a particle with ψ = 0 is dead and never stepped again.
        return incr, log_value


@dataclass(frozen=True)
class Outcome:
    reward: Scorer
    beta: float = 1.0

    def __post_init__(self) -> None:
        _check_positive("Outcome.beta", self.beta)

    async def increments(self, states, finished, carry):
        finished = np.asarray(finished, dtype=bool)
        incr = np.zeros(len(states))
        if finished.any():
            done = [s for s, f in zip(states, finished) if f]
            incr[finished] = self.beta * _log(await _scores(self.reward, done, "Outcome.reward"))
        return incr, np.asarray(carry, dtype=np.float64)


@dataclass(frozen=True)
class Unweighted:
    async def increments(self, states, finished, carry):
        return np.zeros(len(states)), np.asarray(carry, dtype=np.float64)
