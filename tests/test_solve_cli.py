"""``itscale solve``: one question through the real command line, on the embedded model pair.

In-process runs share one loaded engine per model configuration (``Engine.load`` is cached by
the ``engine_cache`` fixture; everything after loading runs as it does for a user); the
subprocess tests run the installed ``itscale`` entry point.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from itscale.cli import build_parser, main
from itscale.cli_solve import run_solve
from itscale.tasks.answers import answer_key

PROBLEM = "Start at 3. Apply in order: +4, *2, -1."
ITSCALE = Path(sys.executable).with_name("itscale")  # the console script next to the interpreter
FIELDS = {"question", "answer", "solution", "finish_reason", "status", "message", "method", "budget", "params", "seed", "candidates",
          "usage", "cost", "wall_time", "log_z", "exact", "warnings", "extras"}


@pytest.fixture(scope="module")
def engine_cache():
    """Load each model configuration once for the module's in-process runs."""
    from itscale.serve.engine import Engine

    real = Engine.load.__func__
    cache: dict = {}

    def load(cls, config, log=lambda m: None):
        key = (config.policy_spec().model_dump_json(), config.prm_spec().model_dump_json(), config.step_format_name)
        if key not in cache:
            cache[key] = real(cls, config, log)
        return cache[key]

    patch = pytest.MonkeyPatch()
    patch.setattr(Engine, "load", classmethod(load))
    yield cache
    patch.undo()


def solve_json(capsys, *args: str) -> dict:
    assert main(["solve", *args, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)  # the whole of standard output is one JSON object


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_answer_the_solution_and_the_candidates_are_printed(engine_cache, capsys):
    assert main(["solve", PROBLEM, "--seed", "0", "--budget", "4"]) == 0
    out, err = capsys.readouterr()
    data = solve_json(capsys, PROBLEM, "--seed", "0", "--budget", "4")  # the same run, as JSON
    assert data["status"] == "ok" and data["answer"] is not None
    assert out.startswith(f"Answer: {data['answer']}\n")
    assert data["solution"].strip() in out
    assert "particle_filtering, budget 4, seed 0" in out
    for header in ("weight", "score", "tokens", "answer", "solution"):
        assert header in out
    top = data["candidates"][0]
    assert f"{top['weight']:.3f}" in out and str(top["tokens"]) in out
    assert "Traceback" not in err and "warning" not in err  # on-task question: no warning


def test_json_has_every_field_and_weights_sum_to_one(engine_cache, capsys):
    data = solve_json(capsys, PROBLEM, "--seed", "3", "--budget", "8", "--method", "pf")
    assert set(data) == FIELDS
    assert (data["question"], data["method"], data["budget"], data["seed"]) == (PROBLEM, "particle_filtering", 8, 3)
    cands = data["candidates"]
    assert cands and math.isclose(sum(c["weight"] for c in cands), 1.0, rel_tol=1e-9)
    assert [c["weight"] for c in cands] == sorted((c["weight"] for c in cands), reverse=True)
    assert all(set(c) == {"answer", "weight", "score", "tokens", "chosen", "text"} for c in cands)
    assert all(c["tokens"] > 0 for c in cands)
    assert all(0 < c["score"] < 1 for c in cands)  # each particle's latest PRM score, kept from the run
    assert sum(c["chosen"] for c in cands) == 1
    assert data["usage"]["completion_tokens"] == data["cost"]["generated_tokens"] > 0
    assert data["usage"]["prm_tokens"] > 0 and data["wall_time"] == data["cost"]["wall_time"] > 0
    assert data["warnings"] == [] and data["finish_reason"] == "stop"


@pytest.mark.parametrize("method, rule", [("pf", "argmax"), ("bon", "argmax"), ("sc", "vote"),
                                          ("wbon", "vote"), ("beam", "argmax")])
def test_the_answer_follows_the_methods_selection_rule(engine_cache, capsys, method, rule):
    data = solve_json(capsys, PROBLEM, "--seed", "1", "--budget", "4", "--method", method, "--temperature", "1.2")
    cands = data["candidates"]
    chosen = next(c for c in cands if c["chosen"])
    assert chosen["text"] == data["solution"] and chosen["answer"] == data["answer"]
    if rule == "argmax":  # the heaviest candidate (ties broken at random)
        assert chosen["weight"] == pytest.approx(max(c["weight"] for c in cands))
    else:  # the answer with the largest total weight
        totals: dict = {}
        for c in cands:
            totals[answer_key(c["answer"])] = totals.get(answer_key(c["answer"]), 0.0) + c["weight"]
        assert totals[answer_key(data["answer"])] == pytest.approx(max(totals.values()))


def test_the_same_seed_gives_the_same_run(engine_cache, capsys):
    runs = [solve_json(capsys, PROBLEM, "--seed", "7", "--budget", "2", "--method", "bon") for _ in range(2)]
    assert [(r["answer"], [c["text"] for c in r["candidates"]]) for r in runs] == \
           [(runs[0]["answer"], [c["text"] for c in runs[0]["candidates"]])] * 2


def test_the_question_can_come_from_standard_input(engine_cache, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"\n  {PROBLEM}\n"))
    data = solve_json(capsys, "-", "--seed", "0", "--budget", "2", "--method", "greedy")
    assert data["question"] == PROBLEM and data["method"] == "greedy" and data["status"] == "ok"


def test_an_off_task_question_runs_with_a_warning(engine_cache, capsys):
    assert main(["solve", "12+7*3", "--seed", "0", "--budget", "2", "--method", "greedy", "--json"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["warnings"] and "outside" in data["warnings"][0] and data["warnings"][0].startswith("QUESTION:")
    assert err.startswith("itscale solve: warning: QUESTION: the embedded model only knows the arithmetic task")


def test_without_a_prm_the_default_method_is_self_consistency(engine_cache, capsys):
    data = solve_json(capsys, PROBLEM, "--prm", "none", "--seed", "0", "--budget", "2")
    assert data["method"] == "self_consistency" and data["usage"]["prm_tokens"] == 0
    assert all(c["score"] is None for c in data["candidates"])


@pytest.mark.parametrize("rich", [True, False])
def test_a_progress_line_on_a_terminal_and_never_on_standard_output(engine_cache, monkeypatch, rich):
    if not rich:  # the plain-text fallback when rich is not installed
        monkeypatch.setitem(sys.modules, "rich.console", None)
    ns = build_parser().parse_args(["solve", PROBLEM, "--seed", "0", "--budget", "4", "--json"])
    out, err = io.StringIO(), _Terminal()
    assert run_solve(ns, stdout=out, stderr=err) == 0
    assert "particle_filtering: 4 policy calls" in err.getvalue() and "PRM tokens" in err.getvalue()
    assert set(json.loads(out.getvalue())) == FIELDS
    if not rich:
        ns = build_parser().parse_args(["solve", PROBLEM, "--seed", "0", "--budget", "4"])
        out = io.StringIO()
        assert run_solve(ns, stdout=out, stderr=io.StringIO()) == 0
        lines = out.getvalue().splitlines()
        assert lines[0].startswith("Answer: ") and any(line.startswith("*") for line in lines)
        assert any(line.split()[:3] == ["weight", "score", "tokens"] for line in lines)


@pytest.mark.parametrize("args, words", [
    (["solve", ""], ["QUESTION", "empty"]),
    (["solve", "-"], ["QUESTION", "standard input"]),  # (standard input is empty)
    (["solve", PROBLEM, "--budget", "0"], ["--budget", "positive"]),
    (["solve", PROBLEM, "--method", "simulated_annealing"], ["--method", "unknown method", "particle_filtering"]),
    (["solve", PROBLEM, "--method", "beam", "--budget", "6", "--param", "beam_width=4"], ["--budget", "it takes 4, 8"]),
    (["solve", PROBLEM, "--method", "pf", "--prm", "none"], ["--method", "needs a reward model"]),
    (["solve", PROBLEM, "--param", "temperature=0"], ["--param", "temperature"]),
    (["solve", PROBLEM, "--param", "sampling=1"], ["--param sampling"]),
    (["solve", PROBLEM, "--max-tokens", "0"], ["--max-tokens"]),
    (["solve", PROBLEM, "--prm-measure", "mean-logprob"], ["--prm-measure", "only kind: confidence"]),
    (["solve", PROBLEM, "--prm-kind", "judge", "--prm-template", "no field"], ["--prm-template", "{step}"]),
    (["solve", PROBLEM, "--prm-kind", "confidence", "--prm", "http://127.0.0.1:9/v1"], ["--prm-kind", "local"]),
])
def test_bad_input_is_refused_before_loading_naming_the_option(capsys, monkeypatch, args, words):
    from itscale.serve.engine import Engine

    monkeypatch.setattr(sys, "stdin", io.StringIO("  \n"))
    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a, **k: pytest.fail("loaded a model")))
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("itscale solve: ") and "Traceback" not in err
    for word in words:
        assert word in err


def _itscale(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([str(ITSCALE), *args], check=False, input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_the_installed_command_answers_from_standard_input_as_json():
    done = _itscale("solve", "-", "--json", "--seed", "0", "--budget", "4", "--method", "pf", stdin=PROBLEM)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert set(data) == FIELDS and data["question"] == PROBLEM and data["status"] == "ok"
    assert math.isclose(sum(c["weight"] for c in data["candidates"]), 1.0)
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args, words", [
    (["solve", ""], ["QUESTION"]),
    (["solve", PROBLEM, "--budget", "0"], ["--budget"]),
    (["solve", PROBLEM, "--method", "nope"], ["--method", "unknown method"]),
])
def test_the_installed_command_refuses_bad_input_with_status_2(args, words):
    done = _itscale(*args)
    assert done.returncode == 2 and done.stdout == ""
    assert "Traceback" not in done.stderr and all(w in done.stderr for w in words)


@pytest.mark.parametrize("as_json", [True, False])
def test_a_run_without_an_answer_exits_with_1(engine_cache, capsys, monkeypatch, as_json):
    from itscale.serve.engine import Engine
    from itscale.types import Cost, Problem, Result

    async def dead(self, run):
        return Result(Problem("solve", run.job.problem), run.job.method, run.job.budget, None, None, (), Cost(),
                      status="all_dead", message="no candidate survived")

    monkeypatch.setattr(Engine, "run", dead)
    assert main(["solve", PROBLEM, "--budget", "2", "--seed", "0", *(["--json"] if as_json else [])]) == 1
    out, err = capsys.readouterr()
    assert "no answer (all_dead): no candidate survived" in err and "Traceback" not in err
    if as_json:
        data = json.loads(out)
        assert (data["status"], data["answer"], data["candidates"], data["finish_reason"]) == \
               ("all_dead", None, [], None)
    else:
        assert out.startswith("Answer: (none)") and "no final candidates" in out


def test_a_solution_cut_at_the_token_limit_is_reported(engine_cache, capsys):
    assert main(["solve", PROBLEM, "--budget", "2", "--seed", "0", "--max-tokens", "3", "--json"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["finish_reason"] == "length" and all(c["tokens"] <= 3 for c in data["candidates"])
    assert "warning: the chosen solution was cut short at the token limit (--max-tokens 3" in err
