"""Policy and reward backends named by a bench configuration, plus wall-time accounting.

``model: embedded`` is the model pair shipped in :mod:`itscale.zoo`; an ``http(s)://``
URL is an OpenAI-compatible server (vLLM, llama.cpp, ...) used through
:class:`~itscale.lm.openai.OpenAIGenerator` / :class:`~itscale.rewards.remote.RemoteTagPRM`;
any other value is a local Hugging Face folder. Loading is deferred until a sweep has
work to do, and an HTTP server that is unreachable or does not serve the model fails
here, before any work starts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..strategies.batching import Wrapper
from .config import BenchConfig


def model_path(model: str, embedded: Path) -> Path:
    return embedded if model == "embedded" else Path(model).expanduser()


def served_model(url: str, wanted: str | None, field: str) -> str:
    """The model id to request from ``url``: ``wanted`` if the server serves it, else the only one."""
    import httpx

    base = url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    try:
        reply = httpx.get(base + "/models", timeout=10.0)
        reply.raise_for_status()
        ids = [m["id"] for m in reply.json().get("data", [])]
    except (httpx.HTTPError, ValueError, KeyError) as err:
        raise ValueError(f"{field}: cannot list the models of {base} ({type(err).__name__}: {err}); "
                         "is the server running?") from None
    if wanted is not None:
        if wanted not in ids:
            raise ValueError(f"{field}: {base} does not serve {wanted!r}; it serves {ids}")
        return wanted
    if len(ids) != 1:
        raise ValueError(f"{field}: {base} serves {ids}; set served_model to choose one")
    return ids[0]


def _tokenizer_for(cfg, name: str, embedded: Path) -> str | None:
    if cfg.tokenizer:
        return str(model_path(cfg.tokenizer, embedded))
    return name if Path(name).is_dir() else None


class Timed(Wrapper):
    """Wraps a generator or PRM and adds up the wall time during which at least one of its
    calls is in flight (concurrent calls to a server count once). ``clear_cache``
    forgets cached prefixes, so that one phase's cost does not depend on the last one's."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0
        self._in_flight, self._since = 0, 0.0

    async def _timed(self, call):
        if self._in_flight == 0:
            self._since = time.perf_counter()
        self._in_flight += 1
        try:
            return await call
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self.seconds += time.perf_counter() - self._since

    async def generate_steps(self, requests):
        return await self._timed(self.inner.generate_steps(requests))

    async def score_steps(self, requests):
        return await self._timed(self.inner.score_steps(requests))


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
    fmt = config.step_format()
    if config.policy.is_http:
        from ..lm.openai import OpenAIGenerator

        name = served_model(config.policy.model, config.policy.served_model, "policy.model")
        policy = OpenAIGenerator(config.policy.model, name, merge_prompts=config.policy.merge_prompts,
                                 kv_block=config.policy.kv_block,
                                 tokenizer=_tokenizer_for(config.policy, name, zoo.policy_path()))
        description = {"policy": f"{config.policy.model} ({name})"}
    else:
        policy_dir = model_path(config.policy.model, zoo.policy_path())
        policy = HFGenerator.from_pretrained(policy_dir, max_batch=config.policy.max_batch)
        description = {"policy": str(policy_dir)}
    prm = None
    if config.prm.enabled and config.prm.is_http:
        from ..rewards.remote import RemoteTagPRM

        if config.prm.kind != "tag":
            raise ValueError("prm.kind: an HTTP PRM is scored by prompt log-probabilities, so kind must be 'tag'")
        name = served_model(config.prm.model, config.prm.served_model, "prm.model")
        prm = Timed(RemoteTagPRM(config.prm.model, name, tokenizer=_tokenizer_for(config.prm, name, zoo.prm_path()),
                                 delimiter=fmt.delimiter))
        description["prm"] = f"{config.prm.model} ({name})"
    elif config.prm.enabled:
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
