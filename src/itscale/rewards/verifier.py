"""Programmatic verifiers: a Python function as a process reward model.

Users without a trained PRM often have a check they trust: a calculator that recomputes
a line, unit tests for generated code, a regular expression for a required format.
:class:`CallablePRM` turns such a function into a :class:`~itscale.protocols.ProcessRewardModel`,
so every method, the bench (``prm: {kind: verifier, model: "mypkg.checks:check"}``) and the
server (``--prm mypkg.checks:check --prm-kind verifier``) can use it.

The function scores the *latest* step given the ones before it::

    def check(problem: str, steps: list[str]) -> float | bool:
        ...  # 1.0 / True: steps[-1] is right; 0.0 / False: it is wrong; anything between

so the score of step t is ``s_t = check(problem, steps[:t])``, computed once per distinct
prefix (cached by prefix, like the other PRMs) and clipped to ``[1e-6, 1 − 1e-6]`` so that
log-weights stay finite. A check of the final answer only (unit tests) returns a neutral
value for unfinished prefixes and reads the whole solution at the last step; methods
that aggregate with ``last`` then use just that. A function that raises, or returns
something that is not a number in [0, 1], scores the step NaN (that particle dies, the run
goes on) and ``stats.last_error`` says why.

``calculator_check`` in :mod:`itscale.tasks.arithmetic` is such a function for the embedded
task.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from ..types import Capabilities, ScoreRequest, StepScores
from .prefix_cache import PrefixScores, StepUnits

__all__ = ["CallablePRM", "VerifierStats", "is_callable_reference", "load_callable"]

_EPS = 1e-6
_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_callable_reference(text: str) -> bool:
    """Whether ``text`` looks like ``module.path:function``."""
    return bool(_REFERENCE.match(text))


def load_callable(reference: str) -> Callable[[str, list[str]], Any]:
    """The function ``module.path:function`` names; ValueError saying what is wrong."""
    if not is_callable_reference(reference):
        raise ValueError(f"{reference!r} is not of the form module.path:function")
    module_name, name = reference.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{reference!r}: cannot import {module_name!r} ({err}); is it installed or on PYTHONPATH?") \
            from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{reference!r}: {module_name} has no function {name!r}")
    return fn


@dataclass
class VerifierStats:
    calls: int = 0  # score_steps calls
    evaluated: int = 0  # prefixes the function was called on
    cached: int = 0  # step scores served from the cache
    failed: int = 0  # NaN scores (the function raised or returned a bad value)
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CallablePRM:
    """A process reward model from ``fn(problem, steps) -> score of steps[-1]`` (module docstring).

    ``name`` is shown in errors (default: the function's qualified name). ``cache_size``
    bounds the cached prefix scores."""

    def __init__(self, fn: Callable[[str, list[str]], Any], *, name: str | None = None, cache_size: int = 1 << 17):
        if not callable(fn):
            raise TypeError(f"CallablePRM needs a function, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
        self.capabilities = Capabilities()
        self.stats = VerifierStats()
        self._scores = PrefixScores(cache_size)

    @classmethod
    def from_reference(cls, reference: str, **kwargs: Any) -> "CallablePRM":
        """``CallablePRM(load_callable("module:function"))``."""
        return cls(load_callable(reference), name=reference, **kwargs)

    async def score_steps(self, requests: Sequence[ScoreRequest]) -> list[StepScores]:
        """Each uncached step prefix of the call once (copies share it); the function reads no tokens."""
        self.stats.calls += 1
        plan = StepUnits(self._scores, requests, lambda r, t: (r.problem.prompt, list(r.steps[: t + 1])))
        self.stats.cached += plan.cached_steps
        return plan.finish({key: self._call(*unit) for key, unit in plan.units.items()}, lambda unit: 0)

    def clear_cache(self) -> None:
        self._scores.clear()

    def _call(self, problem: str, steps: list[str]) -> float:
        self.stats.evaluated += 1
        try:
            value = self.fn(problem, steps)
            score = float(value)
            if not 0.0 <= score <= 1.0:
                raise ValueError(f"returned {value!r}; a score must be a number in [0, 1] (or a bool)")
        except Exception as err:  # noqa: BLE001 - a user's function: its failure kills this particle only
            self.stats.failed += 1
            self.stats.last_error = f"{self.name}: {type(err).__name__}: {err}"
            return math.nan
        return min(max(score, _EPS), 1.0 - _EPS)
