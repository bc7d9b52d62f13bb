"""Glue between itscale's KV states and the installed transformers version.

Everything here depends on how transformers names and shapes things, so it lives in
one place:

- the forward keyword of the cache (``cache`` since transformers 5.2x, before that
  ``past_key_values``): :func:`cache_kwarg`, and which keywords a forward takes
  (:func:`accepts`); the cache a forward returned (:func:`returned_cache`);
- caches built from per-layer ``(keys, values)`` tensors of shape
  ``[B, heads, n, head_dim]``: a plain ``DynamicCache`` (:func:`dynamic_cache`), one
  that decodes into preallocated room (:func:`buffered_cache`, :class:`BufferedLayer`),
  and the per-layer states of a cache (:func:`cache_states`);
- what the model's config says about its attention and its KV size
  (:func:`check_full_attention`, :func:`kv_bytes_per_token`, :func:`tokens_for_bytes`).

Importing this module imports torch and transformers.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any, Sequence

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

__all__ = [
    "BufferedLayer", "accepts", "buffered_cache", "cache_kwarg", "cache_states", "check_full_attention",
    "dynamic_cache", "kv_bytes_per_token", "returned_cache", "text_config", "tokens_for_bytes",
]


# -- forward signature ----------------------------------------------------------------
@lru_cache(maxsize=64)
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def cache_kwarg(model) -> str:
    """The keyword the model's forward takes its KV cache under (``cache`` since transformers 5.2x,
    ``past_key_values`` before)."""
    return "cache" if "cache" in _forward_params(type(model)) else "past_key_values"


def accepts(model, name: str) -> bool:
    """Whether the model's forward takes the keyword ``name`` (e.g. ``logits_to_keep``)."""
    return name in _forward_params(type(model))


def returned_cache(output: Any):
    """The KV cache a forward pass returned (``output.cache``, or ``past_key_values`` before 5.2x)."""
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else output.past_key_values


# -- caches from per-layer states -------------------------------------------------------
def dynamic_cache(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> DynamicCache:
    """A DynamicCache holding per-layer ``keys[l]``/``values[l]`` (an empty one when there are none)."""
    return DynamicCache(ddp_cache_data=list(zip(keys, values))) if len(keys) else DynamicCache()


def cache_states(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)`` of ``cache``, each ``[B, heads, filled columns, head_dim]`` (views)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


class BufferedLayer(DynamicLayer):
    """A full-attention cache layer that writes new states into spare capacity.

    ``DynamicLayer.update`` concatenates the whole cache on every decode step (O(L) copies
    per token); this layer preallocates ``spare`` extra columns and writes in place.
    ``keys``/``values`` are views of the filled columns, as transformers expects.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        """``keys``/``values`` are ``[B, heads, capacity, head_dim]`` buffers whose first ``length``
        columns hold the cached states; the rest is spare room (used in place, never copied)."""
        super().__init__()
        self._k, self._v, self._len = keys, values, int(length)
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, : self._len], self._v[:, :, : self._len]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        if self._len + n > self._k.shape[2]:  # out of room: grow (not expected in decoding)
            grow = max(self._len + n, 2 * self._k.shape[2]) - self._k.shape[2]
            self._k = torch.cat([self._k, self._k.new_empty(*self._k.shape[:2], grow, self._k.shape[3])], dim=2)
            self._v = torch.cat([self._v, self._v.new_empty(*self._v.shape[:2], grow, self._v.shape[3])], dim=2)
        self._k[:, :, self._len : self._len + n] = key_states
        self._v[:, :, self._len : self._len + n] = value_states
        self._len += n
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows ``indices`` (spare capacity is kept)."""
        self._k, self._v = self._k.index_select(0, indices), self._v.index_select(0, indices)
        self._views()


def buffered_cache(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], length: int) -> DynamicCache:
    """A DynamicCache of :class:`BufferedLayer` over per-layer buffers whose first ``length`` columns are filled."""
    cache = DynamicCache()
    cache.layers = [BufferedLayer(k, v, length) for k, v in zip(keys, values)]
    cache.layer_class_to_replicate = None
    return cache


# -- what the config says ---------------------------------------------------------------
def text_config(model):
    """The decoder's config (the text part of a multimodal config, else the config itself)."""
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def check_full_attention(model) -> None:
    """KV reuse here assumes every layer is plain full attention (Llama, Qwen2, Mistral without window…);
    ValueError otherwise."""
    config = text_config(model)
    types = getattr(config, "layer_types", None)
    if types and any(t != "full_attention" for t in types):
        raise ValueError(
            f"{type(model).__name__} has layer types {sorted(set(types))}; itscale's KV-cache reuse supports "
            "full-attention decoder layers only (pass reuse_cache=False?)"
        )
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        raise ValueError(f"{type(model).__name__} uses sliding-window attention, which KV-cache reuse does not support")


def kv_bytes_per_token(model) -> int:
    """Bytes of keys and values one token takes in every layer of ``model``:
    ``2 · layers · kv_heads · head_dim · bytes per element``."""
    cfg = text_config(model)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * heads * head_dim * itemsize


def tokens_for_bytes(model, budget: int) -> int:
    """How many tokens' keys and values fit in ``budget`` bytes (at least 1)."""
    return max(1, budget // max(kv_bytes_per_token(model), 1))
