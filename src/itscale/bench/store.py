"""The bench's result store: one SQLite file in WAL mode, one row per finished unit of work.

A *record* is keyed by ``(config_hash, problem_id, method, budget, seed)``, where
``config_hash`` covers everything the record depends on besides those four (the method's
parameters, models, sampling settings, step format, problem set). A *pool* is the N whole
samples of one problem and seed that the best-of-N family is subsampled from; it is
written in the same transaction as every record derived from it. A *probe* is one problem's
difficulty probe for a compute-optimal allocation (:mod:`itscale.bench.allocation`), keyed by
``(probe_hash, problem_id, seed)``.

Every write is its own transaction, committed before the next unit of work starts, so
a run killed at any moment (even with SIGKILL) loses at most the unit in flight; a rerun
reads the keys already present and skips them.
"""

from __future__ import annotations

import csv
import json
import sqlite3
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Sequence

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    config_hash TEXT NOT NULL,
    problem_id TEXT NOT NULL,
    method TEXT NOT NULL,
    budget INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    score REAL NOT NULL,
    coverage REAL,
    answer TEXT,
    reference TEXT,
    status TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    generated_tokens REAL NOT NULL,
    prm_tokens REAL NOT NULL,
    flops REAL,
    wall_time REAL,
    run_id INTEGER,
    detail TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    PRIMARY KEY (config_hash, problem_id, method, budget, seed)
);
CREATE TABLE IF NOT EXISTS pools (
    pool_hash TEXT NOT NULL,
    problem_id TEXT NOT NULL,
    seed INTEGER NOT NULL,
    n INTEGER NOT NULL,
    samples TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (pool_hash, problem_id, seed, n)
);
CREATE TABLE IF NOT EXISTS probes (
    probe_hash TEXT NOT NULL,
    problem_id TEXT NOT NULL,
    seed INTEGER NOT NULL,
    difficulty REAL NOT NULL,
    generated_tokens REAL NOT NULL,
    prm_tokens REAL NOT NULL,
    answer TEXT,
    correct REAL NOT NULL,
    status TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '{}',
    run_id INTEGER,
    created REAL NOT NULL,
    PRIMARY KEY (probe_hash, problem_id, seed)
);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT,
    started REAL NOT NULL,
    finished REAL,
    config TEXT NOT NULL,
    environment TEXT NOT NULL DEFAULT '{}'
);
"""


@dataclass(frozen=True)
class Record:
    """One graded result: a method at a budget on one problem with one seed."""

    config_hash: str
    problem_id: str
    method: str
    budget: int
    seed: int
    score: float                 # 1/0 for a single run; the subset average for the best-of-N family
    coverage: float | None       # pass@budget (see bench.metrics)
    answer: str | None
    reference: str | None
    status: str                  # "ok", "all_dead", "error"
    message: str
    generated_tokens: float
    prm_tokens: float
    flops: float | None
    wall_time: float | None      # seconds per problem; filled in when its phase ends
    run_id: int | None = None
    detail: str = "{}"           # JSON: the solution and the candidates' answers and weights
    created: float = 0.0

    @property
    def key(self) -> tuple:
        return (self.config_hash, self.problem_id, self.method, self.budget, self.seed)


_COLUMNS = [f.name for f in fields(Record)]


@dataclass(frozen=True)
class ProbeRecord:
    """One problem's difficulty probe: its score, what it spent, and its own (graded) answer."""

    probe_hash: str
    problem_id: str
    seed: int
    difficulty: float
    generated_tokens: float
    prm_tokens: float
    answer: str | None           # the probe's own vote
    correct: float               # 1/0: whether that answer is right
    status: str                  # "ok" or "error" (an error is retried by the next run)
    message: str = ""
    detail: str = "{}"           # JSON: the k answers (and PRM scores)
    run_id: int | None = None
    created: float = 0.0


_PROBE_COLUMNS = [f.name for f in fields(ProbeRecord)]


class Store:
    """The SQLite store of one bench output folder (``bench.sqlite``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None)  # explicit transactions below
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process kills
        self.db.execute("PRAGMA busy_timeout=10000")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- runs -----------------------------------------------------------------------
    def start_run(self, config: dict, environment: dict) -> int:
        cur = self.db.execute("INSERT INTO runs (started, config, environment) VALUES (?, ?, ?)",
                              (time.time(), json.dumps(config, default=str), json.dumps(environment, default=str)))
        return int(cur.lastrowid)

    def finish_run(self, run_id: int) -> None:
        self.db.execute("UPDATE runs SET finished = ? WHERE run_id = ?", (time.time(), run_id))

    def runs(self) -> list[dict]:
        cur = self.db.execute("SELECT run_id, started, finished FROM runs ORDER BY run_id")
        return [dict(zip(("run_id", "started", "finished"), row)) for row in cur]

    # -- writes ---------------------------------------------------------------------
    def add(self, records: Sequence[Record], pool: dict | None = None) -> None:
        """Insert ``records`` (and the pool they were derived from) in one transaction."""
        now = time.time()
        rows = [tuple(getattr(r, c) if c != "created" else now for c in _COLUMNS) for r in records]
        with self._transaction():
            if pool is not None:
                self.db.execute("INSERT OR REPLACE INTO pools VALUES (?, ?, ?, ?, ?, ?)",
                                (pool["pool_hash"], pool["problem_id"], pool["seed"], pool["n"],
                                 json.dumps(pool["samples"]), now))
            self.db.executemany(f"INSERT OR REPLACE INTO records ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                                rows)

    def add_probe(self, probe: ProbeRecord) -> None:
        """Insert (or replace) one problem's probe in its own transaction."""
        row = tuple(getattr(probe, c) if c != "created" else time.time() for c in _PROBE_COLUMNS)
        with self._transaction():
            self.db.execute(f"INSERT OR REPLACE INTO probes ({', '.join(_PROBE_COLUMNS)}) "
                            f"VALUES ({', '.join('?' * len(_PROBE_COLUMNS))})", row)

    def set_wall_time(self, keys: Iterable[tuple], seconds: Sequence[float]) -> None:
        """Fill in per-problem wall time once the phase that produced ``keys`` has ended."""
        with self._transaction():
            self.db.executemany(
                "UPDATE records SET wall_time = ? WHERE config_hash = ? AND problem_id = ? AND method = ? "
                "AND budget = ? AND seed = ?", [(s, *k) for k, s in zip(keys, seconds)])

    def _transaction(self):
        db = self.db

        class _Tx:
            def __enter__(self_inner):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self_inner, exc_type, *_):
                db.execute("ROLLBACK" if exc_type else "COMMIT")

        return _Tx()

    # -- reads ----------------------------------------------------------------------
    def done(self, config_hash: str, method: str, budget: int, seed: int) -> set[str]:
        """Problem ids already recorded for this method, budget and seed (a run that failed
        with ``status="error"`` is not done: the next run retries it and replaces the record)."""
        cur = self.db.execute("SELECT problem_id FROM records WHERE config_hash = ? AND method = ? AND budget = ? "
                              "AND seed = ? AND status != 'error'", (config_hash, method, budget, seed))
        return {row[0] for row in cur}

    def records(self, selection: Iterable[tuple[str, str]] | None = None) -> list[Record]:
        """All records, or those whose ``(config_hash, method)`` is in ``selection``."""
        cur = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM records ORDER BY method, budget, seed, problem_id")
        out = [Record(*row) for row in cur]
        if selection is not None:
            wanted = set(selection)
            out = [r for r in out if (r.config_hash, r.method) in wanted]
        return out

    def probes(self, probe_hash: str, seed: int) -> dict[str, ProbeRecord]:
        """The stored probes of one probe configuration and seed, by problem id (errors included)."""
        cur = self.db.execute(f"SELECT {', '.join(_PROBE_COLUMNS)} FROM probes WHERE probe_hash = ? AND seed = ?",
                              (probe_hash, seed))
        return {row[1]: ProbeRecord(*row) for row in cur}

    def pool(self, pool_hash: str, problem_id: str, seed: int, n: int) -> list[dict] | None:
        row = self.db.execute("SELECT samples FROM pools WHERE pool_hash = ? AND problem_id = ? AND seed = ? AND n = ?",
                              (pool_hash, problem_id, seed, n)).fetchone()
        return None if row is None else json.loads(row[0])


def export_csv(records: Sequence[Record], path: str | Path) -> Path:
    """One CSV row per record (without the JSON ``detail``)."""
    path = Path(path)
    cols = [c for c in _COLUMNS if c != "detail"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in records:
            w.writerow([getattr(r, c) for c in cols])
    return path


def export_jsonl(records: Sequence[Record], path: str | Path) -> Path:
    """One JSON object per record, ``detail`` decoded."""
    path = Path(path)
    with path.open("w") as f:
        for r in records:
            row = asdict(r)
            row["detail"] = json.loads(r.detail)
            f.write(json.dumps(row) + "\n")
    return path
