"""Policy backends ("generators").

- :class:`~itscale.lm.hf.HFGenerator` — a local Hugging Face causal LM: batched
  generation over the population with per-row stop strings, seeded sampling, and
  key/value-cache reuse across steps (needs the ``hf`` extra: torch, transformers).
- :class:`~itscale.lm.openai.OpenAIGenerator` — an OpenAI-compatible HTTP server (vLLM,
  llama.cpp, hosted APIs), over a :class:`~itscale.lm.completions.CompletionsClient` (request
  bodies, learnt server quirks, reply parsing) and its :class:`~itscale.lm.http.EndpointPool`
  (load balancing, bounded concurrency, retries with backoff); failures are
  :class:`~itscale.lm.http.BackendError` (needs the ``http`` extra: httpx).
- :class:`~itscale.lm.lookahead.Lookahead` — wraps an OpenAIGenerator with block-aligned
  look-ahead: ``Lookahead(OpenAIGenerator(url, model, tokenizer=...), block=32)``.
- :class:`~itscale.lm.loading.ModelLoadError` — a model folder or ``.gguf`` file that cannot
  be loaded (:func:`~itscale.lm.loading.load_hf` is the one loading path of the local backends).

To load by name (``embedded``, a folder, a ``.gguf`` file, URLs) with a device and dtype, use
:func:`itscale.load_policy` (:mod:`itscale.backends`).

Names are imported lazily, so ``import itscale.lm`` imports neither torch nor httpx.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "HFGenerator": "hf",
    "GeneratorStats": "hf",
    "ModelLoadError": "loading",
    "KVStore": "kv_cache",
    "OpenAIGenerator": "openai",
    "CompletionsClient": "completions",
    "Lookahead": "lookahead",
    "EndpointPool": "http",
    "BackendError": "http",
    "Usage": "http",
}

__all__ = [
    "BackendError", "CompletionsClient", "EndpointPool", "GeneratorStats", "HFGenerator", "KVStore", "Lookahead",
    "ModelLoadError", "OpenAIGenerator", "Usage",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
