"""itscale: inference-time scaling for LLMs as probabilistic inference.

``itscale.load_policy(model, device=..., dtype=...)`` and ``itscale.load_prm(...)`` load a
backend from a model name (``embedded``, a folder, a ``.gguf`` file, or URLs); see
:mod:`itscale.backends`. Imported lazily: ``import itscale`` imports neither torch nor httpx.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {"load_policy": "backends", "load_prm": "backends", "PolicySpec": "backends", "PRMSpec": "backends"}
__all__ = ["PRMSpec", "PolicySpec", "__version__", "load_policy", "load_prm"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
