"""`itscale bench` on a real Ray cluster: a head node and a worker node started by the test on
this machine (`ray start --block`, one CPU each), the embedded models loaded by each worker,
the SQLite store written by the driver (this process) alone.

- the sweep gives the records of the same sweep on one machine (same seeds), with its units
  spread over both nodes;
- a worker killed (SIGKILL) while it runs a unit: Ray restarts it, the driver reruns the unit,
  and the store ends complete, every record once and equal to the one-machine run;
- an address no cluster answers at fails in seconds with an error naming `ray.address`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from itscale import zoo
from itscale.bench.config import validate_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from servers import free_port  # noqa: E402

# Set before Ray is imported (it reads them once): see `cluster`.
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
ray = pytest.importorskip("ray")

BUILT = (zoo.policy_path() / "config.json").exists() and (zoo.prm_path() / "config.json").exists()
CLUSTER_START_TIMEOUT = 90.0

CONFIG = {
    "problems": {"source": "arithmetic:medium", "limit": 12},
    "policy": {"threads": 1},
    "methods": [{"name": "greedy"}, {"name": "self_consistency", "label": "majority_vote"},
                {"name": "best_of_n"}, {"name": "particle_filtering"}],
    "budgets": [1, 2, 4],
}
#: greedy at 1, the pooled pair at 1, 2, 4, particle filtering at 1, 2, 4
EXPECTED = 12 * (1 + 2 * 3 + 3)
COLUMNS = "problem_id, method, budget, seed, score, coverage, answer, status, generated_tokens, prm_tokens, detail"


# -- a real cluster ------------------------------------------------------------------------------

def _ray_start(*args: str, temp: str) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("ray")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    return subprocess.Popen([str(exe), "start", "--block", "--num-cpus=1", "--object-store-memory=100000000",
                             "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", *args],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)


@pytest.fixture(scope="module")
def cluster():
    """A head and one worker node, one CPU each; the driver (this process) connected to it.
    Token authentication with a token of its own (in the environment of the nodes, of this
    process and of the `itscale bench` processes the tests start), so that neither a token
    left in ~/.ray by another Ray nor its absence changes what the test does."""
    temp = tempfile.mkdtemp(prefix="itray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    procs = [_ray_start("--head", f"--port={port}", "--include-dashboard=false", temp=temp)]
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + CLUSTER_START_TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert procs[0].poll() is None, "the Ray head exited at start-up"
                assert time.monotonic() < deadline, "the Ray head did not start"
                time.sleep(0.2)
        procs.append(_ray_start(f"--address={address}", temp=temp))
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert procs[1].poll() is None and time.monotonic() < deadline, "the Ray worker node did not join"
            time.sleep(0.2)
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for p in procs:  # the whole node: `ray start`, its raylet, GCS and workers
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(30)


@pytest.fixture(scope="module")
def one_machine(tmp_path_factory):
    """The sweep's records on this machine, without Ray."""
    from itscale.bench.run import run_bench

    out = tmp_path_factory.mktemp("local")
    outcome = run_bench(validate_config({**CONFIG, "output": str(out)}))
    assert outcome.errors == 0
    return _records(out / "bench.sqlite")


def _records(db: Path) -> dict[tuple, tuple]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(f"SELECT {COLUMNS} FROM records").fetchall()
    finally:
        conn.close()
    out = {}
    for *key, score, coverage, answer, status, gen, prm, detail in rows:
        d = json.loads(detail)
        assert tuple(key) not in out
        # the PRM's scores differ in the last bits between batch shapes (a unit batches fewer problems)
        log_z = None if d.get("log_z") is None else round(d["log_z"], 3)
        out[tuple(key)] = (score, coverage, answer, status, gen, prm, log_z, d.get("solution"))
    return out


def _same(ray_records: dict, local: dict) -> None:
    assert len(ray_records) == EXPECTED and ray_records.keys() == local.keys()
    differ = [k for k in local if ray_records[k] != local[k]]
    assert not differ, [(k, ray_records[k], local[k]) for k in differ[:3]]


pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("ray"),
              pytest.mark.skipif(not BUILT, reason="the embedded models are not built")]


def test_a_sweep_on_ray_gives_the_records_of_one_machine(cluster, one_machine, tmp_path, request):
    from itscale.bench.run import run_bench

    config = validate_config({**CONFIG, "output": str(tmp_path), "ray": {"address": cluster, "chunk": 4}})
    t0 = time.perf_counter()
    outcome = run_bench(config)
    seconds = time.perf_counter() - t0
    assert outcome.errors == 0 and outcome.ray is not None
    _same(_records(tmp_path / "bench.sqlite"), one_machine)
    assert outcome.ray.workers == 2 and len(outcome.ray.by_node) == 2, outcome.ray  # both nodes ran units
    assert outcome.ray.units == sum(outcome.ray.by_node.values()) and outcome.ray.retried == 0
    assert (tmp_path / "report.html").exists() and [r.method for r in outcome.rows][:1] == ["greedy"]
    request.node.user_properties.append(("itscale_measurement", (
        "Ray sweep (12 problems, 4 methods, 2 one-CPU nodes)",
        f"{outcome.ray.units} units in {outcome.ray.seconds:.1f} s ({seconds:.1f} s with the workers' start-up); "
        f"units per node {sorted(outcome.ray.by_node.values())}")))


def test_a_worker_killed_mid_sweep_has_its_units_rerun_and_nothing_lost_or_doubled(cluster, one_machine, tmp_path):
    from itscale.bench.ray_sweep import run_on_ray
    from itscale.bench.store import Store
    from itscale.bench.problems import load_problems
    from itscale.bench.sweep import plan

    config = validate_config({**CONFIG, "output": str(tmp_path), "ray": {"address": cluster, "chunk": 2}})
    pset = load_problems("arithmetic:medium", limit=12)
    killed: list[int] = []

    def kill_first_worker(unit, result):
        if not killed:  # that worker has its next unit in flight already (two per worker)
            os.kill(result.pid, signal.SIGKILL)
            killed.append(result.pid)

    with Store(tmp_path / "bench.sqlite") as store:
        run_id = store.start_run({}, {})
        phases = plan(config, pset.problems, pset.fingerprint(), store)
        summary = run_on_ray(config, store, phases, [], pset.fingerprint(), run_id, on_unit=kill_first_worker)
    assert killed and summary.retried >= 1, summary
    assert sum(summary.by_node.values()) == summary.units  # every unit written once, reruns included
    _same(_records(tmp_path / "bench.sqlite"), one_machine)


def test_an_unreachable_cluster_fails_fast_with_the_field_named(tmp_path):
    config = tmp_path / "bench.yaml"
    config.write_text(json.dumps({**CONFIG, "output": str(tmp_path / "out")}))
    address = f"127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "itscale.cli", "bench", str(config), "--ray", address],
                          capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "ray.address" in proc.stderr and address in proc.stderr and "ray start --head" in proc.stderr
    assert elapsed < 30, elapsed  # seconds, not Ray's minute of retries
    assert not (tmp_path / "out" / "records.csv").exists()


def test_a_driver_killed_mid_sweep_resumes_with_nothing_lost_or_redone(cluster, one_machine, tmp_path):
    """`itscale bench --ray` killed with SIGKILL once some units are written (its workers go with
    it: Ray ends a dead driver's actors), then rerun: the second run plans only what is missing,
    keeps every record of the first untouched, and the store ends equal to the one-machine run."""
    config, out = tmp_path / "bench.yaml", tmp_path / "out"
    config.write_text(json.dumps({**CONFIG, "output": str(out), "ray": {"chunk": 2}}))
    db = out / "bench.sqlite"
    command = [sys.executable, "-m", "itscale.cli", "bench", str(config), "--ray", cluster]

    def rows() -> dict[tuple, tuple]:
        if not db.exists():
            return {}
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            return {r[:4]: r[4:] for r in conn.execute(
                "SELECT problem_id, method, budget, seed, created, run_id, answer FROM records")}
        except sqlite3.OperationalError:  # no table yet
            return {}
        finally:
            conn.close()

    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while len(rows()) < 20:
        assert first.poll() is None, f"the run ended before it could be killed:\n{first.stdout.read()}"
        assert time.monotonic() < deadline, "no records appeared within 300 s"
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    before = rows()
    assert 20 <= len(before) < EXPECTED, len(before)

    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    after = rows()
    assert all(after[k] == v for k, v in before.items()), "a record written before the kill was redone"
    assert {v[1] for k, v in after.items() if k not in before} == {2}, "the rest belongs to the second run"
    todo = re.search(r"(\d+) problem runs to do", second.stdout)
    assert todo and 0 < int(todo.group(1)) < 12 * 5, second.stdout  # of greedy + 3 PF budgets + one pool, 12 each
    _same(_records(db), one_machine)
