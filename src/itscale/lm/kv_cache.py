"""A prefix tree of key/value states (:class:`KVStore` of :class:`KVNode` segments).

Why a tree
----------
Particles share prefixes: every particle of a problem starts with the same prompt,
and after resampling several particles continue the same ancestor. Each node of a
:class:`KVStore` holds only its own *segment* — the token ids it adds to its parent
and their keys/values, ``(k, v)`` of shape ``[heads, n, head_dim]`` per layer — so a
prefix shared by many particles is stored once. The states of a whole context are
the concatenation of the segments on the path from the root.

A node is found by its *key*: the text its segment covers (the generator walks the
tree by ``text.startswith(child.key, position)``), or a step text (the PRM walks by
exact keys). A node may also carry the model's next-token ``logits`` after its last
token (so a context that ends exactly at a node needs no forward pass at all) and a
``value`` (the PRM stores the step's score there).

Namespaces: a store keeps one tree per *cache namespace* (``None``: the shared one, the
only one unless a request names another; see ``StepRequest.cache_namespace``). A lookup
walks only its namespace's tree and a node inserted under a namespace's root stays in
that tree, so a request never reads what another namespace's requests stored. The
memory bound is global: ``size`` counts every tree, and :meth:`KVStore.trim` evicts the
least-recently-used leaves across all of them (an emptied namespace's root goes too).

Memory bound: the store's ``size`` counts the tokens of all its segments, a node's
stored logits counted as the number of KV tokens taking the same memory (for large
vocabularies they are not negligible); :meth:`KVStore.trim` evicts least-recently-used
*leaves* (a node is "used" when it or a descendant is matched or inserted) until the
size is within ``max_tokens``. Eviction only happens
between backend calls, so nodes in use by a call are never freed under it.

The padded batches that run several nodes' contexts in one forward pass are built in
:mod:`itscale.lm.prefill`; this module knows nothing about models (it imports torch
only, for the tensors).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

KV = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer (keys, values), each [heads, n, head_dim]


@dataclass(eq=False)
class KVNode:
    key: str
    parent: "KVNode | None"
    ids: torch.Tensor  # int64 [n], this segment's token ids
    kv: KV | None  # None only for the root
    logits: torch.Tensor | None = None  # next-token logits after the last token, [vocab]
    value: Any = None
    children: dict[str, "KVNode"] = field(default_factory=dict)
    last_used: int = 0
    in_store: bool = False
    length: int = 0  # tokens from the root to the end of this node

    def __post_init__(self) -> None:
        self.length = (self.parent.length if self.parent is not None else 0) + int(self.ids.numel())

    @property
    def n(self) -> int:
        return int(self.ids.numel())

    @property
    def size(self) -> int:
        """Memory in KV-token units: the segment's tokens plus its logits' equivalent."""
        if self.logits is None or self.kv is None or self.n == 0:
            return self.n
        kv_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv)
        logit_bytes = self.logits.numel() * self.logits.element_size()
        return self.n + -(-logit_bytes * self.n // max(kv_bytes, 1))

    def chain(self) -> list["KVNode"]:
        """The nodes from the root's first child down to this one (the root holds nothing)."""
        out, node = [], self
        while node is not None and node.kv is not None:
            out.append(node)
            node = node.parent
        return out[::-1]

    def token_ids(self) -> torch.Tensor:
        parts = [n.ids for n in self.chain()]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def tail_ids(self, count: int) -> list[int]:
        """The last ``count`` token ids of the whole context (fewer when it is shorter)."""
        out: list[int] = []
        node = self
        while node is not None and node.kv is not None and len(out) < count:
            out = node.ids.tolist()[-(count - len(out)):] + out
            node = node.parent
        return out


def new_root() -> KVNode:
    return KVNode("", None, torch.zeros(0, dtype=torch.long), None)


class KVStore:
    """Least-recently-used prefix trees of KV segments, one per cache namespace, bounded
    together by ``max_tokens`` (see ``size`` and the module docstring)."""

    def __init__(self, max_tokens: int):
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        self.max_tokens = int(max_tokens)
        self._roots: dict[str | None, KVNode] = {}
        self.tokens = 0  # KV tokens stored
        self.size = 0  # memory in KV-token units (tokens + logits), what max_tokens bounds
        self.nodes = 0
        self._tick = itertools.count(1)

    @property
    def root(self) -> KVNode:
        """The shared namespace's root."""
        return self.root_of(None)

    def root_of(self, namespace: str | None = None) -> KVNode:
        """The root of ``namespace``'s tree (created empty when it has none)."""
        root = self._roots.get(namespace)
        if root is None:
            root = self._roots[namespace] = new_root()
            root.in_store = True
        return root

    @property
    def namespaces(self) -> tuple[str | None, ...]:
        """The namespaces that have a tree."""
        return tuple(self._roots)

    # -- lookup ---------------------------------------------------------------------
    def match_text(self, text: str, accept: Callable[[KVNode, int], bool],
                   namespace: str | None = None) -> tuple[KVNode, int]:
        """The deepest node of ``namespace``'s tree whose text is a prefix of ``text`` and that
        ``accept(node, covered)`` allows, with the number of characters it covers; ``(root, 0)``
        (that namespace's root) when there is none."""
        root = self.root_of(namespace)
        node, pos, best = root, 0, (root, 0)
        while True:
            nxt = None
            for child in node.children.values():
                if text.startswith(child.key, pos) and (nxt is None or len(child.key) > len(nxt.key)):
                    nxt = child
            if nxt is None:
                return best
            node, pos = nxt, pos + len(nxt.key)
            if accept(node, pos):
                best = (node, pos)

    def match_keys(self, keys: Sequence[str], namespace: str | None = None) -> list[KVNode]:
        """The nodes along the exact key path ``keys`` of ``namespace``'s tree as far as it is stored."""
        out, node = [], self.root_of(namespace)
        for key in keys:
            node = node.children.get(key)
            if node is None:
                break
            out.append(node)
        return out

    # -- update ---------------------------------------------------------------------
    def insert(self, node: KVNode) -> KVNode:
        """Add a detached node under its parent and return the stored node.

        An existing child with the same key and token ids is kept (it holds the same
        states), gaining the new node's logits if it had none; one with other token ids
        (another tokenization of the same text) is replaced, with its subtree. A node whose
        parent is no longer stored stays detached (usable, not cached).
        """
        parent = node.parent
        if parent is None or not parent.in_store:  # (a stored root is in_store)
            return node
        existing = parent.children.get(node.key)
        if existing is not None:
            if torch.equal(existing.ids, node.ids):
                if existing.logits is None and node.logits is not None:
                    self.size -= existing.size
                    existing.logits = node.logits
                    self.size += existing.size
                self.touch(existing)
                return existing
            self._remove(existing)
        parent.children[node.key] = node
        node.in_store = True
        self.tokens += node.n
        self.size += node.size
        self.nodes += 1
        self.touch(node)
        return node

    def touch(self, node: KVNode) -> None:
        tick = next(self._tick)
        while node is not None:
            node.last_used = tick
            node = node.parent

    def _remove(self, node: KVNode) -> None:
        """Drop ``node`` and its subtree from the store."""
        del node.parent.children[node.key]
        stack = [node]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            n.in_store = False
            self.tokens -= n.n
            self.size -= n.size
            self.nodes -= 1

    def trim(self) -> int:
        """Evict least-recently-used leaves, across every namespace, until ``size <= max_tokens``
        (then drop the roots of emptied namespaces); returns tokens freed."""
        if self.size <= self.max_tokens:
            self._drop_empty_roots()
            return 0
        heap: list[tuple[int, int, KVNode]] = []
        stack = [child for root in self._roots.values() for child in root.children.values()]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                heap.append((node.last_used, id(node), node))
        heapq.heapify(heap)
        freed = 0
        while self.size > self.max_tokens and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            del parent.children[node.key]
            node.in_store = False
            self.tokens -= node.n
            self.size -= node.size
            self.nodes -= 1
            freed += node.n
            if parent.parent is not None and not parent.children:
                heapq.heappush(heap, (parent.last_used, id(parent), parent))
        self._drop_empty_roots()
        return freed

    def _drop_empty_roots(self) -> None:
        for namespace in [ns for ns, root in self._roots.items() if ns is not None and not root.children]:
            self._roots.pop(namespace).in_store = False

    def clear(self) -> None:
        for root in self._roots.values():  # nodes built on an old root stay detached
            root.in_store = False
        self._roots = {}
        self.tokens = self.size = self.nodes = 0
