"""The sweep on simulated backends: completeness, resumption, subsampling, failures, outputs."""

from __future__ import annotations

import asyncio
import csv
import json
import sqlite3

import numpy as np
import pytest
from rich.console import Console

from itscale.bench import sweep as sweep_module
from itscale.bench.backends import Backends, Timed
from itscale.bench.config import validate_config
from itscale.bench.run import run_bench
from itscale.stats import pass_at_k
from itscale.strategies import make_strategy, run_many
from itscale.testing import SimulatedTask
from itscale.types import StepFormat

FORMAT = StepFormat(delimiter="\n\n", answer_markers=("\\boxed{",), max_steps=32)


def write_problems(task: SimulatedTask, path) -> str:
    path.write_text("".join(json.dumps({"id": p.id, "problem": p.prompt, "answer": p.answer}) + "\n"
                            for p in task.problems))
    return str(path)


def make_config(tmp_path, task, methods, budgets=(1, 2, 4), seeds=(0,), **extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = write_problems(task, tmp_path / "problems.jsonl")
    return validate_config({
        "problems": {"source": source, "template": "plain"},
        "format": "math", "policy": {"temperature": 1.0}, "methods": methods,
        "budgets": list(budgets), "seeds": list(seeds), "output": str(tmp_path / "out"), **extra})


class CountingPolicy:
    """A policy wrapper that counts calls and can fail on chosen problems."""

    def __init__(self, inner, fail_ids=()):
        self.inner, self.calls, self.fail_ids = inner, 0, set(fail_ids)
        self.capabilities = inner.capabilities

    async def generate_steps(self, requests):
        self.calls += 1
        if any(r.problem.id in self.fail_ids for r in requests):
            raise ConnectionError("policy backend unreachable")
        return await self.inner.generate_steps(requests)


def backends_for(task, policy=None, noise=0.5):
    return Backends(Timed(policy or task.policy()), Timed(task.prm(noise=noise, seed=1)), {"policy": "simulated"})


def quiet() -> Console:
    return Console(file=open("/dev/null", "w"), width=140)


def records(tmp_path) -> list[dict]:
    db = sqlite3.connect(tmp_path / "out" / "bench.sqlite")
    db.row_factory = sqlite3.Row
    return [dict(r) for r in db.execute("SELECT * FROM records")]


METHODS = [{"name": "greedy"}, {"name": "self_consistency", "label": "majority_vote"}, {"name": "best_of_n"},
           {"name": "weighted_best_of_n"}, {"name": "beam_search", "params": {"beam_width": 2}, "budgets": [2, 4]},
           {"name": "particle_filtering"}]


def test_sweep_writes_every_record_once_and_a_rerun_does_nothing(tmp_path):
    task = SimulatedTask(n_problems=12, seed=3)
    config = make_config(tmp_path, task, METHODS, seeds=(0, 1))
    outcome = run_bench(config, quiet(), backends=backends_for(task))
    expected_per_seed = 12 * (1 + 3 + 3 + 3 + 2 + 3)
    rows = records(tmp_path)
    assert len(rows) == 2 * expected_per_seed
    assert {r["status"] for r in rows} == {"ok"}
    assert all(r["wall_time"] is not None and r["wall_time"] >= 0 for r in rows)
    assert [(r.method, r.budget) for r in outcome.rows][:4] == [("greedy", 1), ("majority_vote", 1),
                                                                ("majority_vote", 2), ("majority_vote", 4)]
    assert all(r.n == 24 for r in outcome.rows)
    for name in ("records.csv", "records.jsonl", "metrics.csv", "metrics.jsonl", "accuracy_vs_budget.png",
                 "accuracy_vs_tokens.png", "report.html", "config.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    assert len((tmp_path / "out" / "records.jsonl").read_text().splitlines()) == len(rows)
    with open(tmp_path / "out" / "records.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and {"problem_id", "method", "budget", "seed", "score"} <= set(table[0])
    with open(tmp_path / "out" / "metrics.csv") as f:
        metrics = list(csv.DictReader(f))
    assert [(m["method"], int(m["budget"])) for m in metrics] == [(r.method, r.budget) for r in outcome.rows]

    policy = CountingPolicy(task.policy())
    again = run_bench(config, quiet(), backends=backends_for(task, policy))
    assert again.phases_run == 0 and policy.calls == 0
    assert len(records(tmp_path)) == len(rows)
    assert again.rows == outcome.rows


def test_more_seeds_only_run_the_new_seed(tmp_path):
    task = SimulatedTask(n_problems=6, seed=4)
    run_bench(make_config(tmp_path, task, METHODS[:3], seeds=(0,)), quiet(), backends=backends_for(task))
    before = {(r["problem_id"], r["method"], r["budget"], r["seed"]): r["created"] for r in records(tmp_path)}
    run_bench(make_config(tmp_path, task, METHODS[:3], seeds=(0, 1)), quiet(), backends=backends_for(task))
    after = {(r["problem_id"], r["method"], r["budget"], r["seed"]): r["created"] for r in records(tmp_path)}
    assert len(after) == 2 * len(before)
    assert all(after[k] == v for k, v in before.items())  # seed 0 was not redone


def test_pooled_records_follow_from_the_stored_pool(tmp_path):
    """b = 1 averages over every single sample exactly; coverage is the unbiased pass@b."""
    task = SimulatedTask(n_problems=10, seed=5)
    config = make_config(tmp_path, task, METHODS[1:4], budgets=(1, 2, 8))
    run_bench(config, quiet(), backends=backends_for(task))
    db = sqlite3.connect(tmp_path / "out" / "bench.sqlite")
    pools = {pid: json.loads(s) for pid, s in db.execute("SELECT problem_id, samples FROM pools")}
    assert len(pools) == 10 and all(len(s) == 8 for s in pools.values())
    for r in records(tmp_path):
        samples = pools[r["problem_id"]]
        c = sum(s["correct"] for s in samples)
        assert r["coverage"] == pytest.approx(pass_at_k(8, c, r["budget"]))
        if r["budget"] == 1:
            assert r["score"] == pytest.approx(c / 8)
        detail = json.loads(r["detail"])
        assert detail["pool_n"] == 8 and detail["subsets"] == {1: 8, 2: 28, 8: 1}[r["budget"]]
    by_budget = {}
    for r in records(tmp_path):
        by_budget.setdefault((r["method"], r["budget"]), []).append(r)
    # cost scales with the budget: b/N of the pool's tokens; majority vote reads no PRM
    for method in ("majority_vote", "best_of_n"):
        g1 = sum(r["generated_tokens"] for r in by_budget[(method, 1)])
        g8 = sum(r["generated_tokens"] for r in by_budget[(method, 8)])
        assert g8 == pytest.approx(8 * g1)
    assert all(r["prm_tokens"] == 0 for r in by_budget[("majority_vote", 8)])
    assert all(r["prm_tokens"] > 0 for r in by_budget[("best_of_n", 8)])


def _direct_best_of_n(task, budget, seeds):
    """Mean accuracy of best-of-``budget`` run directly, one independent run per seed."""
    bon = make_strategy("best_of_n", task.policy(), task.prm(noise=0.5, seed=1), format=FORMAT,
                        sampling=validate_config({"methods": [{"name": "greedy"}],
                                                  "policy": {"temperature": 1.0}}).policy.sampling())
    hits = []
    for seed in seeds:
        results = asyncio.run(run_many(bon, task.problems, budget, seed=1000 + seed))
        hits += [float(r.answer is not None and r.answer == r.problem.answer) for r in results]
    return np.array(hits)


@pytest.mark.slow
def test_subsampled_best_of_n_matches_direct_runs(tmp_path, monkeypatch, report_statistic):
    """E[subsampled accuracy at b] = accuracy of best-of-b run directly (two-sample z-test);
    a subsampler that ignores b (always the whole pool) is rejected."""
    task = SimulatedTask(n_problems=40, seed=11, p_correct=0.55)
    seeds = range(10)
    direct = _direct_best_of_n(task, 2, seeds)

    def bench_estimate(folder):
        config = make_config(folder, task, [{"name": "best_of_n"}], budgets=(2, 8), seeds=seeds)
        outcome = run_bench(config, quiet(), backends=backends_for(task))
        scores = [r["score"] for r in records(folder) if r["budget"] == 2]
        return np.array(scores), outcome

    sub, _ = bench_estimate(tmp_path / "ok")
    z = (sub.mean() - direct.mean()) / np.sqrt(sub.var(ddof=1) / len(sub) + direct.var(ddof=1) / len(direct))
    report_statistic("correct", "z (subsampled vs direct, b=2)", z, "|z| < 3")
    assert abs(z) < 3, (sub.mean(), direct.mean())

    monkeypatch.setattr(sweep_module, "_subsets", lambda n, b, limit, rng: [tuple(range(n))])
    broken, _ = bench_estimate(tmp_path / "broken")
    zb = (broken.mean() - direct.mean()) / np.sqrt(broken.var(ddof=1) / len(broken) + direct.var(ddof=1) / len(direct))
    report_statistic("broken: subsets ignore b", "z", zb, "|z| >= 3")
    assert abs(zb) >= 3


def test_a_failing_problem_is_recorded_as_an_error_and_retried(tmp_path):
    task = SimulatedTask(n_problems=6, seed=6)
    methods = [{"name": "self_consistency"}, {"name": "particle_filtering"}]
    config = make_config(tmp_path, task, methods, budgets=(1, 2))
    bad = task.problems[2].id
    outcome = run_bench(config, quiet(), backends=backends_for(task, CountingPolicy(task.policy(), {bad})))
    rows = records(tmp_path)
    assert len(rows) == 6 * 4
    errors = [r for r in rows if r["status"] == "error"]
    assert {r["problem_id"] for r in errors} == {bad} and len(errors) == 4
    assert all("policy backend unreachable" in r["message"] and r["score"] == 0 for r in errors)
    assert sum(r.errors for r in outcome.rows) == 4
    # the next run retries only the failed problem, and replaces its records
    policy = CountingPolicy(task.policy())
    run_bench(config, quiet(), backends=backends_for(task, policy))
    rows = records(tmp_path)
    assert len(rows) == 6 * 4 and {r["status"] for r in rows} == {"ok"}
    assert policy.calls > 0


def test_cli_reports_a_bad_config_and_exits_2(tmp_path, capsys):
    from itscale.cli import main

    f = tmp_path / "c.yaml"
    f.write_text("methods:\n  - name: particle_filtering\n    params: {temperature: 0}\n")
    assert main(["bench", str(f)]) == 2
    err = capsys.readouterr().err
    assert "methods[0].params: particle_filtering.temperature: Input should be greater than 0" in err
    assert main(["bench", "--methods"]) == 0
    assert "particle_filtering" in capsys.readouterr().out
