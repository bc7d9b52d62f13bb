"""Kill `itscale bench` with SIGKILL mid-run, restart it, and check that nothing is lost or redone.

Real parts: the embedded policy, the `itscale` command in a subprocess, the SQLite store.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from itscale import zoo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROBLEMS = 24
CONFIG = f"""
problems: {{source: arithmetic:medium, limit: {PROBLEMS}}}
prm: {{model: none}}
policy: {{threads: 1}}
methods:
  - {{name: greedy}}
  - {{name: self_consistency, label: majority_vote}}
  - {{name: adaptive_self_consistency}}
budgets: [1, 2, 4]
concurrency: 3
"""
EXPECTED = PROBLEMS * (1 + 3 + 3)


def rows(db_path) -> dict[tuple, tuple]:
    if not db_path.exists():
        return {}
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        return {tuple(r[:4]): tuple(r[4:]) for r in db.execute(
            "SELECT problem_id, method, budget, seed, created, run_id, score, answer, status FROM records")}
    except sqlite3.OperationalError:  # the table does not exist yet
        return {}
    finally:
        db.close()


def bench(config, out, **kw):
    return subprocess.Popen([sys.executable, "-m", "itscale.cli", "bench", str(config), "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.skipif(not (zoo.policy_path() / "config.json").exists(), reason="the embedded policy is not built")
def test_sigkill_mid_run_then_resume_finishes_without_redoing_or_losing_work(tmp_path):
    config, out = tmp_path / "bench.yaml", tmp_path / "out"
    config.write_text(CONFIG)
    db = out / "bench.sqlite"

    first = bench(config, out)
    deadline = time.monotonic() + 300
    while len(rows(db)) < 10:
        assert first.poll() is None, f"the run ended before it could be killed:\n{first.stdout.read()}"
        assert time.monotonic() < deadline, "no records appeared within 300 s"
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    before = rows(db)
    assert 10 <= len(before) < EXPECTED, len(before)

    second = bench(config, out)
    log, _ = second.communicate(timeout=600)
    assert second.returncode == 0, log
    after = rows(db)
    assert len(after) == EXPECTED
    assert all(after[k] == v for k, v in before.items()), "a record committed before the kill changed"
    assert {v[1] for k, v in after.items() if k not in before} == {2}, "new records belong to the second run"
    assert {v[4] for v in after.values()} == {"ok"}
    assert "problem runs to do" in log and "majority_vote" in log

    third = bench(config, out)
    log, _ = third.communicate(timeout=300)
    assert third.returncode == 0 and "nothing to do" in log
    assert rows(db) == after
