r"""Learning the allocation from per-problem outcomes, and measuring it on held-out problems.

Notation. Problems p with probe difficulty d_p and probe cost π_p (generated + PRM tokens of
the k probe samples); options o (every method × budget of the sweep, plus — with
``answer_from_probe`` — the probe's own vote); a_{p,o} ∈ [0, 1] the option's score on p and
κ_{p,o} the tokens it spends (generated + PRM; means over seeds; κ = 0 for the probe's vote,
which only reuses the probe).

1. Split: p is a training problem iff h(id) < train_fraction (:mod:`~itscale.allocation.split`).
2. Bins: edges = quantiles of d on the training split (:mod:`~itscale.allocation.bins`).
3. Per bin b and option o, on the n_b training problems of b:

       acc_b(o) = mean_p a_{p,o},      c_b(o) = mean_p (π_p + κ_{p,o})

   — every option pays the probe, since the allocation has to run it to know the bin.
4. Cost levels. One whole sample costs s̄ = mean over training problems of (probe generated
   tokens)/k. Level B (each of ``budgets``) allows a mean cost per problem of cap_B = B·s̄, what B
   whole samples cost: the sampling cost of majority vote or best-of-N at budget B.
5. Choice: the multiple-choice knapsack (:mod:`~itscale.allocation.knapsack`)

       max Σ_b n_b·acc_b(o_b)   s.t.   Σ_b n_b·c_b(o_b) ≤ N_train·cap_B,

   solved exactly for all levels at once. A level no choice fits (the probe alone costs more
   than cap_B) is infeasible and left out of the policy. (Every bin has training problems: its
   upper edge, or for the last bin the largest score, is a training score.)
6. Evaluation on the test split (bins from the training edges), per feasible level:

   - *allocation*: mean a_{p,o_{bin(p)}} and mean π_p + κ_{p,o_{bin(p)}};
   - *uniform (train)*: the single option most accurate on the training split whose mean cost
     fits cap_B — a uniform option pays no probe: its cost is κ (π for the probe's vote, whose
     samples are the method) — measured on the test split: the same learning without the probe;
   - *best uniform (test)*: with hindsight, the single option most accurate on the test split
     among those costing no more than the allocation did there;
   - *oracle*: the knapsack solved on the test split itself (its own n_b, acc_b, c_b) under
     cap_B: the best any per-bin choice could do with these bins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .bins import bin_of, quantile_edges
from .knapsack import COST_TOLERANCE, best_within, frontier
from .policy import PROBE_METHOD, AllocationPolicy, Choice, Level, ProbeSettings
from .split import in_train


@dataclass(frozen=True)
class Option:
    """A method at a budget (or the probe's vote), as an allocation may choose it."""

    method: str
    label: str
    budget: int
    params: dict = field(default_factory=dict, compare=False)

    @property
    def name(self) -> str:
        return self.choice().name

    def choice(self) -> Choice:
        return Choice(method=self.method, label=self.label, params=dict(self.params), budget=self.budget)


PROBE_OPTION = Option(PROBE_METHOD, PROBE_METHOD, 0)


@dataclass(frozen=True)
class Observations:
    """Per problem (rows) and option (columns): what learning reads (module docstring)."""

    ids: tuple[str, ...]
    difficulty: np.ndarray       # d_p
    probe_generated: np.ndarray  # the probe's generated tokens
    probe_prm: np.ndarray        # the probe's PRM tokens
    options: tuple[Option, ...]
    scores: np.ndarray           # a_{p,o}, shape (problems, options)
    costs: np.ndarray            # κ_{p,o}

    def __post_init__(self) -> None:
        n, m = len(self.ids), len(self.options)
        for name in ("difficulty", "probe_generated", "probe_prm"):
            if np.shape(getattr(self, name)) != (n,):
                raise ValueError(f"{name} needs one value per problem ({n}), got shape {np.shape(getattr(self, name))}")
        for name in ("scores", "costs"):
            if np.shape(getattr(self, name)) != (n, m):
                raise ValueError(f"{name} needs shape (problems, options) = ({n}, {m}), "
                                 f"got {np.shape(getattr(self, name))}")
        if m == 0:
            raise ValueError("no options to allocate: the sweep needs at least one method")

    @property
    def probe_cost(self) -> np.ndarray:
        return self.probe_generated + self.probe_prm

    def uniform_costs(self) -> np.ndarray:
        """What each option costs run on its own, without a probe (the probe's vote: the probe)."""
        out = self.costs.copy()
        for j, o in enumerate(self.options):
            if o.method == PROBE_METHOD:
                out[:, j] = self.probe_cost
        return out

    def allocation_costs(self) -> np.ndarray:
        """What each option costs after the probe: π_p + κ_{p,o}."""
        return self.probe_cost[:, None] + self.costs


@dataclass(frozen=True)
class Outcome:
    """Accuracy and mean cost per problem of a policy on a split."""

    accuracy: float
    cost: float
    n: int
    label: str = ""


@dataclass(frozen=True)
class LevelResult:
    budget: int
    cap: float
    feasible: bool
    choices: tuple[int, ...] = ()              # option index per bin
    train: Outcome | None = None               # the allocation on the training split
    allocation: Outcome | None = None          # … on the test split
    uniform_train: Outcome | None = None       # the uniform option chosen on train, on test
    uniform_test: Outcome | None = None        # the best uniform option on test at no more cost
    oracle: Outcome | None = None              # the per-bin choice learnt on test


@dataclass(frozen=True)
class AllocationResult:
    probe: ProbeSettings
    options: tuple[Option, ...]
    edges: tuple[float, ...]
    sample_cost: float
    n_train: int
    n_test: int
    train_bins: tuple[int, ...]   # training problems per bin
    test_bins: tuple[int, ...]
    levels: tuple[LevelResult, ...]
    notes: tuple[str, ...] = ()

    def policy(self, learnt_with: dict | None = None) -> AllocationPolicy | None:
        """The policy file's content (None when no level is feasible)."""
        levels = []
        for lv in self.levels:
            if not lv.feasible:
                continue
            test = {} if lv.allocation is None else {"accuracy": lv.allocation.accuracy, "cost": lv.allocation.cost}
            choices = tuple(self.options[i].choice() for i in lv.choices)
            levels.append(Level(budget=lv.budget, cap=lv.cap, choices=choices,
                                train={"accuracy": lv.train.accuracy, "cost": lv.train.cost}, test=test))
        if not levels:
            return None
        return AllocationPolicy(probe=self.probe, edges=self.edges, sample_cost=self.sample_cost, levels=tuple(levels),
                                learnt_with=dict(learnt_with or {}))

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the report and ``allocation.json``'s neighbours."""
        out = asdict(self)
        out["options"] = [o.name for o in self.options]
        out["levels"] = [{**asdict(lv), "choices": [self.options[i].name for i in lv.choices]} for lv in self.levels]
        return out


def _bin_stats(rows: np.ndarray, bins: np.ndarray, n_bins: int, scores: np.ndarray, costs: np.ndarray):
    """Per bin: the count, and per option the mean score and mean cost over ``rows``."""
    counts = np.zeros(n_bins, dtype=int)
    acc = np.zeros((n_bins, scores.shape[1]))
    cost = np.zeros((n_bins, scores.shape[1]))
    for b in range(n_bins):
        members = rows[bins[rows] == b]
        counts[b] = members.size
        if members.size:
            acc[b] = scores[members].mean(axis=0)
            cost[b] = costs[members].mean(axis=0)
    return counts, acc, cost


def _per_bin_frontier(counts, acc, cost):
    """The knapsack frontier over the bins that have problems, and those bins' indices (a bin
    without problems weighs nothing: any choice does, the first option is written for it)."""
    used = [b for b in range(len(counts)) if counts[b]]
    groups = [[(counts[b] * cost[b, j], counts[b] * acc[b, j]) for j in range(acc.shape[1])] for b in used]
    return frontier(groups), used


def _per_bin(choice: dict[int, int], n_bins: int) -> tuple[int, ...]:
    return tuple(choice.get(b, 0) for b in range(n_bins))


def _evaluate(rows: np.ndarray, bins: np.ndarray, choices: Sequence[int], scores, costs) -> Outcome | None:
    if rows.size == 0:
        return None
    picked = np.array([choices[bins[p]] for p in rows])
    return Outcome(float(scores[rows, picked].mean()), float(costs[rows, picked].mean()), int(rows.size))


def _best_uniform(rows: np.ndarray, scores, costs, limit: float, options) -> int | None:
    """The option most accurate over ``rows`` among those whose mean cost is ≤ ``limit`` (the cheaper on a tie)."""
    if rows.size == 0:
        return None
    acc, cost = scores[rows].mean(axis=0), costs[rows].mean(axis=0)
    fits = [j for j in range(len(options)) if cost[j] <= limit + COST_TOLERANCE * max(1.0, abs(limit))]
    if not fits:
        return None
    return max(fits, key=lambda j: (acc[j], -cost[j], -j))


def learn(obs: Observations, *, probe: ProbeSettings, bins: int, train_fraction: float,
          budgets: Sequence[int]) -> AllocationResult:
    """Learn the allocation on the training split and measure it on the test split (module docstring)."""
    if not budgets:
        raise ValueError("budgets: give at least one cost level")
    train_mask = np.array([in_train(pid, train_fraction) for pid in obs.ids], dtype=bool)
    train, test = np.flatnonzero(train_mask), np.flatnonzero(~train_mask)
    if train.size == 0:
        raise ValueError(f"the training split is empty ({len(obs.ids)} problems, train_fraction {train_fraction}); "
                         "use more problems or a larger train_fraction")
    notes = []
    if test.size == 0:
        notes.append("the test split is empty: nothing to measure the allocation on")
    edges = tuple(quantile_edges(obs.difficulty[train], bins))
    n_bins = len(edges) + 1
    if n_bins < bins:
        notes.append(f"{n_bins} difficulty bins instead of {bins}: the training difficulties take too few distinct "
                     "values to cut into more")
    bin_idx = np.array([bin_of(d, edges) for d in obs.difficulty])
    sample_cost = float(obs.probe_generated[train].mean()) / probe.samples
    if sample_cost <= 0:
        raise ValueError("the probe generated no tokens on the training split: cannot price a whole sample")

    alloc_costs, uniform_costs = obs.allocation_costs(), obs.uniform_costs()
    counts, acc, cost = _bin_stats(train, bin_idx, n_bins, obs.scores, alloc_costs)
    test_counts, test_acc, test_cost = _bin_stats(test, bin_idx, n_bins, obs.scores, alloc_costs)
    front, used = _per_bin_frontier(counts, acc, cost)
    oracle_front, oracle_used = _per_bin_frontier(test_counts, test_acc, test_cost) if test.size else ([], [])

    levels = []
    for budget in sorted(set(budgets)):
        cap = budget * sample_cost
        point = best_within(front, cap * train.size)
        if point is None:
            levels.append(LevelResult(budget, cap, False))
            continue
        choices = _per_bin(dict(zip(used, point.choice)), n_bins)
        trained = _evaluate(train, bin_idx, choices, obs.scores, alloc_costs)
        allocation = _evaluate(test, bin_idx, choices, obs.scores, alloc_costs)
        uniform_train = uniform_test = oracle = None
        if test.size:
            j = _best_uniform(train, obs.scores, uniform_costs, cap, obs.options)
            if j is not None:
                uniform_train = Outcome(float(obs.scores[test, j].mean()), float(uniform_costs[test, j].mean()),
                                        int(test.size), obs.options[j].name)
            j = _best_uniform(test, obs.scores, uniform_costs, allocation.cost, obs.options)
            if j is not None:
                uniform_test = Outcome(float(obs.scores[test, j].mean()), float(uniform_costs[test, j].mean()),
                                       int(test.size), obs.options[j].name)
            best = best_within(oracle_front, cap * test.size)
            if best is not None:
                oracle_choices = _per_bin(dict(zip(oracle_used, best.choice)), n_bins)
                oracle = _evaluate(test, bin_idx, oracle_choices, obs.scores, alloc_costs)
        levels.append(LevelResult(budget, cap, True, choices, trained, allocation, uniform_train, uniform_test, oracle))
    infeasible = [lv.budget for lv in levels if not lv.feasible]
    if infeasible:
        cheapest = front[0].cost / train.size
        notes.append(f"no allocation fits at budget(s) {', '.join(map(str, infeasible))}: the cheapest one costs "
                     f"{cheapest:,.1f} tokens per problem (the probe alone: {obs.probe_cost[train].mean():,.1f}), "
                     f"more than their caps")
    return AllocationResult(probe, obs.options, edges, sample_cost, int(train.size), int(test.size),
                            tuple(int(c) for c in counts), tuple(int(c) for c in test_counts), tuple(levels),
                            tuple(notes))
