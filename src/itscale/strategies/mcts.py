r"""Monte Carlo tree search (UCT) over reasoning steps, with PRM values or sampled rollouts.

After the MCTS of OpenR (``reason/guided_search/tree.py``, PRM-guided value search) and LLM
Reasoners (``reasoners/algorithm/mcts.py``), written for this library's ``RunContext``.

The tree
--------
A node s is a partial solution (a :class:`~itscale.types.Particle`); the root is the empty
solution. Each node keeps its visit count N(s), its total value W(s), its mean value
Q(s) = W(s)/N(s) (0 while N(s) = 0) and its prior v(s): the aggregated PRM score of s when it
was created (``aggregation``; a failed score counts 0). A *finished* node (the format's
``is_final``) is terminal and is never expanded; its value is its outcome score r(s)
(``ctx.outcome_scores``: the outcome scorer if one is configured, else the PRM score, which
is then v(s) and is not asked for twice). A node whose expansion produced nothing (every
proposal failed) is *dead*: terminal, value 0.

One rollout
-----------
The budget is the number of rollouts. One rollout is:

1. **Selection.** From the root, while the node is expanded and not terminal, go to the child

       a(s) = argmax_c  Q(c) + c_puct · sqrt( ln N(s) / N(c) ),

   except that an unvisited child (N(c) = 0) is taken first, in the children's order (highest
   prior first, see 2); ties of the UCT value (within 1e-12) are broken uniformly by the run's
   rng. Selection stops at a node that is not expanded, or is terminal.
2. **Expansion** (only of an unexpanded, non-terminal node s): ``children`` = k next steps
   sampled with ONE ``ctx.propose`` call (k copies of s: one request with k > 1) and scored
   with ONE ``ctx.prm_scores`` call (and one ``ctx.outcome_scores`` call for the finished ones,
   only when an outcome scorer is configured). Failed proposals are dropped, and identical
   steps are one child (a node is a partial solution: two copies would be one state split in
   two), so s gets between 0 and k children, ordered by prior, highest first (ties: sampling
   order). A node is expanded once (no progressive widening); with no child it is dead.
   The new leaf ℓ is s's first child (the UCT rule at s: all children are unvisited).
3. **Evaluation** of ℓ (or of the selected node itself when it is terminal):
   - a finished node: its outcome score r(ℓ); a dead node: 0;
   - ``rollout="prm"``: v(ℓ), its PRM score (value-function MCTS: the PRM is the value network);
   - ``rollout="sample"``: ℓ's partial solution is completed by sampling to the end (ONE
     ``ctx.complete`` call, one ``stop=()`` request split into steps) and the value is the outcome
     score r(x̂) of that completion x̂ (one ``ctx.outcome_scores`` call); a failed completion
     falls back to v(ℓ).
4. **Backpropagation**: for every node u on the path root → ℓ: N(u) += 1, W(u) += value.
   So Q(u) is the mean of the values of the rollouts that passed through u.

Policy calls happen only on expansion (and, with ``rollout="sample"``, completion); a rollout
that selects a finished node (re-visiting a solution) costs no model call. The tree is
*exhausted* when every node has been visited and none is left to expand: further rollouts
would only re-visit finished solutions, so the search stops early (``extras["exhausted"]``).

The answer
----------
``selection="argmax"`` is the standard MCTS choice (the robust child): from the root, go to
the child with the most visits (ties: larger Q, then the run's rng; dead children are never
taken) until a node with no visited child. That node is a finished solution, or (budget spent
before anything was finished below it) an unfinished leaf: then its rollout completion
(``rollout="sample"``) is the answer, and with ``rollout="prm"`` it is completed now by one more
sampled completion (counted in the cost; ``extras["final_completion"]``).

Candidates (for ``selection="vote"`` and the Result) are the complete solutions found, each
weighted by the number of rollouts whose value it supplied: N(f) for a finished node f,
1 per rollout completion, 1 for the final completion; copies of one text are one candidate
whose weight is the sum. Their scores are their outcome scores. ``"vote"`` answers with the
answer of largest total weight.

``extras``: ``rollouts`` (≤ budget), ``expansions`` (= policy calls for expansion),
``tree_size`` (nodes, root included), ``max_depth`` (steps of the deepest node),
``exhausted`` and ``final_completion``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field

from ..types import Particle, Result
from .base import Aggregation, Params, Strategy, register
from .context import RunContext, answer_of


class MCTSParams(Params):
    children: int = Field(3, ge=1, description="k: next steps sampled (one request) when a node is expanded")
    c_puct: float = Field(1.0, gt=0, description="UCT exploration constant: Q(c) + c_puct·sqrt(ln N(s)/N(c))")
    rollout: Literal["prm", "sample"] = Field(
        "prm", description="a new leaf's value: its PRM score, or the outcome score of a sampled completion")
    aggregation: Aggregation = "last"
    selection: Literal["argmax", "vote"] = Field(
        "argmax", description="argmax: follow the most visited children; vote: visit-weighted answer vote")


@dataclass(eq=False)
class Node:
    """One partial solution in the search tree, with its statistics."""

    particle: Particle
    parent: Node | None = field(default=None, repr=False)
    prior: float = 0.0  # v(s): PRM score at creation (0 for the root, or when scoring failed)
    outcome: float | None = None  # r(s) of a finished node
    depth: int = 0
    children: list[Node] = field(default_factory=list, repr=False)
    visits: int = 0
    total: float = 0.0
    expanded: bool = False
    dead: bool = False
    completion: Particle | None = None  # this node's rollout completion (rollout="sample")

    @property
    def q(self) -> float:
        return self.total / self.visits if self.visits else 0.0

    @property
    def terminal(self) -> bool:
        return self.particle.finished or self.dead

    @property
    def value(self) -> float:
        """The value of a terminal node: its outcome score, 0 when dead."""
        return 0.0 if self.dead or self.outcome is None else self.outcome


@dataclass
class Tree:
    """The state of one search: the root, the rollouts' leaves in order, completions found."""

    root: Node
    rollouts: int = 0
    expansions: int = 0
    size: int = 1
    exhausted: bool = False
    trace: list[Node] = field(default_factory=list)  # the evaluated leaf of each rollout
    completions: list[tuple[Particle, float]] = field(default_factory=list)  # (completion, outcome score)

    def nodes(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children)


def _exhausted(node: Node) -> bool:
    if node.terminal:
        return node.visits > 0
    return node.expanded and all(_exhausted(c) for c in node.children)


def _argmax(values: list[float], rng: np.random.Generator) -> int:
    """Index of the largest value; ties (within 1e-12) broken uniformly by rng."""
    best = max(values)
    tied = [i for i, v in enumerate(values) if v >= best - 1e-12]
    return tied[0] if len(tied) == 1 else tied[int(rng.integers(len(tied)))]


def _zero_nan(x: float) -> float:
    return 0.0 if not math.isfinite(x) else float(x)


@register
class MCTS(Strategy):
    name = "mcts"
    Params = MCTSParams
    needs_prm = True

    # -- the four phases ------------------------------------------------------------
    def select(self, root: Node, rng: np.random.Generator) -> list[Node]:
        """The path from the root to the node this rollout expands or evaluates."""
        path, node = [root], root
        while node.expanded and not node.terminal:
            node = self.uct_child(node, rng)
            path.append(node)
        return path

    def uct_child(self, node: Node, rng: np.random.Generator) -> Node:
        for child in node.children:
            if child.visits == 0:
                return child
        log_n, c = math.log(node.visits), self.params.c_puct
        return node.children[_argmax([ch.q + c * math.sqrt(log_n / ch.visits) for ch in node.children], rng)]

    async def expand(self, ctx: RunContext, node: Node, tree: Tree) -> None:
        proposed = await ctx.propose([node.particle] * self.params.children)
        distinct: dict[str, Particle] = {}
        for p in proposed.states:
            if p is not None:
                distinct.setdefault(p.text, p)
        kids = list(distinct.values())
        node.expanded, tree.expansions = True, tree.expansions + 1
        if not kids:
            node.dead = True
            return
        priors = [_zero_nan(s) for s in await ctx.prm_scores(kids)]
        outcomes = {i: priors[i] for i, p in enumerate(kids) if p.finished}
        if outcomes and ctx.outcome is not None:
            scored = await ctx.outcome_scores([kids[i] for i in outcomes])
            outcomes = {i: _zero_nan(s) for i, s in zip(outcomes, scored)}
        order = sorted(range(len(kids)), key=lambda i: -priors[i])
        node.children = [Node(kids[i], node, priors[i], outcomes.get(i), node.depth + 1) for i in order]
        tree.size += len(kids)

    async def evaluate(self, ctx: RunContext, leaf: Node, tree: Tree) -> float:
        if leaf.terminal:
            return leaf.value
        if self.params.rollout == "prm":
            return leaf.prior
        (done,) = await ctx.complete([leaf.particle])
        if done is None:
            return leaf.prior
        (score,) = await ctx.outcome_scores([done])
        leaf.completion = done
        tree.completions.append((done, _zero_nan(score)))
        return _zero_nan(score)

    @staticmethod
    def backpropagate(path: list[Node], value: float) -> None:
        for node in path:
            node.visits += 1
            node.total += value

    async def search(self, ctx: RunContext, budget: int) -> Tree:
        """Up to ``budget`` rollouts from the empty solution; fewer when the tree is exhausted."""
        tree = Tree(Node(Particle(ctx.problem)))
        for _ in range(budget):
            if _exhausted(tree.root):
                tree.exhausted = True
                break
            path = self.select(tree.root, ctx.rng)
            node = path[-1]
            if not node.terminal:
                await self.expand(ctx, node, tree)
                if node.children:
                    path.append(node.children[0])
            leaf = path[-1]
            self.backpropagate(path, await self.evaluate(ctx, leaf, tree))
            tree.rollouts += 1
            tree.trace.append(leaf)
        return tree

    # -- the answer -----------------------------------------------------------------
    @staticmethod
    def most_visited(root: Node, rng: np.random.Generator) -> Node:
        """The node reached by following the most visited child (ties: larger Q, then rng)."""
        node = root
        while True:
            kids = [c for c in node.children if c.visits > 0 and not c.dead]
            if not kids:
                return node
            most = max(c.visits for c in kids)
            kids = [c for c in kids if c.visits == most]
            node = kids[_argmax([c.q for c in kids], rng)]

    async def _run(self, ctx: RunContext, budget: int) -> Result:
        tree = await self.search(ctx, budget)
        found: list[tuple[Particle, float, float]] = [  # (solution, weight, score)
            (n.particle, float(n.visits), n.value) for n in tree.nodes() if n.particle.finished and n.visits
        ] + [(p, 1.0, s) for p, s in tree.completions]
        end = self.most_visited(tree.root, ctx.rng)
        answer = end.particle if end.particle.finished else end.completion
        final_completion = False
        if answer is None and not end.dead and (self.params.selection == "argmax" or not found):
            (answer,) = await ctx.complete([end.particle])
            if answer is not None:
                (score,) = await ctx.outcome_scores([answer])
                found.append((answer, 1.0, _zero_nan(score)))
                final_completion = True
        merged: dict[str, list] = {}  # text -> [solution, total weight, score]: copies are one candidate
        for p, w, score in found:
            merged.setdefault(p.text, [p, 0.0, score])[1] += w
        particles, weights, scores = (list(x) for x in zip(*merged.values())) if merged else ([], [], [])
        extras = {"rollouts": tree.rollouts, "expansions": tree.expansions, "tree_size": tree.size,
                  "max_depth": max(n.depth for n in tree.nodes()), "exhausted": tree.exhausted,
                  "final_completion": final_completion}
        result = self.result(ctx, budget, particles, weights, selection=self.params.selection, scores=scores,
                             extras=extras)
        if self.params.selection == "argmax" and result.ok and answer is not None:
            result = dataclasses.replace(result, answer=answer_of(answer), solution=answer.text)
        return result
