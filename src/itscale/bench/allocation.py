"""The bench's part of a compute-optimal allocation: probes, learning from the store, outputs.

With an ``allocation:`` section (:class:`~itscale.bench.config.AllocationConfig`), ``itscale
bench`` after its sweep

1. probes every problem once (:func:`run_probes`): k whole samples and their difficulty
   (:func:`itscale.allocation.run_probe`), at the first of the config's seeds, on a random
   stream of its own (``default_rng([problem_seed(seed, id), PROBE_STREAM])``: never the
   stream a method's run on the problem uses, so the probe's samples are independent of the
   records it is compared with). The probe's own vote is graded. Each probe is stored the moment
   it ends (``probes`` table, keyed by :meth:`~itscale.bench.config.BenchConfig.probe_hash`),
   so a rerun probes only what is missing;
2. learns the allocation (:func:`learn_allocation`, :func:`itscale.allocation.learn`) from the
   records already in the store — every method × budget of the config is an option, scored by
   its per-problem score and cost (generated + PRM tokens), means over seeds — and the probes;
3. writes ``allocation.json`` (the policy ``itscale serve --allocation`` applies) and
   ``allocation.csv`` (the evaluation on the test split, one row per cost level), and prints the
   table (:func:`print_allocation`); the HTML report has the same section.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..allocation import (
    PROBE_OPTION,
    AllocationResult,
    Observations,
    Option,
    ProbeSettings,
    learn,
    run_probe,
)
from ..allocation.policy import save_allocation
from ..strategies import RunContext, make_strategy, map_batched, problem_seed
from ..types import Problem
from .config import BenchConfig
from .store import ProbeRecord, Record, Store

#: Mixed into each probe's seed, so that its samples are not those of a method's run.
PROBE_STREAM = 0xA110C


def probe_seed(config: BenchConfig) -> int:
    """The seed the probes run at: the config's first."""
    return config.seeds[0]


def probe_settings(config: BenchConfig) -> ProbeSettings:
    a = config.allocation
    return ProbeSettings(score=a.probe, samples=a.probe_samples, aggregation=a.aggregation)


def missing_probes(config: BenchConfig, problems: Sequence[Problem], fingerprint: str, store: Store) -> list[Problem]:
    """The problems without a stored probe (a failed one is probed again)."""
    done = store.probes(config.probe_hash(fingerprint), probe_seed(config))
    return [p for p in problems if p.id not in done or done[p.id].status != "ok"]


def run_probes(config: BenchConfig, backends, store: Store, grader, problems: Sequence[Problem], fingerprint: str,
               run_id: int, on_progress: Callable[[int], None] = lambda n: None) -> None:
    """Probe ``problems`` on a private event loop, batched across problems, storing each probe as it ends."""
    with asyncio.Runner() as runner:
        runner.run(_probe_all(config, backends, store, grader, problems, fingerprint, run_id, on_progress))


async def _probe_all(config, backends, store, grader, problems, fingerprint, run_id, on_progress) -> None:
    settings = probe_settings(config)
    fmt, sampling = config.step_format(), config.policy.sampling()
    seed, key = probe_seed(config), config.probe_hash(fingerprint)
    for backend in (backends.policy, backends.prm):  # as every phase: no cache left by the sweep
        if backend is not None and hasattr(backend, "clear_cache"):
            backend.clear_cache()
    carrier = make_strategy("greedy", backends.policy, backends.prm, format=fmt, sampling=sampling)

    async def probe(batched, problem: Problem, _rng):
        rng = np.random.default_rng([problem_seed(seed, problem.id), PROBE_STREAM])
        ctx = RunContext(problem, batched.policy, batched.prm, None, fmt, sampling, rng, settings.aggregation)
        try:
            outcome = await run_probe(ctx, settings.samples, settings.score)
        except Exception as err:  # this problem's probe says so; the others go on
            return problem, None, f"{type(err).__name__}: {err}"
        if all(p is None for p in outcome.particles) and ctx.failure_message():
            return problem, None, ctx.failure_message()
        return problem, outcome, ""

    def on_done(item) -> None:
        problem, outcome, error = item
        if outcome is None:
            store.add_probe(ProbeRecord(key, problem.id, seed, 1.0, 0.0, 0.0, None, 0.0, "error", error, run_id=run_id))
        else:
            ref = problem.answer
            correct = bool(outcome.answer) and ref is not None and grader.grade(outcome.answer, ref)
            scores = None if outcome.scores is None else [None if math.isnan(s) else s for s in outcome.scores]
            detail = {"answers": list(outcome.answers), "scores": scores}
            store.add_probe(ProbeRecord(key, problem.id, seed, outcome.difficulty, float(outcome.generated_tokens),
                                        float(outcome.prm_tokens), outcome.answer, float(correct), "ok",
                                        detail=json.dumps(detail), run_id=run_id))
        on_progress(1)

    await map_batched(carrier, problems, probe, seed, config.concurrency, on_done)


def observations(config: BenchConfig, problems: Sequence[Problem], records: Sequence[Record],
                 probes: dict[str, ProbeRecord]) -> tuple[Observations, list[str]]:
    """The learning data: per problem its probe and every option's score and cost (means over
    seeds). Problems without a probe or without a record of some option are left out (a note says so)."""
    options = [Option(m.name, m.key, b, dict(m.params)) for m in config.allocation_options()
               for b in config.method_budgets(m)]
    if config.allocation.answer_from_probe:
        options.append(PROBE_OPTION)
    index = {(o.label, o.budget): j for j, o in enumerate(options) if o is not PROBE_OPTION}
    seen: dict[tuple[str, int], dict[str, list[tuple[float, float]]]] = {}
    for r in records:
        if (r.method, r.budget) in index:
            seen.setdefault((r.method, r.budget), {}).setdefault(r.problem_id, []).append(
                (r.score, r.generated_tokens + r.prm_tokens))
    notes = []
    kept = [p for p in problems if p.id in probes and probes[p.id].status == "ok"]
    if len(kept) < len(problems):
        notes.append(f"{len(problems) - len(kept)} problem(s) without a probe (it failed) are left out")
    complete = [p for p in kept if all(p.id in seen.get(k, {}) for k in index)]
    if len(complete) < len(kept):
        notes.append(f"{len(kept) - len(complete)} problem(s) without a record of every method and budget are left out")
    n, m = len(complete), len(options)
    scores, costs = np.zeros((n, m)), np.zeros((n, m))
    for i, p in enumerate(complete):
        for k, j in index.items():
            values = np.array(seen[k][p.id])
            scores[i, j], costs[i, j] = values[:, 0].mean(), values[:, 1].mean()
        if config.allocation.answer_from_probe:
            scores[i, m - 1] = probes[p.id].correct  # (its cost beyond the probe: 0)
    obs = Observations(
        ids=tuple(p.id for p in complete),
        difficulty=np.array([probes[p.id].difficulty for p in complete]),
        probe_generated=np.array([probes[p.id].generated_tokens for p in complete]),
        probe_prm=np.array([probes[p.id].prm_tokens for p in complete]),
        options=tuple(options), scores=scores, costs=costs)
    return obs, notes


def learn_allocation(config: BenchConfig, problems: Sequence[Problem], records: Sequence[Record], store: Store,
                     fingerprint: str) -> AllocationResult:
    """The allocation learnt from the stored records and probes (module docstring)."""
    probes = store.probes(config.probe_hash(fingerprint), probe_seed(config))
    obs, notes = observations(config, problems, records, probes)
    if not obs.ids:
        raise ValueError("no problem has both a probe and a record of every method and budget")
    a = config.allocation
    result = learn(obs, probe=probe_settings(config), bins=a.bins, train_fraction=a.train_fraction,
                   budgets=a.budgets or config.budgets)
    return AllocationResult(**{**result.__dict__, "notes": tuple(notes) + result.notes})


def learnt_with(config: BenchConfig) -> dict:
    """What the policy was learnt under (kept in ``allocation.json`` for reference)."""
    fingerprint = config.backend_fingerprint()
    return {"policy": fingerprint["policy"], "prm": fingerprint["prm"], "format": fingerprint["format"],
            "problems": config.problems.source, "seeds": list(config.seeds),
            "train_fraction": config.allocation.train_fraction, "bins": config.allocation.bins}


def write_allocation(result: AllocationResult, folder: Path, config: BenchConfig) -> dict[str, Path]:
    """``allocation.json`` (when some level is feasible) and ``allocation.csv``."""
    files = {}
    policy = result.policy(learnt_with(config))
    if policy is not None:
        files["allocation.json"] = save_allocation(policy, folder / "allocation.json")
    path = folder / "allocation.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["budget", "cap", "feasible", "choices", "train_accuracy", "train_cost", "accuracy", "cost",
                    "uniform_train", "uniform_train_accuracy", "uniform_train_cost", "uniform_test",
                    "uniform_test_accuracy", "uniform_test_cost", "oracle_accuracy", "oracle_cost", "n_test"])
        for lv in result.levels:
            def part(o, label=False):
                if o is None:
                    return ["", "", ""] if label else ["", ""]
                return ([o.label] if label else []) + [o.accuracy, o.cost]
            w.writerow([lv.budget, lv.cap, lv.feasible, " | ".join(result.options[i].name for i in lv.choices),
                        *part(lv.train), *part(lv.allocation), *part(lv.uniform_train, True),
                        *part(lv.uniform_test, True), *part(lv.oracle), result.n_test])
    files["allocation.csv"] = path
    return files


CAPTION = ("test split; cost = mean generated + PRM tokens per problem (the allocation's includes its probe); "
           "cap = budget × one whole sample's tokens")


def _cell(o, label: bool = False) -> str:
    if o is None:
        return "—"
    text = f"{100 * o.accuracy:.1f}% @ {o.cost:,.0f}"
    return f"{text} ({o.label})" if label else text


def allocation_rows(result: AllocationResult) -> list[dict[str, str]]:
    """The cells of the allocation table, shared by the terminal and the HTML report."""
    rows = []
    for lv in result.levels:
        rows.append({
            "budget": str(lv.budget), "cap": f"{lv.cap:,.0f}",
            "allocation": _cell(lv.allocation) if lv.feasible else "infeasible",
            "uniform_train": _cell(lv.uniform_train, True), "uniform_test": _cell(lv.uniform_test, True),
            "oracle": _cell(lv.oracle),
            "choices": " | ".join(result.options[i].name for i in lv.choices) if lv.feasible else "—"})
    return rows


COLUMNS = (("budget", "budget", True), ("cap", "cap\ntokens", True), ("allocation", "allocation\nacc @ cost", True),
           ("uniform_train", "uniform chosen on train\nacc @ cost (option)", True),
           ("uniform_test", "best uniform on test\nat ≤ cost (option)", True),
           ("oracle", "oracle per-bin\nacc @ cost", True), ("choices", "choice per bin, easiest first", False))


def summary(result: AllocationResult) -> str:
    edges = ", ".join(f"{e:.3g}" for e in result.edges) or "none"
    return (f"probe: {result.probe.score}, {result.probe.samples} samples; {len(result.edges) + 1} bins (edges "
            f"{edges}); train {result.n_train} problems {list(result.train_bins)} per bin, test {result.n_test} "
            f"{list(result.test_bins)}; one whole sample ≈ {result.sample_cost:,.1f} tokens")


def print_allocation(result: AllocationResult, console: Console) -> None:
    table = Table(title="compute-optimal allocation", caption=CAPTION, header_style="bold", box=box.SIMPLE_HEAD)
    for _, header, numeric in COLUMNS:
        table.add_column(header, justify="right" if numeric else "left", overflow="fold")
    for row in allocation_rows(result):
        table.add_row(*(escape(row[key]) for key, _, _ in COLUMNS))
    console.print(table)
    console.print(escape(summary(result)))
    for note in result.notes:
        console.print(f"[yellow]allocation: {escape(note)}")
