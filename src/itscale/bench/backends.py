"""Policy and reward backends named by a bench configuration, plus wall-time accounting.

``model: embedded`` is the model pair shipped in :mod:`itscale.zoo`; any other value
is a local Hugging Face folder. Loading is deferred until a sweep has work to do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .config import BenchConfig


def model_path(model: str, embedded: Path) -> Path:
    return embedded if model == "embedded" else Path(model).expanduser()


def _check_local(model: str, field: str) -> None:
    if model.startswith(("http://", "https://")):
        raise ValueError(f"{field}: {model!r} is an HTTP endpoint; this version of itscale serves local "
                         "Hugging Face folders (or 'embedded') only")


class Timed:
    """Wraps a generator or PRM and adds up the wall time spent inside its calls."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0

    @property
    def capabilities(self):
        return self.inner.capabilities

    def clear_cache(self) -> None:
        """Forget cached prefixes, so the next phase's cost does not depend on the last one's."""
        clear = getattr(self.inner, "clear_cache", None)
        if clear is not None:
            clear()

    async def generate_steps(self, requests):
        t = time.perf_counter()
        try:
            return await self.inner.generate_steps(requests)
        finally:
            self.seconds += time.perf_counter() - t

    async def score_steps(self, requests):
        t = time.perf_counter()
        try:
            return await self.inner.score_steps(requests)
        finally:
            self.seconds += time.perf_counter() - t


@dataclass
class Backends:
    policy: Timed
    prm: Timed | None
    description: dict


def load_backends(config: BenchConfig) -> Backends:
    """Load the policy (and PRM) the configuration names."""
    import torch

    from .. import zoo
    from ..lm import HFGenerator
    from ..rewards import HFClassifierPRM, HFTagPRM

    if config.policy.threads:
        torch.set_num_threads(config.policy.threads)
    _check_local(config.policy.model, "policy.model")
    policy_dir = model_path(config.policy.model, zoo.policy_path())
    fmt = config.step_format()
    policy = HFGenerator.from_pretrained(policy_dir, max_batch=config.policy.max_batch)
    description = {"policy": str(policy_dir)}
    prm = None
    if config.prm.enabled:
        _check_local(config.prm.model, "prm.model")
        prm_dir = model_path(config.prm.model, zoo.prm_path())
        cls = HFTagPRM if config.prm.kind == "tag" else HFClassifierPRM
        prm = Timed(cls.from_pretrained(prm_dir, delimiter=fmt.delimiter, max_batch=config.prm.max_batch))
        description["prm"] = str(prm_dir)
    backends = Backends(Timed(policy), prm, description)
    warm_up(backends, fmt)
    return backends


def warm_up(backends: Backends, fmt) -> None:
    """One tiny call to each backend, so that no phase's wall time pays for first-call set-up."""
    from ..types import Problem, SamplingParams, ScoreRequest, StepRequest

    problem = Problem("warm-up", "Start at 1. Apply in order: +1.")
    gen = getattr(backends.policy.inner, "generate_steps_sync", None)
    if gen is not None:
        gen([StepRequest(problem, (), 2, SamplingParams(max_step_tokens=4, seed=0), (fmt.delimiter,))])
        backends.policy.clear_cache()
    score = getattr(backends.prm.inner, "score_steps_sync", None) if backends.prm is not None else None
    if score is not None:
        score([ScoreRequest(problem, ("1+1=2" + fmt.delimiter,))])
        backends.prm.clear_cache()
