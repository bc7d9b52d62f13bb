"""MCTS (UCT over reasoning steps): the rollout count, the exact UCT order on a tiny tree,
backpropagation, accuracy with a perfect PRM, sampled rollouts, failures, reproducibility;
progressive widening: the draw bound ceil(k·N^α) node by node and rollout by rollout, its
hand-computed order on the tiny tree, and widening=None as the MCTS before widening."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math

import numpy as np
import pytest

from itscale.strategies import STRATEGIES, make_strategy
from itscale.strategies.mcts import MCTS
from itscale.testing import SimulatedTask
from itscale.types import (
    Capabilities,
    Particle,
    Problem,
    SamplingParams,
    Step,
    StepFormat,
    StepScores,
)

FORMAT = StepFormat(delimiter="\n\n", max_steps=12)
SAMPLING = SamplingParams(temperature=1.0)


@pytest.fixture(scope="module")
def task():
    return SimulatedTask(n_problems=12, seed=3, depth=(2, 3), branching=3, p_correct=0.6)


def mcts(task, policy=None, prm_noise=0.0, **params):
    return make_strategy("mcts", policy or task.policy(), task.prm(noise=prm_noise, seed=1),
                         format=FORMAT, sampling=SAMPLING, **params)


class Counting:
    """Wraps a policy; records the continuations asked for in each call."""

    def __init__(self, inner):
        self.inner, self.capabilities, self.per_call = inner, inner.capabilities, []

    async def generate_steps(self, requests):
        self.per_call.append([r.k for r in requests])
        return await self.inner.generate_steps(requests)


# -- a tiny deterministic tree ------------------------------------------------------------
#
#   root ─ A (PRM .6) ─ A1 "\boxed{1}" (.2), A2 "\boxed{2}" (.9)
#        └ B (PRM .4) ─ B1 "\boxed{3}" (.9), B2 "\boxed{4}" (.7)
#
# The policy returns each node's children in a fixed order (B before A at the root, so the
# prior ordering is exercised); the PRM scores each step with the fixed value above.

A, B = "A\n\n", "B\n\n"
A1, A2, B1, B2 = "A1 \\boxed{1}", "A2 \\boxed{2}", "B1 \\boxed{3}", "B2 \\boxed{4}"
TREE = {"": [B, A], A: [A1, A2], B: [B1, B2]}
COMPLETION = {A: A2, B: B1}  # what a stop=() request after A or B returns
VALUE = {A: 0.6, B: 0.4, A1: 0.2, A2: 0.9, B1: 0.9, B2: 0.7}
TOY = Problem("toy", "a toy problem")


class ToyPolicy:
    capabilities = Capabilities(n_per_request=True)

    def __init__(self, tree=None):
        self.tree, self.prefixes = tree or TREE, []

    async def generate_steps(self, requests):
        out = []
        for r in requests:
            self.prefixes.append(r.prefix)
            kids = self.tree[r.prefix] if r.stop else [COMPLETION[r.prefix]]
            texts = [kids[c % len(kids)] for c in range(r.k)]
            out.append([Step(t, 1, finish_reason="eos" if "boxed" in t else "stop") for t in texts])
        return out


class ToyPRM:
    capabilities = Capabilities()

    def __init__(self, values=None):
        self.values = values or VALUE

    async def score_steps(self, requests):
        return [StepScores(tuple(self.values[s] for s in r.steps), 1) for r in requests]


def toy_search(budget, **params):
    policy = ToyPolicy()
    s = make_strategy("mcts", policy, ToyPRM(), format=FORMAT, children=2, c_puct=1.0, widening=None, **params)
    tree = asyncio.run(s.search(s.context(TOY, np.random.default_rng(0)), budget))
    nodes = {n.particle.steps[-1].text if n.particle.steps else "": n for n in tree.nodes()}
    return policy, tree, nodes


def test_uct_visits_the_tiny_tree_in_the_hand_computed_order():
    """The rollouts, by hand (c_puct = 1, values Q; ln N(root) after t rollouts):

    1. root unexpanded: expand it, children ordered by prior A (.6), B (.4); leaf A, value .6
    2. root: B unvisited; expand B → B1 (.9), B2 (.7); leaf B1 (finished), value .9
    3. A: .6 + √(ln2/1) = 1.433 < B: .9 + √(ln2/1) = 1.733 → B; B2 unvisited → value .7
    4. A: .6 + √(ln3/1) = 1.648 > B: .8 + √(ln3/2) = 1.541 → A (Q alone would take B);
       expand A → A2 (.9), A1 (.2); leaf A2, value .9
    5. A: .75 + √(ln4/2) = 1.583 < B: .8 + √(ln4/2) = 1.633 → B; B1: .9 + √(ln2) > B2: .7 + √(ln2)
       → B1 again (a finished node is re-visited, no model call), value .9
    6. A: .75 + √(ln5/2) = 1.647 > B: .833 + √(ln5/3) = 1.566 → A; A1 unvisited → value .2
    7. every node visited and nothing left to expand: the tree is exhausted, the search stops.
    """
    policy, tree, nodes = toy_search(10)
    assert [n.particle.steps[-1].text for n in tree.trace] == [A, B1, B2, A2, B1, A1]
    assert policy.prefixes == ["", B, A]  # one expansion per rollout that reached an unexpanded node
    assert tree.rollouts == 6 and tree.exhausted and tree.expansions == 3 and tree.size == 7
    visits = {k: n.visits for k, n in nodes.items()}
    assert visits == {"": 6, A: 3, B: 3, A1: 1, A2: 1, B1: 2, B2: 1}
    # backpropagation: W(u) is the sum, Q(u) the mean, of the leaf values of the rollouts through u
    leaf_values = [0.6, 0.9, 0.7, 0.9, 0.9, 0.2]
    assert nodes[""].total == pytest.approx(sum(leaf_values)) and nodes[""].q == pytest.approx(np.mean(leaf_values))
    assert nodes[A].total == pytest.approx(0.6 + 0.9 + 0.2) and nodes[B].q == pytest.approx((0.9 + 0.7 + 0.9) / 3)
    assert nodes[B1].total == pytest.approx(1.8)
    for node in tree.nodes():  # every visit of a node is one of its children's, or its own leaf evaluation
        own = sum(1 for leaf in tree.trace if leaf is node)
        assert node.visits == own + sum(c.visits for c in node.children)


def test_the_answer_follows_the_most_visited_children_and_candidates_weigh_their_visits():
    s = make_strategy("mcts", ToyPolicy(), ToyPRM(), format=FORMAT, children=2, widening=None)
    r = s.solve(TOY, 10, seed=0)
    # root: A and B both have 3 visits → the larger Q (B: .833 > A: .567); then B1 (2 visits > 1)
    assert r.solution == "B\n\nB1 \\boxed{3}" and r.answer == "3"
    weights = {c.text.split("\n\n")[-1]: c.weight for c in r.candidates}
    assert weights == pytest.approx({A1: 0.2, A2: 0.2, B1: 0.4, B2: 0.2})  # N(f) / ΣN, f finished
    assert {c.answer: c.score for c in r.candidates} == pytest.approx({"1": 0.2, "2": 0.9, "3": 0.9, "4": 0.7})
    assert r.extras == {"rollouts": 6, "expansions": 3, "tree_size": 7, "max_depth": 2, "exhausted": True,
                        "final_completion": False}
    assert r.cost.policy_calls == 3 and r.cost.prm_calls == 3


def test_without_a_finished_node_below_it_the_answer_is_completed_from_the_most_visited_leaf():
    """Budget 1 on the toy tree: the root is expanded and A evaluated; nothing is finished, so
    A is completed by one more sampled completion (a stop=() request)."""
    policy = ToyPolicy()
    r = make_strategy("mcts", policy, ToyPRM(), format=FORMAT, children=2).solve(TOY, 1, seed=0)
    assert r.extras["rollouts"] == 1 and r.extras["final_completion"]
    assert r.solution == A + A2 and r.cost.policy_calls == 2 and policy.prefixes == ["", A]


def test_the_answer_is_the_most_visited_path_not_the_heaviest_solution():
    """root ─ A (.9) ─ A1 (.8), A2 (.8);  root ─ B (.5) ─ B1 (.7), sampled twice (one child).
    Rollouts: A; B → B1; A (1.733 > 1.533) → A1; B (.7 + √(ln3/1) = 1.748 > .85 + √(ln3/2) = 1.591)
    → B1 again; A (1.683 > 1.533) → A2; exhausted. N(A) = 3 > N(B) = 2, so the answer is under A
    (A1 or A2, one visit each, equal Q: the rng decides), though B1 alone has the most visits (2)."""
    a1, a2, b1 = "A1 \\boxed{1}", "A2 \\boxed{1}", "B1 \\boxed{7}"
    tree = {"": [A, B], A: [a1, a2], B: [b1]}
    values = {A: 0.9, B: 0.5, a1: 0.8, a2: 0.8, b1: 0.7}
    for seed in range(4):
        r = make_strategy("mcts", ToyPolicy(tree), ToyPRM(values), format=FORMAT, children=2,
                          widening=None).solve(TOY, 10, seed=seed)
        assert r.extras["rollouts"] == 5 and r.extras["exhausted"]
        assert r.solution in (A + a1, A + a2) and r.answer == "1"
        assert max(r.candidates, key=lambda c: c.weight).text == B + b1  # weight 2/4


# -- rollouts and calls --------------------------------------------------------------------

@pytest.mark.parametrize("budget", [1, 5, 8])
def test_each_rollout_expands_once_with_one_policy_and_one_prm_call(budget):
    deep = SimulatedTask(n_problems=1, seed=0, depth=(10, 10), branching=3)  # no solution finishes in 8 rollouts
    policy = Counting(deep.policy())
    s = make_strategy("mcts", policy, deep.prm(), format=FORMAT, sampling=SAMPLING, children=3, widening=None)
    ctx = s.context(deep.problems[0], np.random.default_rng(0))
    tree = asyncio.run(s.search(ctx, budget))
    assert tree.rollouts == tree.expansions == budget and not tree.exhausted
    assert ctx.cost.policy_calls == ctx.cost.prm_calls == budget
    assert policy.per_call == [[3]] * budget  # k copies of one node: one request with k = 3
    for node in tree.nodes():  # identical sampled steps are one child; children by prior, best first
        texts = [c.particle.text for c in node.children]
        assert len(set(texts)) == len(texts) and 1 <= len(texts) <= 3 or not node.expanded
        assert [c.prior for c in node.children] == sorted((c.prior for c in node.children), reverse=True)


def test_sampled_rollouts_complete_each_new_leaf_and_score_the_completion(task):
    policy = Counting(task.policy())
    s = mcts(task, policy=policy, rollout="sample", widening=None)
    problem = task.problems[0]
    ctx = s.context(problem, np.random.default_rng(1))
    tree = asyncio.run(s.search(ctx, 6))
    evaluated = [leaf for leaf in tree.trace if not leaf.particle.finished]
    assert len(tree.completions) == len(evaluated) > 0
    for leaf, (done, score) in zip(evaluated, tree.completions):
        assert leaf.completion is done and done.finished and done.text.startswith(leaf.particle.text)
        assert done.step_texts[:leaf.particle.n_steps] == leaf.particle.step_texts
        assert score == pytest.approx(task.prm().score(problem, done.step_texts))  # outcome = PRM (no scorer)
    # per rollout: an expansion (k = 3) and a completion (k = 1) of the new leaf
    assert ctx.cost.policy_calls == tree.expansions + len(tree.completions)
    assert sorted(map(tuple, policy.per_call)) == sorted([(3,)] * tree.expansions + [(1,)] * len(tree.completions))


def test_finished_nodes_are_valued_by_the_outcome_scorer(task):
    problem = task.problems[4]
    s = make_strategy("mcts", task.policy(), task.prm(noise=2.0, seed=1), outcome=task.verifier(),
                      format=FORMAT, sampling=SAMPLING)
    ctx = s.context(problem, np.random.default_rng(0))
    tree = asyncio.run(s.search(ctx, 16))
    finished = [n for n in tree.nodes() if n.particle.finished]
    assert finished
    for n in finished:
        assert n.outcome == float(task.is_correct(problem, n.particle.text))
    for leaf in tree.trace:
        if leaf.particle.finished:  # the path to it was backed up with r(leaf), not its PRM score
            assert leaf.q == leaf.outcome


def test_the_search_stops_when_the_tree_is_exhausted():
    tiny = SimulatedTask(n_problems=1, seed=2, depth=(1, 1), branching=2)
    s = make_strategy("mcts", tiny.policy(), tiny.prm(), format=FORMAT, sampling=SAMPLING, children=2, widening=None)
    r = s.solve(tiny.problems[0], 50, seed=0)
    # at most root + 2 children + 2 answers: every node visited within 1 + 2 + 2 rollouts
    assert r.ok and r.extras["exhausted"] and r.extras["rollouts"] <= 5
    assert r.cost.policy_calls == r.extras["expansions"] <= 3


def test_a_node_whose_every_proposal_failed_is_dead_and_the_run_says_why(task):
    s = mcts(task, policy=task.policy(fail_rate=1.0))
    r = s.solve(task.problems[0], 8, seed=0)
    assert r.status == "error" and "simulated failure" in r.message
    assert r.extras["rollouts"] == 1 and r.extras["exhausted"] and r.cost.policy_calls == 1
    flaky = mcts(task, policy=task.policy(fail_rate=0.5))
    results = [flaky.solve(p, 16, seed=i) for i, p in enumerate(task.problems[:6])]
    assert all(r.ok and r.answer is not None for r in results)
    assert all(r.extras["rollouts"] <= 16 for r in results)


def test_budget_is_any_positive_integer(task):
    s = mcts(task)
    assert s.budgets_up_to(7) == [1, 2, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="budget must be a positive integer"):
        s.solve(task.problems[0], 0)


# -- accuracy --------------------------------------------------------------------------------

def test_with_a_perfect_prm_mcts_beats_greedy_and_the_policy(task, report_statistic):
    problems = task.problems
    base = np.mean([task.accuracy(p) for p in problems])
    greedy = make_strategy("greedy", task.policy(), format=FORMAT, sampling=SAMPLING)
    greedy_acc = np.mean([task.is_correct(p, greedy.solve(p, 1, seed=i).solution) for i, p in enumerate(problems)])
    s = mcts(task)
    acc = np.mean([task.is_correct(p, s.solve(p, 16, seed=i).solution) for i, p in enumerate(problems)])
    report_statistic("mcts-16", "accuracy", acc, f"greedy {greedy_acc:.3f}, policy {base:.3f}")
    assert acc >= greedy_acc + 0.2 and acc >= base + 0.4


def test_sampled_rollouts_run_end_to_end_and_answer_with_a_completed_solution(task):
    s = mcts(task, rollout="sample")
    results = [s.solve(p, 16, seed=i) for i, p in enumerate(task.problems)]
    for p, r in zip(task.problems, results):
        assert r.ok and r.extras["rollouts"] <= 16
        chosen = next(c for c in r.candidates if c.text == r.solution)
        assert chosen.particle.finished and "\\boxed{" in r.solution and r.answer is not None
        assert all(c.particle.finished for c in r.candidates)
        assert sum(c.weight for c in r.candidates) == pytest.approx(1.0)
    acc = np.mean([task.is_correct(p, r.solution) for p, r in zip(task.problems, results)])
    assert acc >= np.mean([task.accuracy(p) for p in task.problems]) + 0.3


def test_vote_answers_with_the_answer_of_most_rollouts(task):
    r = mcts(task, selection="vote").solve(task.problems[2], 16, seed=0)
    totals: dict[str, float] = {}
    for c in r.candidates:
        totals[c.answer] = totals.get(c.answer, 0.0) + c.weight
    assert r.ok and totals[r.answer] == max(totals.values())


# -- the rest --------------------------------------------------------------------------------

def test_results_are_reproducible_from_a_seed(task):
    for params in ({}, {"rollout": "sample", "selection": "vote"}):
        s = mcts(task, prm_noise=0.5, **params)
        a, b = (s.solve(task.problems[6], 8, seed=11) for _ in range(2))
        assert a.solution == b.solution and a.cost.generated_tokens == b.cost.generated_tokens
        assert [(c.text, c.weight) for c in a.candidates] == [(c.text, c.weight) for c in b.candidates]
        others = {s.solve(task.problems[6], 8, seed=k).cost.generated_tokens for k in range(12, 16)}
        assert len(others | {a.cost.generated_tokens}) > 1


@pytest.mark.parametrize("params, match", [
    ({"c_puct": 0.0}, "mcts.c_puct"),
    ({"c_puct": -1.0}, "mcts.c_puct"),
    ({"children": 0}, "mcts.children"),
    ({"rollout": "random"}, "mcts.rollout"),
    ({"selection": "sample"}, "mcts.selection"),
    ({"aggregation": "max"}, "mcts.aggregation"),
    ({"cpuct": 1.0}, "mcts.cpuct"),
    ({"widening": -0.1}, "mcts.widening: "),
    ({"widening": 1.5}, "mcts.widening: "),
    ({"widening": "fast"}, "mcts.widening: "),
    ({"widening": 0.5, "widening_k": 0}, "mcts.widening_k: "),
    ({"widening": 0.5, "widening_k": -1.0}, "mcts.widening_k: "),
    ({"widening": None, "widening_k": 2.0}, "mcts.widening_k: .*set widening"),
])
def test_bad_parameters_name_the_field(task, params, match):
    with pytest.raises(ValueError, match=match):
        mcts(task, **params)


def test_mcts_is_registered_and_needs_a_reward_model(task):
    assert STRATEGIES["mcts"].needs_prm
    with pytest.raises(ValueError, match="needs a reward model"):
        make_strategy("mcts", task.policy())


def test_complete_continues_particles_to_the_end(task):
    """RunContext.complete: copies of one particle share one k>1 stop=() request; a finished
    particle passes through without a request."""
    s = mcts(task)
    problem = task.problems[1]
    ctx = s.context(problem, np.random.default_rng(0))
    text, _, _ = task.children(problem, [])[0]
    start = Particle(problem).extend(Step(text), False)
    policy = Counting(task.policy())
    ctx.policy = policy
    done = asyncio.run(ctx.complete([start, start, start]))
    assert policy.per_call == [[3]] and ctx.cost.policy_calls == 1
    for d in done:
        assert d.finished and d.steps[0] is start.steps[0] and "\\boxed{" in d.steps[-1].text
        assert len(task.children(problem, d.step_texts)) == 0  # a whole solution of the tree
    assert asyncio.run(ctx.complete(done[:1]))[0] is done[0] and len(policy.per_call) == 1
    assert math.isfinite(ctx.cost.generated_tokens) and ctx.cost.generated_tokens > 0


def test_the_server_runs_mcts_by_name_and_alias():
    from itscale.serve.config import Limits, ServeConfig
    from itscale.serve.engine import Engine
    from itscale.serve.jobs import parse_body, resolve

    task = SimulatedTask(n_problems=1, seed=3)
    engine = Engine(task.policy(), task.prm(noise=0.5), StepFormat(delimiter=task.delimiter), "sim")
    problem = task.problems[0]
    for fields in ({"model": "sim:uct-8"}, {"model": "sim", "itscale": {"method": "tree-search", "budget": 8}},
                   {"model": "sim:mcts", "itscale": {"budget": 8, "params": {"c_puct": 0.5, "rollout": "sample"}}}):
        body = {"messages": [{"role": "user", "content": problem.prompt}], "seed": 1, **fields}
        job = resolve(parse_body("chat", body), job_id=problem.id, config=ServeConfig(), base_model="sim",
                      limits=Limits(max_budget=32, max_tokens=100), key_name="k", prm_enabled=True)
        result = asyncio.run(engine.run(engine.prepare(job)))
        assert result.method == "mcts" and result.budget == 8 and result.ok and result.extras["rollouts"] <= 8


# -- progressive widening ----------------------------------------------------------------------

def bound(k, alpha, visits):
    """m(N) = ceil(k·N^α), written out independently of the strategy's own ``allowed``."""
    return max(0, math.ceil(k * visits ** alpha - 1e-9))


class FreshPolicy:
    """Every draw is a step no earlier draw from its prefix gave (unboundedly many next steps):
    the j-th draw from a prefix of d < depth steps is "s<d>.<j>", from one of ``depth`` steps the
    answer "\\boxed{j}". Records each request's (prefix, k)."""

    capabilities = Capabilities(n_per_request=True)

    def __init__(self, depth=3):
        self.depth, self.drawn, self.requests = depth, {}, []

    async def generate_steps(self, requests):
        out = []
        for r in requests:
            assert r.stop, "the search itself only asks for steps"
            self.requests.append((r.prefix, r.k))
            d, first = r.prefix.count("\n\n"), self.drawn.get(r.prefix, 0)
            self.drawn[r.prefix] = first + r.k
            out.append([Step(f"s{d}.{j}\n\n", 1) if d < self.depth else Step(f"\\boxed{{{j}}}", 1, finish_reason="eos")
                        for j in range(first, first + r.k)])
        return out


class HashPRM:
    """A fixed score in (0.05, 0.95) per prefix, from a hash of its steps."""

    capabilities = Capabilities()

    async def score_steps(self, requests):
        def score(steps):
            return 0.05 + 0.9 * (int(hashlib.sha256("".join(steps).encode()).hexdigest()[:8], 16) / 16**8)
        return [StepScores(tuple(score(r.steps[:i + 1]) for i in range(len(r.steps))), 1) for r in requests]


class Watched(MCTS):
    """MCTS that hands each rollout's path, after backpropagation, to ``self.watch``."""

    watch = None

    def backpropagate(self, path, value):
        MCTS.backpropagate(path, value)
        self.watch(path)


class NeverWidens(Watched):
    """Broken: a node draws ceil(k) steps once and never again (widening that adds no child)."""

    def allowed(self, visits):
        return math.ceil(self.coefficient - 1e-9)


class Unbounded(Watched):
    """Broken: a node draws one more step at every visit, whatever the bound says."""

    def allowed(self, visits):
        return visits


def check_widening(cls, k, alpha, budget=40, children=3):
    """Run ``budget`` rollouts of ``cls`` on FreshPolicy (every draw a new child) and check,
    after every rollout: each node has as many children as draws; a node some rollout passed
    through has drawn exactly m(N) = ceil(k·N^α) steps, any other none; the root drew at
    rollout t exactly when m(t) > m(t − 1), m(t) − m(t − 1) steps in one request."""
    policy = FreshPolicy()
    widening = {"widening": alpha, **({} if k is None else {"widening_k": k})}
    s = cls(policy, HashPRM(), format=FORMAT, children=children, **widening)
    k = children if k is None else k
    alpha = 0.0 if alpha is None else alpha
    passed, t = set(), 0

    def watch(path):
        nonlocal t
        t += 1
        passed.update(id(u) for u in path[:-1])
        for u in tree_of(path[0]):
            if u.particle.finished:
                continue
            assert len(u.children) == u.draws, "every draw of FreshPolicy is a new child"
            expected = bound(k, alpha, u.visits) if id(u) in passed else 0
            assert u.draws == expected, f"rollout {t}: {u.particle.text!r} visited {u.visits}: {u.draws} draws, " \
                                        f"m(N) = {expected}"
        assert path[0].draws == bound(k, alpha, t)

    s.watch = watch
    tree = asyncio.run(s.search(s.context(TOY, np.random.default_rng(0)), budget))
    assert t == tree.rollouts and (tree.rollouts == budget if alpha > 0 else tree.rollouts <= budget)
    drawn_at_root = [kk for prefix, kk in policy.requests if prefix == ""]
    increases = [bound(k, alpha, n) - (bound(k, alpha, n - 1) if n > 1 else 0) for n in range(1, t + 1)]
    assert drawn_at_root == [d for d in increases if d > 0]
    return tree


def tree_of(root):
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children)


@pytest.mark.parametrize("k, alpha", [(1, 0.5), (2, 0.5), (0.5, 0.7), (1.5, 0.3), (None, 0.5), (None, None), (2, 0.0)])
def test_a_node_draws_exactly_ceil_k_n_to_the_alpha_steps_as_its_visits_grow(k, alpha):
    tree = check_widening(Watched, k, alpha)
    k = 3 if k is None else k
    if alpha:  # the bound keeps rising: the root's children keep coming
        assert len(tree.root.children) == bound(k, alpha, 40) > bound(k, alpha, 8)


def test_widening_that_never_adds_a_child_or_ignores_the_bound_fails_the_check():
    check_widening(Watched, 1, 0.5)
    for broken in (NeverWidens, Unbounded):
        with pytest.raises(AssertionError):
            check_widening(broken, 1, 0.5)


def test_with_k_1_and_alpha_one_half_the_root_draws_one_step_at_visits_1_2_5_10_17_26_37():
    """m(N) = ceil(√N) rises at N = 1, 2, 5, 10, 17, 26, 37 (N = j² + 1 after the first): the
    root, visited once per rollout, draws one step in those rollouts and in no other."""
    policy = FreshPolicy()
    s = Watched(policy, HashPRM(), format=FORMAT, widening=0.5, widening_k=1)
    root_draws = []  # D(root) after each rollout
    s.watch = lambda path: root_draws.append(path[0].draws)
    asyncio.run(s.search(s.context(TOY, np.random.default_rng(3)), 40))
    grew = [t for t in range(1, 41) if root_draws[t - 1] > ([0] + root_draws)[t - 1]]
    assert grew == [1, 2, 5, 10, 17, 26, 37]
    assert [k for prefix, k in policy.requests if prefix == ""] == [1] * 7


class CyclingPolicy(ToyPolicy):
    """The toy tree's children of a prefix in turn: the j-th draw from a prefix is its child j mod #children."""

    def __init__(self, tree=None):
        super().__init__(tree)
        self.drawn, self.requests = {}, []

    async def generate_steps(self, requests):
        out = []
        for r in requests:
            self.requests.append((r.prefix, r.k))
            kids, first = self.tree[r.prefix], self.drawn.get(r.prefix, 0)
            self.drawn[r.prefix] = first + r.k
            texts = [kids[j % len(kids)] for j in range(first, first + r.k)]
            out.append([Step(t, 1, finish_reason="eos" if "boxed" in t else "stop") for t in texts])
        return out


def test_widening_visits_the_tiny_tree_in_the_hand_computed_order():
    """k = 1, α = 1/2: m(N) = 1, 2, 2, 3, 3, 3, 3, 3 for N = 1..8; c_puct = 1. The policy gives a
    node's children in turn (root: B, A, B, …; A: A1, A2, …; B: B1, B2, B1, …).

    1. root N=0, m(1)=1 > D=0: draw 1 → B (.4), new: leaf B, value .4
    2. root N=1, m(2)=2 > 1: draw 1 → A (.6), new: children A, B; leaf A, value .6
    3. root m(3)=2 = D: UCT A .6 + √(ln2) = 1.433 > B .4 + √(ln2) = 1.233 → A; A N=1, m(2)=2 > 0:
       draw 2 → A1, A2 (A's first expansion, 2 draws at once); leaf A2 (.9), value .9
    4. root m(4)=2: A .75 + √(ln3/2) = 1.491 > B .4 + √(ln3) = 1.448 → A; m(3)=2 = D(A): UCT,
       A1 unvisited → A1 (finished), value .2
    5. root N=4, m(5)=3 > 2: draw 1 → B again: no new child, so UCT at the root:
       A .567 + √(ln4/3) = 1.246 < B .4 + √(ln4) = 1.577 → B; B N=1, m(2)=2: draw 2 → B1, B2;
       leaf B1 (.9), value .9
    6. root m(6)=3 = D: A .567 + √(ln5/3) = 1.299 < B .65 + √(ln5/2) = 1.547 → B; B2 unvisited, value .7
    7. root: A .567 + √(ln6/3) = 1.340 < B .667 + √(ln6/3) = 1.440 → B; m(4)=2 = D(B):
       B1 .9 + √(ln3) = 1.948 > B2 .7 + √(ln3) = 1.748 → B1 again, value .9
    8. root: A .567 + √(ln7/3) = 1.372 < B .725 + √(ln7/4) = 1.423 → B; B N=4, m(5)=3 > 2: draw 1
       → B1 again: no new child; UCT B1 .9 + √(ln4/2) = 1.733 < B2 .7 + √(ln4) = 1.877 → B2, value .7

    Without widening the same tree is exhausted after 6 rollouts; with it every rollout is spent.
    """
    policy = CyclingPolicy()
    s = make_strategy("mcts", policy, ToyPRM(), format=FORMAT, c_puct=1.0, widening=0.5, widening_k=1)
    ctx = s.context(TOY, np.random.default_rng(0))
    tree = asyncio.run(s.search(ctx, 8))
    assert [n.particle.steps[-1].text for n in tree.trace] == [B, A, A2, A1, B1, B2, B1, B2]
    assert policy.requests == [("", 1), ("", 1), (A, 2), ("", 1), (B, 2), (B, 1)]
    assert tree.rollouts == 8 and not tree.exhausted and tree.expansions == 6 and tree.size == 7
    assert ctx.cost.policy_calls == 6 and ctx.cost.prm_calls == 4  # a draw that repeats a child is not scored
    nodes = {n.particle.steps[-1].text if n.particle.steps else "": n for n in tree.nodes()}
    assert {k: n.visits for k, n in nodes.items()} == {"": 8, A: 3, B: 5, A1: 1, A2: 1, B1: 2, B2: 2}
    assert {k: n.draws for k, n in nodes.items() if not n.particle.finished} == {"": 3, A: 2, B: 3}
    assert [c.particle.steps[-1].text for c in nodes[""].children] == [A, B]  # by prior, though B came first


def test_widening_finds_the_step_a_single_expansion_misses():
    """The root's first three draws are wrong steps (W1-W3, each ending in a wrong answer), the
    fourth is the right one: one expansion of 3 never sees it; k = 1, α = 1/2 draws it at
    rollout 10 (m rises at N = 1, 2, 5, 10) and the visits then follow it."""
    w1, w2, w3, r = "W1\n\n", "W2\n\n", "W3\n\n", "R\n\n"
    tree = {"": [w1, w2, w3, r], w1: ["\\boxed{1}"], w2: ["\\boxed{2}"], w3: ["\\boxed{3}"], r: ["\\boxed{7}"]}
    values = {w1: 0.3, w2: 0.3, w3: 0.3, r: 0.8, "\\boxed{1}": 0.1, "\\boxed{2}": 0.1, "\\boxed{3}": 0.1,
              "\\boxed{7}": 0.9}
    once = make_strategy("mcts", CyclingPolicy(tree), ToyPRM(values), format=FORMAT, children=3,
                         widening=None).solve(TOY, 32, seed=0)
    assert once.answer != "7" and once.extras["exhausted"] and once.extras["rollouts"] < 32
    wide = make_strategy("mcts", CyclingPolicy(tree), ToyPRM(values), format=FORMAT, children=3, widening=0.5,
                         widening_k=1).solve(TOY, 32, seed=0)
    assert wide.answer == "7" and wide.solution == r + "\\boxed{7}" and wide.extras["rollouts"] == 32


def test_with_widening_only_a_dead_root_exhausts_the_tree(task):
    tiny = SimulatedTask(n_problems=1, seed=2, depth=(1, 1), branching=2)
    s = make_strategy("mcts", tiny.policy(), tiny.prm(), format=FORMAT, sampling=SAMPLING, children=2, widening=0.5)
    r = s.solve(tiny.problems[0], 50, seed=0)
    assert r.ok and not r.extras["exhausted"] and r.extras["rollouts"] == 50  # without widening: ≤ 5 rollouts
    assert r.extras["tree_size"] <= 5 < r.cost.policy_calls == r.extras["expansions"]  # repeated draws, no new node
    dead = mcts(task, policy=task.policy(fail_rate=1.0), widening=0.5, widening_k=1).solve(task.problems[0], 8, seed=0)
    assert dead.status == "error" and dead.extras["exhausted"] and dead.extras["rollouts"] == 1


# Today's MCTS (before widening) on fixed seeds, 12 problems each: a digest of every result's
# solution, answer, cost, extras and candidates, with the generated and PRM tokens and correct
# answers in full (recorded from the implementation before widening existed).
BEFORE_WIDENING = [
    ({}, 0.0, 16, "3754d307489592c5", 1947, 5643, 9),
    ({"rollout": "sample", "selection": "vote"}, 0.0, 8, "ffac2e9177f49167", 2072, 6277, 6),
    ({"children": 2, "c_puct": 0.5, "aggregation": "min"}, 0.3, 16, "e46b7e2195ff1e69", 669, 2812, 3),
]


@pytest.mark.parametrize("params, fail_rate, budget, digest, generated, prm_tokens, correct", BEFORE_WIDENING)
@pytest.mark.parametrize("widening", [{"widening": None}, "alpha 0"])
def test_without_widening_the_answers_and_costs_are_those_before_widening(task, params, fail_rate, budget, digest,
                                                                          generated, prm_tokens, correct, widening):
    """widening=None and α = 0 with k = children are the MCTS of one expansion."""
    if widening == "alpha 0":
        widening = {"widening": 0.0, "widening_k": params.get("children", 3)}
    s = make_strategy("mcts", task.policy(fail_rate=fail_rate), task.prm(noise=0.5, seed=1), format=FORMAT,
                      sampling=SAMPLING, **params, **widening)
    rows = []
    for i, p in enumerate(task.problems):
        r = s.solve(p, budget, seed=i)
        c = r.cost
        rows.append([r.solution, r.answer, c.generated_tokens, c.prompt_tokens, c.policy_calls, c.prm_calls,
                     c.prm_tokens, sorted(r.extras.items()), [(x.text, round(x.weight, 9)) for x in r.candidates]])
    assert sum(row[2] for row in rows) == generated and sum(row[6] for row in rows) == prm_tokens
    assert sum(task.is_correct(p, row[0]) for p, row in zip(task.problems, rows)) == correct
    assert hashlib.sha256(json.dumps(rows, default=str).encode()).hexdigest()[:16] == digest


def test_the_bound_is_not_rounded_up_at_an_integer():
    """243^0.4 = 9 is 9.000000000000002 in floating point: m(243) is still 9 for k = 1, α = 0.4."""
    s = mcts_with(widening=0.4, widening_k=1)
    assert [s.allowed(n) for n in (1, 2, 32, 33, 242, 243, 244, 1024, 1025)] == [1, 2, 4, 5, 9, 9, 10, 16, 17]
    assert mcts_with(widening=0.5, widening_k=2).allowed(4) == 4
    assert mcts_with(widening=None, children=3).allowed(50) == 3


def mcts_with(**params):
    return make_strategy("mcts", FreshPolicy(), HashPRM(), format=FORMAT, **params)
