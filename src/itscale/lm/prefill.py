r"""Left-padded batches: the cached states of several contexts plus new tokens, in one forward pass.

Row ``b`` of a batch continues a context whose keys/values are stored along a path of
the prefix tree (:class:`~itscale.lm.kv_cache.KVNode`, ``L_b`` cached tokens) with
``n_b`` new tokens. With ``P = max_b L_b`` past columns and ``N = max_b n_b`` input
columns, every row runs in one forward pass with *left* padding:

- past: row b's cached states occupy the last ``L_b`` of the ``P`` past columns,
  ``[P − L_b, P)``; the first ``P − L_b`` columns are zeros (padding);
- new tokens: row b's ids occupy the last ``n_b`` of the ``N`` input columns,
  ``[N − n_b, N)``; the others hold ``pad_id``;
- the attention mask covers the ``P + N`` columns a layer attends over::

      mask[b, j] = 1  iff  P − L_b ≤ j < P  or  P + N − n_b ≤ j < P + N

  (0 on all padding; the model's causal mask adds the order within the new tokens);
- position ids count only real tokens: row b's i-th new token (input column
  ``N − n_b + i``) is at position ``L_b + i`` — the number of real tokens before it;
  padding columns get 0 (they are never attended to).

So a padded row computes what it would compute alone (up to the rounding of batched
kernels). After the pass the cache holds ``P + N`` columns and row b's i-th new token's
states are in column ``P + N − n_b + i`` (:meth:`PrefillBatch.new_kv`).

Decoding uses the same past layout with ``spare`` uninitialised columns on the right
for the tokens it generates (:func:`left_padded_kv`), and :func:`left_padding_mask`
for the past's mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .hf_cache import accepts, cache_states, dynamic_cache
from .kv_cache import KV, KVNode

__all__ = ["PrefillBatch", "any_kv", "left_padded_kv", "left_padding_mask", "slice_kv", "tail_logits"]


def any_kv(nodes: Sequence[KVNode]) -> KV | None:
    """The states of some stored segment on the paths to ``nodes`` (None when all are empty)."""
    for node in nodes:
        for seg in node.chain():
            return seg.kv
    return None


def left_padded_kv(nodes: Sequence[KVNode], spare: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Keys and values of the contexts ending at ``nodes``, left-padded to the longest.

    Returns per-layer lists of ``[B, heads, P + spare, head_dim]`` tensors and ``P``: row
    b's ``L_b`` states fill columns ``[P − L_b, P)``, the columns before are zeros, and the
    last ``spare`` are uninitialised room for a decode to write into. Shapes, dtype and
    device come from the stored states; ``([], [], 0)`` when no node has any.
    """
    template = any_kv(nodes)
    if template is None:
        return [], [], 0
    P = max((n.length for n in nodes), default=0)
    B = len(nodes)
    keys, values = [], []
    for layer in range(len(template)):
        k0, v0 = template[layer]
        k, v = k0.new_empty((B, k0.shape[0], P + spare, k0.shape[2])), v0.new_empty((B, v0.shape[0], P + spare, v0.shape[2]))
        k[:, :, :P].zero_()
        v[:, :, :P].zero_()
        keys.append(k)
        values.append(v)
    for b, node in enumerate(nodes):
        pos = P - node.length
        for seg in node.chain():
            for layer, (k, v) in enumerate(seg.kv):
                keys[layer][b, :, pos:pos + seg.n] = k
                values[layer][b, :, pos:pos + seg.n] = v
            pos += seg.n
    return keys, values, P


def left_padding_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, width]`` int64: 1 on the last ``lengths[b]`` columns of row b, 0 on the padding before."""
    return (torch.arange(width)[None, :] >= (width - lengths)[:, None]).long()


def slice_kv(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], row: int, start: int, stop: int) -> KV:
    """A stored copy of columns ``[start, stop)`` of batch row ``row`` (no view into the batch)."""
    return tuple((k[row, :, start:stop].clone(), v[row, :, start:stop].clone()) for k, v in layers)


@dataclass(eq=False)
class PrefillBatch:
    """The inputs of one left-padded forward pass over past states and new tokens (module docstring).

    Pass ``input_ids``, ``attention_mask``, ``position_ids`` and ``cache`` (with
    ``use_cache=True``) to the model; the pass appends the new tokens' states to
    ``cache``, and :meth:`new_kv` copies them out per row."""

    input_ids: torch.Tensor  # [B, N] int64, row b's new ids in its last n_b columns
    attention_mask: torch.Tensor  # [B, P + N] int64
    position_ids: torch.Tensor  # [B, N] int64
    cache: object  # a transformers DynamicCache over the padded past (P columns)
    past: int  # P
    width: int  # N
    new_lengths: list[int]  # n_b

    @classmethod
    def build(cls, bases: Sequence[KVNode], new_ids: Sequence[Sequence[int]], pad_id: int) -> "PrefillBatch":
        """Row b continues the context ending at ``bases[b]`` (the root: nothing cached) with ``new_ids[b]``."""
        B, N = len(bases), max(len(ids) for ids in new_ids)
        keys, values, P = left_padded_kv(bases)
        input_ids = torch.full((B, N), pad_id, dtype=torch.long)
        mask = torch.zeros((B, P + N), dtype=torch.long)
        positions = torch.zeros((B, N), dtype=torch.long)
        for b, (base, ids) in enumerate(zip(bases, new_ids)):
            n, L = len(ids), base.length
            input_ids[b, N - n:] = torch.tensor(ids, dtype=torch.long)
            mask[b, P - L:P] = 1
            mask[b, P + N - n:] = 1
            positions[b, N - n:] = torch.arange(L, L + n)
        return cls(input_ids, mask, positions, dynamic_cache(keys, values), P, N, [len(ids) for ids in new_ids])

    def inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and ``position_ids`` on ``device`` (the cache is already there)."""
        return {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device),
                "position_ids": self.position_ids.to(device)}

    def column(self, row: int, i: int) -> int:
        """The input column of row ``row``'s ``i``-th new token: ``N − n_b + i``."""
        return self.width - self.new_lengths[row] + i

    def new_kv(self, row: int, start: int, stop: int) -> KV:
        """After the forward pass: a stored copy of the states of row ``row``'s new tokens
        ``[start, stop)`` (cache columns ``P + N − n_b + start`` up to ``P + N − n_b + stop``)."""
        first = self.past + self.column(row, 0)
        return slice_kv(cache_states(self.cache), row, first + start, first + stop)


def tail_logits(model, rows: Sequence[Sequence[int]], keep: int, pad_id: int, device) -> torch.Tensor:
    """Next-token logits at the last ``keep`` positions of each row, from one left-padded pass with no cache.

    Row b's ids fill the last ``n_b`` of ``L = max_b n_b`` columns (positions ``0..n_b−1``), so
    ``out[b, keep − 1]`` predicts what follows row b and ``out[b, keep − 1 − j]`` is read after
    its last ``j`` tokens (columns before a short row's start are padding: never read them).
    Returns ``[B, keep, V]`` in float32 (``logits_to_keep`` is passed when the model takes it,
    so only those columns go through the output layer)."""
    B, L = len(rows), max(len(ids) for ids in rows)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    lengths = torch.tensor([len(ids) for ids in rows])
    for b, ids in enumerate(rows):
        input_ids[b, L - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
    mask = left_padding_mask(lengths, L)
    positions = (torch.cumsum(mask, dim=1) - 1).clamp(min=0)
    extra = {"logits_to_keep": keep} if accepts(model, "logits_to_keep") else {}
    out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                use_cache=False, **extra)
    return out.logits[:, -keep:].float()
