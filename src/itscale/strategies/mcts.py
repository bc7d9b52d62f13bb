r"""Monte Carlo tree search (UCT) over reasoning steps, with PRM values or sampled rollouts.

After the MCTS of OpenR (``reason/guided_search/tree.py``, PRM-guided value search) and LLM
Reasoners (``reasoners/algorithm/mcts.py``), written for this library's ``RunContext``, with
optional progressive widening (Coulom 2007; Couëtoux et al. 2011).

The tree
--------
A node s is a partial solution (a :class:`~itscale.types.Particle`); the root is the empty
solution. Each node keeps its visit count N(s), its total value W(s), its mean value
Q(s) = W(s)/N(s) (0 while N(s) = 0), its prior v(s): the aggregated PRM score of s when it
was created (``aggregation``; a failed score counts 0), and D(s), the number of next steps
sampled from it so far (its *draws*). A *finished* node (the format's ``is_final``) is
terminal and is never expanded; its value is its outcome score r(s) (``ctx.outcome_scores``:
the outcome scorer if one is configured, else the PRM score, which is then v(s) and is not
asked for twice). A node whose draws produced nothing (every proposal failed) is *dead*:
terminal, value 0.

How many next steps a node may draw
-----------------------------------
A node may have drawn at most

    m(N) = ceil(k · N^α)        (computed as ceil(k·N^α − 1e-9): no rounding up of an integer)

next steps once it has been visited N times, with α = ``widening`` and k = ``widening_k``
(``children`` when unset). Its children are its distinct draws, so it has at most m(N(s))
children. ``widening=None`` is α = 0 and k = ``children``: m = ``children`` at every N, so a
node draws ``children`` steps once, on its first expansion, and never again (OpenR and LLM
Reasoners). With α > 0, m grows without bound (progressive widening): a node whose first
draws all missed the right step gets more draws as it is visited, and the search keeps
growing the tree instead of running out of nodes. For k ≤ 1 and α ≤ 1, m rises by at most
1 per visit, so a node that has caught up draws one new step exactly at the visits where m
rises (N = 1, 2, 5, 10, 17, … for k = 1, α = 1/2).

The default is α = 1/2 with k = ``children`` = 3 (m(N) = 3, 5, 6, 6, 7, 8, 8, 9, 9, 10 for
N = 1..10), chosen by measurement: on the embedded pair (100 held-out medium problems,
temperature 0.8, ``aggregation="min"``) it answers 68%, 77%, 81%, 83% at budgets 8, 16, 32,
64, where one expansion of 3 (``widening=None``) stays at 55-56%, and it is more accurate at
equal tokens too; k = 1 and α = 1/4 gained less (README, "Scaling study").

One rollout
-----------
The budget is the number of rollouts. One rollout walks down from the root; at each node s
on the way (this rollout will be its visit number N(s) + 1):

1. **Terminal**: s is the leaf.
2. **Widening**, when D(s) < m(N(s) + 1): s draws m(N(s) + 1) − D(s) next steps with ONE
   ``ctx.propose`` call (copies of s: one request with k > 1), and D(s) += that many
   (failed ones included). Failed proposals are dropped, and a step equal to another draw or
   to an existing child adds nothing (a node is a partial solution: two copies would be one
   state split in two). The new distinct steps are scored with ONE ``ctx.prm_scores`` call
   (and one ``ctx.outcome_scores`` call for the finished ones, only when an outcome scorer is
   configured) and become children; s's children stay ordered by prior, highest first (ties:
   older first, then sampling order). If there is a new child, the one of highest prior is
   the leaf. If there is none and s has no child, s is dead and is the leaf. If there is none
   but s has children (every draw repeated one, or failed), the walk goes on as in 3.
3. **Selection** (otherwise): go to the child

       a(s) = argmax_c  Q(c) + c_puct · sqrt( ln N(s) / N(c) ),

   except that an unvisited child (N(c) = 0) is taken first, in the children's order; ties of
   the UCT value (within 1e-12) are broken uniformly by the run's rng.

Then:

4. **Evaluation** of the leaf ℓ:
   - a finished node: its outcome score r(ℓ); a dead node: 0;
   - ``rollout="prm"``: v(ℓ), its PRM score (value-function MCTS: the PRM is the value network);
   - ``rollout="sample"``: ℓ's partial solution is completed by sampling to the end (ONE
     ``ctx.complete`` call, one ``stop=()`` request split into steps) and the value is the outcome
     score r(x̂) of that completion x̂ (one ``ctx.outcome_scores`` call); a failed completion
     falls back to v(ℓ).
5. **Backpropagation**: for every node u on the path root → ℓ: N(u) += 1, W(u) += value.
   So Q(u) is the mean of the values of the rollouts that passed through u.

After the rollout, every node u it passed through (ℓ excepted) has D(u) = m(N(u)): a node is
caught up whenever it is passed, so the bound is met with equality, not only kept. A new leaf
is created with N = 1 and D = 0, so its first expansion, at its second visit, draws m(2)
steps (``children`` without widening).

What the budget counts: rollouts, and nothing else. Every draw a rollout makes (at most one
widening call per node on its path, so at most one per depth when draws repeat existing
children; exactly one without widening) is part of that rollout, as is its completion with
``rollout="sample"``; a rollout that ends at a finished node (re-visiting a solution) costs no
model call. The tokens of every draw, repeated or failed ones included, are in the cost. The
final completion with ``rollout="prm"`` (below) is one more policy call outside the rollouts.

The search stops early when the tree is *exhausted*: every finished node visited, and no
node can draw again (without widening: every node expanded; with α > 0 a non-terminal node
always can, so only a dead root ends it): further rollouts would only re-visit finished
solutions (``extras["exhausted"]``).

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

``extras``: ``rollouts`` (≤ budget), ``expansions`` (policy calls that drew next steps:
first expansions and widenings), ``tree_size`` (nodes, root included), ``max_depth`` (steps
of the deepest node), ``exhausted`` and ``final_completion``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from ..types import Particle, Result
from .base import Aggregation, Params, Strategy, register
from .context import RunContext, answer_of


class MCTSParams(Params):
    children: int = Field(3, ge=1, description="next steps a node draws (one request) on its only expansion, without "
                                               "widening; with widening, k when widening_k is unset")
    c_puct: float = Field(1.0, gt=0, description="UCT exploration constant: Q(c) + c_puct·sqrt(ln N(s)/N(c))")
    rollout: Literal["prm", "sample"] = Field(
        "prm", description="a new leaf's value: its PRM score, or the outcome score of a sampled completion")
    aggregation: Aggregation = "last"
    selection: Literal["argmax", "vote"] = Field(
        "argmax", description="argmax: follow the most visited children; vote: visit-weighted answer vote")
    widening: float | None = Field(
        0.5, ge=0, le=1, description="progressive widening exponent α: a node visited N times has drawn at most "
                                     "ceil(k·N^α) next steps; None: one expansion of `children` steps, never widened")
    widening_k: float | None = Field(None, gt=0, description="k of progressive widening (default: children)")

    @field_validator("widening_k")
    @classmethod
    def _only_with_widening(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("widening", 0) is None:
            raise ValueError("widening_k is the k of progressive widening: set widening (the exponent α) too")
        return value


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
    draws: int = 0  # D(s): next steps sampled from this node so far (failed and repeated ones included)
    dead: bool = False
    completion: Particle | None = None  # this node's rollout completion (rollout="sample")

    @property
    def q(self) -> float:
        return self.total / self.visits if self.visits else 0.0

    @property
    def expanded(self) -> bool:
        return self.draws > 0

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

    # -- how many next steps a node may draw -------------------------------------------
    @property
    def exponent(self) -> float:
        """α: ``widening``, or 0 without widening."""
        return 0.0 if self.params.widening is None else self.params.widening

    @property
    def coefficient(self) -> float:
        """k: ``widening_k``, or ``children`` when unset (always without widening)."""
        return float(self.params.children if self.params.widening_k is None else self.params.widening_k)

    def allowed(self, visits: int) -> int:
        """m(N) = ceil(k·N^α): the draws a node visited N times may have made."""
        return max(0, math.ceil(self.coefficient * visits ** self.exponent - 1e-9))

    def can_grow(self, node: Node) -> bool:
        """Whether a later visit may still draw from ``node``: m is unbounded when α > 0."""
        return not node.terminal and (self.exponent > 0 or node.draws < self.allowed(1))

    def exhausted(self, node: Node) -> bool:
        """Every finished node below ``node`` visited and no node below it able to draw again."""
        if node.terminal:
            return node.visits > 0
        return not self.can_grow(node) and all(self.exhausted(c) for c in node.children)

    # -- the four phases ------------------------------------------------------------
    async def select(self, ctx: RunContext, tree: Tree) -> list[Node]:
        """One rollout's path from the root to its leaf: widen a node whose bound allows it
        (ending at its best new child), otherwise take its UCT child; stop at a terminal node."""
        path, node = [tree.root], tree.root
        while not node.terminal:
            if node.draws < self.allowed(node.visits + 1):
                new = await self.widen(ctx, node, tree)
                if new is not None:
                    path.append(new)
                    break
                if node.dead:
                    break
            node = self.uct_child(node, ctx.rng)
            path.append(node)
        return path

    def uct_child(self, node: Node, rng: np.random.Generator) -> Node:
        for child in node.children:
            if child.visits == 0:
                return child
        log_n, c = math.log(node.visits), self.params.c_puct
        return node.children[_argmax([ch.q + c * math.sqrt(log_n / ch.visits) for ch in node.children], rng)]

    async def widen(self, ctx: RunContext, node: Node, tree: Tree) -> Node | None:
        """Draw m(N(s) + 1) − D(s) next steps from ``node`` in one request; its new distinct
        steps become children. Returns the new child of highest prior, or None (no new step;
        the node is then dead if it has no child at all)."""
        n = self.allowed(node.visits + 1) - node.draws
        proposed = await ctx.propose([node.particle] * n)
        node.draws, tree.expansions = node.draws + n, tree.expansions + 1
        known = {c.particle.text for c in node.children}
        distinct: dict[str, Particle] = {}
        for p in proposed.states:
            if p is not None and p.text not in known:
                distinct.setdefault(p.text, p)
        kids = list(distinct.values())
        if not kids:
            node.dead = not node.children
            return None
        priors = [_zero_nan(s) for s in await ctx.prm_scores(kids)]
        outcomes = {i: priors[i] for i, p in enumerate(kids) if p.finished}
        if outcomes and ctx.outcome is not None:
            scored = await ctx.outcome_scores([kids[i] for i in outcomes])
            outcomes = {i: _zero_nan(s) for i, s in zip(outcomes, scored)}
        order = sorted(range(len(kids)), key=lambda i: -priors[i])
        new = [Node(kids[i], node, priors[i], outcomes.get(i), node.depth + 1) for i in order]
        node.children = sorted(node.children + new, key=lambda c: -c.prior)  # stable: older first on ties
        tree.size += len(kids)
        return new[0]

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
            if self.exhausted(tree.root):
                tree.exhausted = True
                break
            path = await self.select(ctx, tree)
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
