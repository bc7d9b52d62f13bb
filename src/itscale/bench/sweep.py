"""Run a bench configuration: plan the missing work, run it phase by phase, store every result.

A *phase* is one method at one budget and seed over every problem still missing from the
store, run concurrently and batched across problems (:func:`itscale.strategies.map_batched`).
Each problem's record is committed the moment it is graded, so a killed sweep resumes
where it stopped. Wall time per problem is the phase's elapsed time divided by the
problems it ran (problems run concurrently, so a single run's own duration would count
the time it spent waiting for the batch).

The best-of-N family (:class:`~itscale.strategies.PooledStrategy`: majority vote,
best-of-N, weighted best-of-N) runs once per problem and seed at N = the largest budget;
every budget b ≤ N is then evaluated on random size-b subsets of that pool (all of them
when there are at most ``config.subsets``), and its cost is b/N of the pool's. Methods
of the family that read scores share one pool per score aggregation.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..stats import pass_at_k
from ..strategies import STRATEGIES, PooledStrategy, Strategy, make_strategy, map_batched, problem_seed, run_many
from ..types import Problem, Result
from .config import BenchConfig, MethodConfig
from .store import Record, Store

DB_NAME = "bench.sqlite"


@dataclass
class Phase:
    """One unit of the plan: a method (or a pooled group) at one budget and seed."""

    kind: str                      # "run" or "pool"
    methods: list[MethodConfig]    # one method, or the pooled group
    budget: int                    # the run's budget, or the pool size N
    seed: int
    todo: list[Problem]
    hashes: dict[str, str] = field(default_factory=dict)  # method label -> config hash
    pool_hash: str = ""
    scored: bool = False
    aggregation: str = "last"

    @property
    def label(self) -> str:
        names = "+".join(m.key for m in self.methods)
        what = f"pool of {self.budget}" if self.kind == "pool" else f"budget {self.budget}"
        return f"{names}: {what}, seed {self.seed}"


def plan(config: BenchConfig, problems: Sequence[Problem], fingerprint: str, store: Store) -> list[Phase]:
    """The phases needed to complete the sweep, given what the store already holds."""
    phases: list[Phase] = []
    ids = [p.id for p in problems]
    pooled = [m for m in config.methods if issubclass(STRATEGIES[m.name], PooledStrategy)]
    for m in config.methods:
        if m in pooled:
            continue
        h = config.method_hash(m, fingerprint)
        for seed in config.seeds:
            for b in config.method_budgets(m):
                done = store.done(h, m.key, b, seed)
                todo = [p for p in problems if p.id not in done]
                if todo:
                    phases.append(Phase("run", [m], b, seed, todo, {m.key: h}))
    for (aggregation, needs), group in _pool_groups(pooled).items():
        scored = any(STRATEGIES[m.name].scored for m in group)
        n = max(config.budgets)
        hashes = {m.key: config.method_hash(m, fingerprint) for m in group}
        key = {"n": n, "aggregation": aggregation if scored else None, **({"needs": needs} if needs else {})}
        pool_hash = config.pool_hash(key, fingerprint)
        for seed in config.seeds:
            missing: set[str] = set()
            for m in group:
                for b in config.budgets:
                    missing |= set(ids) - store.done(hashes[m.key], m.key, b, seed)
            todo = [p for p in problems if p.id in missing]
            if todo:
                phases.append(Phase("pool", group, n, seed, todo, hashes, pool_hash, scored, aggregation))
    return phases


def _pool_groups(pooled: list[MethodConfig]) -> dict[tuple[str, str], list[MethodConfig]]:
    """Pooled methods grouped by the score aggregation they need and what their samples must
    carry (``PooledStrategy.pool_key``); unscored ones join the first group with their key."""
    groups: dict[tuple[str, str], list[MethodConfig]] = {}
    unscored = []
    for m in pooled:
        cls = STRATEGIES[m.name]
        needs = cls.pool_key(m.params)
        if cls.scored:
            groups.setdefault((m.params.get("aggregation", "last"), needs), []).append(m)
        else:
            unscored.append((needs, m))
    for needs, m in unscored:
        key = next((k for k in groups if k[1] == needs), ("last", needs))
        groups.setdefault(key, [])
        groups[key] = [x for x in groups[key] if not STRATEGIES[x.name].scored] + [m] + \
            [x for x in groups[key] if STRATEGIES[x.name].scored]
    return groups


class Sweep:
    """Executes a plan against loaded backends, grading and storing as results arrive."""

    def __init__(self, config: BenchConfig, backends, store: Store, grader, run_id: int,
                 on_progress: Callable[[Phase, int], None] | None = None):
        self.config, self.backends, self.store, self.grader, self.run_id = config, backends, store, grader, run_id
        self.on_progress = on_progress or (lambda phase, n: None)
        self.fmt = config.step_format()
        self.sampling = config.policy.sampling()

    def strategy(self, m: MethodConfig) -> Strategy:
        return make_strategy(m.name, self.backends.policy, self.backends.prm, format=self.fmt, sampling=self.sampling,
                             **m.params)

    async def run_phase(self, phase: Phase) -> float:
        """Run one phase; returns its wall time in seconds. Each phase starts with empty
        prefix caches, so what it costs does not depend on which phases ran before it."""
        for backend in (self.backends.policy, self.backends.prm):
            if backend is not None and hasattr(backend, "clear_cache"):
                backend.clear_cache()
        policy_s0 = self.backends.policy.seconds
        prm_s0 = self.backends.prm.seconds if self.backends.prm is not None else 0.0
        t0 = time.perf_counter()
        written: list[tuple[list[tuple], float, float]] = []  # (keys, policy share, prm share)
        if phase.kind == "run":
            m = phase.methods[0]

            def on_result(result: Result) -> None:
                rec = self._run_record(phase, m, result)
                self.store.add([rec])
                written.append(([rec.key], 1.0, 1.0))
                self.on_progress(phase, 1)

            await run_many(self.strategy(m), phase.todo, phase.budget, phase.seed,
                           self.config.concurrency, on_result)
        else:
            await self._run_pool(phase, written)
        wall = time.perf_counter() - t0
        policy_s = self.backends.policy.seconds - policy_s0
        prm_s = (self.backends.prm.seconds - prm_s0) if self.backends.prm is not None else 0.0
        self._fill_wall_times(phase, written, wall, policy_s, prm_s)
        return wall

    # -- step-level methods ----------------------------------------------------------
    def _run_record(self, phase: Phase, m: MethodConfig, result: Result) -> Record:
        ref = result.problem.answer
        correct = bool(result.answer) and ref is not None and self.grader.grade(result.answer, ref)
        cands = result.candidates
        coverage = (float(any(self.grader.grade(c.answer, ref) for c in cands if c.answer))
                    if ref is not None and cands else 0.0)
        cost = result.cost
        flops = None if cost.policy_flops is None else cost.policy_flops + (cost.prm_flops or 0.0)
        detail = {"solution": result.solution, "log_z": result.log_z, "message": result.message,
                  "candidates": [{"answer": c.answer, "weight": round(c.weight, 6), "score": c.score}
                                 for c in cands[:64]]}
        return Record(phase.hashes[m.key], result.problem.id, m.key, phase.budget, phase.seed, float(correct),
                      coverage, result.answer, ref, result.status, result.message, float(cost.generated_tokens),
                      float(cost.prm_tokens), flops, None, self.run_id, json.dumps(detail, default=str))

    # -- the best-of-N family --------------------------------------------------------
    async def _run_pool(self, phase: Phase, written: list) -> None:
        strategies = {m.key: self.strategy(m) for m in phase.methods}
        sampler = next((s for s in strategies.values() if s.scored), next(iter(strategies.values())))
        policy_params = _n_params(self.backends.policy)
        prm_params = _n_params(self.backends.prm)

        async def sample(batched: Strategy, problem: Problem, rng: np.random.Generator):
            ctx = batched.context(problem, rng)
            try:
                particles, scores = await batched.sample_pool(ctx, phase.budget)
            except Exception as err:  # this problem's records say so; the others go on
                return problem, None, None, None, f"{type(err).__name__}: {err}"
            if all(p is None for p in particles) and ctx.failure_message():  # the backend failed every sample
                return problem, None, None, None, ctx.failure_message()
            return problem, particles, scores, ctx.finish_cost(policy_params, prm_params), ""

        def on_done(item) -> None:
            problem, particles, scores, cost, error = item
            records, pool = self._pool_records(phase, strategies, problem, particles, scores, cost, error)
            self.store.add(records, pool)
            for r in records:
                name = next(m.name for m in phase.methods if m.key == r.method)
                share = r.budget / phase.budget
                written.append(([r.key], share, share if STRATEGIES[name].scored else 0.0))
            self.on_progress(phase, 1)

        await map_batched(sampler, phase.todo, sample, phase.seed, self.config.concurrency, on_done)

    def _pool_records(self, phase, strategies, problem, particles, scores, cost, error):
        ref = problem.answer
        n = phase.budget
        by_key = {m.key: m for m in phase.methods}
        if particles is None:
            recs = [Record(phase.hashes[k], problem.id, k, b, phase.seed, 0.0, 0.0, None, ref, "error", error,
                           0.0, 0.0, None, None, self.run_id) for k in strategies for b in self.config.budgets]
            return recs, None
        correct = [p is not None and ref is not None and self.grader.grade(_answer(p), ref) for p in particles]
        c = sum(correct)
        per_sample_gen = cost.generated_tokens / n
        per_sample_prm = cost.prm_tokens / n
        records = []
        for key, strategy in strategies.items():
            scored = STRATEGIES[by_key[key].name].scored
            for b in self.config.budgets:
                subsets = _subsets(n, b, self.config.subsets, np.random.default_rng((problem_seed(phase.seed, problem.id), b)))
                hits, first = 0, None
                for j, idx in enumerate(subsets):
                    rng = np.random.default_rng((problem_seed(phase.seed, problem.id), b, j))
                    ctx = strategy.context(problem, rng)
                    result = strategy.select(ctx, b, [particles[i] for i in idx],
                                             None if scores is None else scores[list(idx)])
                    ok = bool(result.answer) and ref is not None and self.grader.grade(result.answer, ref)
                    hits += ok
                    first = first or result
                flops = None
                if cost.policy_flops is not None:
                    flops = (b / n) * (cost.policy_flops + ((cost.prm_flops or 0.0) if scored else 0.0))
                detail = {"pool_n": n, "subsets": len(subsets), "pool_correct": c, "example_answer": first.answer}
                records.append(Record(
                    phase.hashes[key], problem.id, key, b, phase.seed, hits / len(subsets),
                    pass_at_k(n, c, b) if ref is not None else None, first.answer, ref, first.status, first.message,
                    per_sample_gen * b, per_sample_prm * b if scored else 0.0, flops, None, self.run_id,
                    json.dumps(detail, default=str)))
        samples = [{"text": None if p is None else p.text, "answer": None if p is None else _answer(p),
                    "correct": ok, "score": None if scores is None or not np.isfinite(scores[i]) else float(scores[i])}
                   for i, (p, ok) in enumerate(zip(particles, correct))]
        pool = {"pool_hash": phase.pool_hash, "problem_id": problem.id, "seed": phase.seed, "n": n,
                "samples": samples}
        return records, pool

    def _fill_wall_times(self, phase: Phase, written: list, wall: float, policy_s: float, prm_s: float) -> None:
        if not written:
            return
        per_problem = wall / len(phase.todo)
        if phase.kind == "run":
            seconds = [per_problem for _ in written]
        else:  # split the pool's time between sampling and scoring, then scale by b/N
            busy = policy_s + prm_s
            policy_part = per_problem * (policy_s / busy if busy > 0 else 1.0)
            prm_part = per_problem - policy_part
            seconds = [pol * policy_part + prm * prm_part for _, pol, prm in written]
        self.store.set_wall_time([k for keys, _, _ in written for k in keys], seconds)


def _answer(particle) -> str | None:
    from ..strategies.context import answer_of

    return answer_of(particle)


def _subsets(n: int, b: int, limit: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """Every size-b subset of range(n) when there are at most ``limit``, else ``limit`` random ones."""
    if math.comb(n, b) <= limit:
        return list(itertools.combinations(range(n), b))
    return [tuple(sorted(rng.choice(n, size=b, replace=False).tolist())) for _ in range(limit)]


def _n_params(backend: Any) -> int | None:
    caps = getattr(backend, "capabilities", None)
    return getattr(caps, "n_parameters", None)


def run_phases(sweep: Sweep, phases: Sequence[Phase], on_phase: Callable[[Phase, float], None] | None = None) -> None:
    """Run the phases in order on a private event loop (the bench is a program, not a library call)."""
    with asyncio.Runner() as runner:
        for phase in phases:
            wall = runner.run(sweep.run_phase(phase))
            if on_phase is not None:
                on_phase(phase, wall)


def output_dir(config: BenchConfig) -> Path:
    return Path(config.output).expanduser()
