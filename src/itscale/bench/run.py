"""``itscale bench`` end to end: problems → plan → backends → phases → metrics → outputs.

Outputs in ``config.output``: ``bench.sqlite`` (the store), ``records.csv`` /
``records.jsonl`` (one row per problem × method × budget × seed), ``metrics.csv`` /
``metrics.jsonl`` (one row per method × budget), ``accuracy_vs_budget.png``,
``accuracy_vs_tokens.png``, ``report.html`` and ``config.json``; with an ``allocation:``
section also ``allocation.json`` (the learnt policy) and ``allocation.csv``
(:mod:`itscale.bench.allocation`).
"""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .allocation import learn_allocation, missing_probes, print_allocation, run_probes, write_allocation
from .config import BenchConfig
from .grading import Grader
from .metrics import MetricRow, summarize
from .plots import plot_all
from .problems import embedded_fit_warnings, load_problems
from .report import environment_info, write_report
from .store import Store, export_csv, export_jsonl
from .sweep import DB_NAME, Sweep, output_dir, plan, run_phases
from .table import print_table


@dataclass
class BenchOutcome:
    rows: list[MetricRow]
    folder: Path
    wall_time: float
    phases_run: int
    problems: int
    skipped_rows: tuple[str, ...] = ()
    files: dict[str, Path] = field(default_factory=dict)
    errors: int = 0  # results whose run failed (a backend error, not a wrong answer)
    results: int = 0
    allocation: object | None = None  # the learnt allocation (itscale.allocation.AllocationResult), if asked for
    ray: object | None = None  # what the Ray cluster did (itscale.bench.ray_sweep.RaySummary), when it ran the work


def run_bench(config: BenchConfig, console: Console | None = None, *, title: str = "itscale bench",
              backends=None) -> BenchOutcome:
    """Complete whatever the store is missing for ``config``, then write every output."""
    console = console or default_console()
    t0 = time.perf_counter()
    if config.ray is not None:  # an unreachable cluster fails before anything is written
        from .ray_sweep import connect

        connect(config.ray.address)
    elif backends is None:  # a device that is not here fails before anything is written
        # (on Ray the workers place the models: the driver may have no GPU)
        from ..backends import check_placement

        check_placement(config.policy, "policy")
        check_placement(config.prm, "prm")
    folder = output_dir(config)
    folder.mkdir(parents=True, exist_ok=True)
    pset = load_problems(config.problems.source, template=config.problem_template(), limit=config.problems.limit,
                         on_bad_row=config.problems.on_bad_row, warn=lambda m: console.print(f"[yellow]skipped: {m}"))
    if config.policy.is_embedded:
        for warning in embedded_fit_warnings(pset, config.problems.template is not None):
            console.print(Text(f"warning: {warning}", style="yellow"))
    fingerprint = pset.fingerprint()
    environment = environment_info()
    config_dump = config.model_dump(mode="json")
    (folder / "config.json").write_text(json.dumps(config_dump, indent=2) + "\n")
    for note in config.budget_notes():
        console.print(f"[yellow]{note}")
    with Store(folder / DB_NAME) as store:
        phases = plan(config, pset.problems, fingerprint, store)
        probes = missing_probes(config, pset.problems, fingerprint, store) if config.allocation else []
        todo = sum(len(p.todo) for p in phases)
        if phases:
            console.print(f"{len(phases)} phases, {todo} problem runs to do "
                          f"({len(pset.problems)} problems × methods × budgets × seeds, minus what is stored)")
        else:
            console.print("nothing to do: every result is already in the store")
        if probes:
            console.print(f"{len(probes)} problems to probe for the compute-optimal allocation")
        run_id = store.start_run(config_dump, environment)
        ray_summary = None
        if (phases or probes) and config.ray is not None:
            ray_summary = _run_on_ray(config, store, phases, probes, fingerprint, run_id, console, todo)
        elif phases or probes:
            if backends is None:
                from .backends import load_backends

                with console.status("loading models"):
                    backends = load_backends(config)
            with Grader() as grader, _progress(console) as progress:
                overall = progress.add_task("all phases", total=todo + len(probes))
                tasks = {id(p): progress.add_task(p.label, total=len(p.todo), visible=False) for p in phases}

                def on_progress(phase, n):
                    progress.update(tasks[id(phase)], advance=n, visible=True)
                    progress.advance(overall, n)

                def on_phase(phase, wall):
                    progress.update(tasks[id(phase)], visible=False)
                    progress.console.print(f"  {phase.label}: {len(phase.todo)} problems in {wall:.1f} s")

                if phases:
                    sweep = Sweep(config, backends, store, grader, run_id, on_progress)
                    run_phases(sweep, phases, on_phase)
                if probes:
                    started = time.perf_counter()
                    probing = progress.add_task("allocation probes", total=len(probes))

                    def on_probe(n):
                        progress.advance(probing, n)
                        progress.advance(overall, n)

                    run_probes(config, backends, store, grader, probes, fingerprint, run_id, on_probe)
                    progress.update(probing, visible=False)
                    progress.console.print(f"  allocation probes: {len(probes)} problems in "
                                           f"{time.perf_counter() - started:.1f} s")
        store.finish_run(run_id)
        selection = {(config.method_hash(m, fingerprint), m.key) for m in config.methods}
        wanted_ids, seeds = {p.id for p in pset.problems}, set(config.seeds)
        records = [r for r in store.records(selection) if r.problem_id in wanted_ids and r.seed in seeds
                   and r.budget in config.method_budgets(_method(config, r.method))]
        allocation = None
        if config.allocation:
            try:
                allocation = learn_allocation(config, pset.problems, records, store, fingerprint)
            except ValueError as err:  # (too few problems, …): the sweep's outputs still come
                console.print(Text(f"allocation: not learnt: {err}", style="red"))
    rows = summarize(records, [m.key for m in config.methods])
    wall = time.perf_counter() - t0
    files = write_outputs(rows, records, folder, config_dump, environment, title, wall, len(pset.problems),
                          allocation=allocation)
    if allocation is not None:
        files.update(write_allocation(allocation, folder, config))
    print_table(rows, console)
    if allocation is not None:
        print_allocation(allocation, console)
    console.print(f"wrote {', '.join(str(p) for p in files.values())}")
    errors = Counter(r.message for r in records if r.status == "error")
    if errors:  # a backend that failed is not a model that answers badly: say what it said
        failed = sum(errors.values())
        console.print(f"[red]{failed} of {len(records)} results are errors (counted as wrong); the most frequent:")
        for message, n in errors.most_common(3):
            console.print(Text(f"  {n}× {message}", style="red"))
    return BenchOutcome(rows, folder, wall, len(phases), len(pset.problems), pset.skipped, files,
                        errors=sum(errors.values()), results=len(records), allocation=allocation, ray=ray_summary)


def _run_on_ray(config, store, phases, probes, fingerprint, run_id, console, todo):
    """The phases and probes as work units on the Ray cluster (:mod:`itscale.bench.ray_sweep`),
    with the same progress bars; only this process writes the store."""
    from .ray_sweep import run_on_ray

    left = {i: len(p.todo) for i, p in enumerate(phases)}
    with _progress(console) as progress:
        overall = progress.add_task("all phases", total=todo + len(probes))
        tasks = {i: progress.add_task(p.label, total=len(p.todo), visible=False) for i, p in enumerate(phases)}

        def on_start(workers):
            progress.console.print(f"  {workers} Ray workers ready (each loaded the models)")

        def on_unit(unit, result):
            n = len(unit.problems)
            progress.advance(overall, n)
            if unit.parent < 0:
                return
            progress.update(tasks[unit.parent], advance=n, visible=True)
            left[unit.parent] -= n
            if left[unit.parent] == 0:
                progress.update(tasks[unit.parent], visible=False)
                progress.console.print(f"  {phases[unit.parent].label}: {len(phases[unit.parent].todo)} problems")

        summary = run_on_ray(config, store, phases, probes, fingerprint, run_id, on_unit, on_start)
    nodes = ", ".join(f"{n} on node {node[:8]}" for node, n in summary.by_node.most_common())
    console.print(f"Ray: {summary.units} units on {summary.workers} workers in {summary.seconds:.1f} s "
                  f"(units per node: {nodes}; {summary.retried} rerun after a worker died)")
    return summary


def write_outputs(rows, records, folder: Path, config: dict, environment: dict, title: str, wall: float,
                  n_problems: int, allocation=None) -> dict[str, Path]:
    files = {"records.csv": export_csv(records, folder / "records.csv"),
             "records.jsonl": export_jsonl(records, folder / "records.jsonl")}
    files["metrics.csv"] = _write_metrics_csv(rows, folder / "metrics.csv")
    metrics_jsonl = folder / "metrics.jsonl"
    metrics_jsonl.write_text("".join(json.dumps(r.as_dict()) + "\n" for r in rows))
    files["metrics.jsonl"] = metrics_jsonl
    plots = plot_all(rows, folder)
    files.update({p.name: p for p in plots.values()})
    notes = [f"{n_problems} problems; this invocation took {wall:.1f} s (including model loading)"]
    files["report.html"] = write_report(rows, folder / "report.html", config=config, environment=environment,
                                        title=title, plots=plots, notes=notes, allocation=allocation)
    return files


def _write_metrics_csv(rows: list[MetricRow], path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(MetricRow.__dataclass_fields__))
        w.writeheader()
        for r in rows:
            w.writerow(r.as_dict())
    return path


def _method(config: BenchConfig, key: str):
    return next(m for m in config.methods if m.key == key)


def default_console() -> Console:
    """The terminal's console; 140 columns wide when writing to a file or pipe (logs, CI)."""
    probe = Console()
    return probe if probe.is_terminal else Console(width=140)


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)
