"""Scorers: process reward models, outcome verifiers, and score aggregation.

The Hugging Face PRMs (``HFTagPRM``, ``HFClassifierPRM``, from :mod:`itscale.rewards.hf`)
the LLM judges (``HFJudgePRM``, ``RemoteJudgePRM``; :mod:`itscale.rewards.judge`), the policy's
own confidence (``HFConfidencePRM``, :mod:`itscale.rewards.confidence`) and the HTTP PRMs
(``RemoteTagPRM``, ``RemoteRewardPRM``, from :mod:`itscale.rewards.remote`)
are imported lazily, so importing this package imports neither torch nor httpx.
:class:`~itscale.rewards.verifier.CallablePRM` makes a Python function a PRM.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .aggregate import AGGREGATIONS, aggregate, aggregate_prefixes
from .verifier import CallablePRM

_LAZY = {
    "HFTagPRM": "hf", "HFClassifierPRM": "hf", "HFJudgePRM": "hf", "PRMStats": "hf",
    "HFConfidencePRM": "confidence",
    "RemoteTagPRM": "remote", "RemoteRewardPRM": "remote", "RemoteJudgePRM": "remote", "RemotePRMStats": "remote",
}

__all__ = [
    "AGGREGATIONS", "CallablePRM", "HFClassifierPRM", "HFConfidencePRM", "HFJudgePRM", "HFTagPRM", "PRMStats",
    "RemoteJudgePRM", "RemotePRMStats", "RemoteRewardPRM", "RemoteTagPRM",
    "aggregate", "aggregate_prefixes",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
