"""compute_optimal in the server and ``itscale solve``: resolved only with ``--allocation``, run per
request on simulated backends, refused with errors naming the option (no model is loaded here)."""

from __future__ import annotations

import asyncio
import json

import pytest
from allocation.policies import agreement_only, three_bins

from itscale import zoo
from itscale.allocation import save_allocation
from itscale.cli import main
from itscale.serve.config import Limits, ServeConfig
from itscale.serve.engine import Engine
from itscale.serve.errors import ApiError
from itscale.serve.jobs import parse_body, resolve
from itscale.serve.methods import resolve_method
from itscale.serve.responses import response_body
from itscale.testing import SimulatedTask
from itscale.types import StepFormat

LIMITS = Limits(max_budget=32, max_tokens=400)
TASK = SimulatedTask(n_problems=12, seed=2, depth=(1, 8), p_correct=0.85, n_wrong_answers=20)


@pytest.fixture()
def policy_file(tmp_path):
    return str(save_allocation(three_bins(), tmp_path / "allocation.json"))


def job_for(body, allocation, limits=LIMITS, job_id="j", **config):
    config = ServeConfig(**{"default_budget": 4, **config})
    return resolve(parse_body("chat", body), job_id=job_id, config=config, base_model="sim", limits=limits,
                   key_name="k", prm_enabled=config.prm_enabled, allocation=allocation)


def chat(problem=TASK.problems[0], **fields):
    return {"model": "sim", "messages": [{"role": "user", "content": problem.prompt}], **fields}


def engine(allocation=None):
    return Engine(TASK.policy(), TASK.prm(noise=1.0, seed=1), StepFormat(delimiter=TASK.delimiter), "sim",
                  allocation=allocation)


def test_the_alias_names_the_method():
    assert resolve_method("cob", "model") == resolve_method("compute-optimal", "model") == "compute_optimal"


@pytest.mark.parametrize("body, param", [(chat(model="sim:cob-8"), "model"),
                                         (chat(itscale={"method": "compute_optimal"}), "itscale.method")])
def test_without_an_allocation_the_method_is_unavailable(body, param):
    with pytest.raises(ApiError) as err:
        job_for(body, None)
    assert (err.value.status, err.value.param, err.value.code) == (400, param, "method_unavailable")
    assert "--allocation FILE" in err.value.message


def test_a_request_may_name_a_level_but_never_the_policy_file():
    with pytest.raises(ApiError) as err:
        job_for(chat(model="sim:cob-8", itscale={"params": {"allocation": "/etc/passwd"}}), three_bins())
    assert (err.value.status, err.value.param) == (400, "itscale.params.allocation")
    with pytest.raises(ApiError) as err:
        job_for(chat(model="sim:cob-8", itscale={"params": {"level": 5}}), three_bins())
    assert err.value.param == "itscale.params.level" and "no cost level at budget 5" in err.value.message
    job = job_for(chat(model="sim:cob-8", itscale={"params": {"level": 16}}), three_bins())
    assert (job.method, job.budget, job.params) == ("compute_optimal", 8, {"level": 16})


def test_each_request_is_probed_binned_and_answered_by_its_bins_choice():
    policy = three_bins()
    e = engine(policy)
    bins = set()
    for i, problem in enumerate(TASK.problems):
        run = e.prepare(job_for(chat(problem, model="sim:cob-8", seed=i), policy, job_id=problem.id))
        result = asyncio.run(e.run(run))
        body = response_body(run, result, queued_s=0.0)
        json.dumps(body, allow_nan=False)  # strict JSON, extras included
        block = body["itscale"]
        assert (block["method"], block["budget"], block["params"]) == ("compute_optimal", 8, {})
        extras = block["extras"]
        assert extras["bin"] == policy.bin_of(extras["difficulty"]) and extras["level"] == 8
        assert extras["choice"]["method"] == policy.level(8).choices[extras["bin"]].method
        assert body["usage"]["completion_tokens"] == result.cost.generated_tokens >= extras["probe"][
            "generated_tokens"] > 0
        assert body["choices"][0]["message"]["content"] == result.solution
        bins.add(extras["bin"])
    assert len(bins) >= 2


def test_budgets_below_the_levels_and_above_the_keys_limit_are_refused():
    policy = three_bins(hard=16)  # the level of budget 8 runs particle filtering at 16 on its hardest bin
    e = engine(policy)
    with pytest.raises(ApiError) as err:
        e.prepare(job_for(chat(model="sim:cob-2"), policy))
    assert (err.value.param, err.value.code) == ("model", "budget_not_supported")
    assert "below the smallest learnt cost level (budget 4" in err.value.message
    moved = e.prepare(job_for(chat(model="sim:cob"), policy, default_budget=2))  # the server's default moves up
    assert moved.job.budget == 4 and "it ran at 4" in moved.job.warnings[-1]
    with pytest.raises(ApiError) as err:
        e.prepare(job_for(chat(model="sim:cob-8"), policy, limits=Limits(max_budget=8)))
    assert (err.value.status, err.value.code) == (400, "budget_exceeds_limit")
    assert "whose bins run methods at budgets up to 16, over this API key's limit of 8" in err.value.message
    assert "the levels within it are at budgets 4" in err.value.message
    assert e.prepare(job_for(chat(model="sim:cob-8"), policy, limits=Limits(max_budget=16))).job.budget == 8


def test_the_server_settings_name_the_option(tmp_path, policy_file, capsys):
    assert ServeConfig(allocation=policy_file).allocation_policy() == three_bins()
    assert main(["serve", "--allocation", str(tmp_path / "missing.json"), "--port", "1"]) == 2
    assert "itscale serve: --allocation: allocation policy" in capsys.readouterr().err
    assert main(["serve", "--default-method", "cob", "--port", "1"]) == 2
    assert "--default-method: compute_optimal applies a learnt allocation; start the server with --allocation FILE" \
        in capsys.readouterr().err
    assert main(["serve", "--allocation", policy_file, "--prm", "none", "--port", "1"]) == 2
    assert "--allocation: the allocation policy needs a reward model (it runs best_of_n" in capsys.readouterr().err
    none_needed = str(save_allocation(agreement_only(), tmp_path / "sc.json"))
    assert ServeConfig(allocation=none_needed, prm="none", default_method="compute_optimal").allocation_policy()


@pytest.mark.parametrize("args, words", [
    (["--method", "cob"], "--method: compute_optimal applies a learnt allocation; give it with --allocation FILE"),
    (["--method", "cob", "--allocation", "/nonexistent.json"], "--allocation: allocation policy /nonexistent.json "
                                                               "does not exist"),
    (["--method", "cob", "--allocation", "{file}", "--param", "allocation=x"], "--param allocation: set it with "
                                                                             "--allocation FILE"),
    (["--method", "cob", "--allocation", "{file}", "--budget", "2"], "--budget: compute_optimal: budget 2 is below the "
                                                                      "smallest learnt cost level"),
    (["--method", "cob", "--allocation", "{file}", "--param", "level=5"], "--param: compute_optimal.level"),
    (["--method", "cob", "--allocation", "{file}", "--prm", "none"], "--allocation: the allocation policy needs a "
                                                                      "reward model (it runs best_of_n"),
])
def test_solve_refuses_bad_allocation_options_before_loading(policy_file, capsys, args, words):
    args = [a.replace("{file}", policy_file) for a in args]
    assert main(["solve", "Start at 3. Apply in order: +4.", *args]) == 2
    assert words in capsys.readouterr().err


@pytest.mark.skipif(not (zoo.policy_path() / "config.json").exists(), reason="the embedded models are not built")
def test_solve_runs_compute_optimal_on_the_embedded_models(policy_file, capsys):
    question = "Start at 3. Apply in order: +4, *2, -1."
    assert main(["solve", question, "--method", "cob", "--allocation", policy_file, "--budget", "11", "--seed", "1",
                 "--threads", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    extras = out["extras"]
    assert (out["method"], out["budget"], extras["level"]) == ("compute_optimal", 11, 8)
    assert extras["choice"]["method"] == three_bins().level(8).choices[extras["bin"]].method
    assert out["usage"]["completion_tokens"] >= extras["probe"]["generated_tokens"] > 0
    assert out["answer"] is not None
