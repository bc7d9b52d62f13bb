"""Run a bench sweep's work on a Ray cluster; the driver alone writes the store.

The plan is the one-machine plan (:func:`itscale.bench.sweep.plan`): phases of one method at
one budget and seed (or one pool of the best-of-N family). Here each phase is cut into
*units* of at most ``ray.chunk`` problems; a unit of a pooled phase carries every pooled
method, so a problem's shared pool is sampled once, by one worker, and all the records
derived from it come back together.

Workers are Ray actors (:class:`BenchWorker`), each loading the backends once with the
resources the config asks for (``num_cpus``, ``num_gpus``: Ray places the actor, and a local
model goes to the GPU Ray gave it; an HTTP model is shared by every worker). A worker runs a
unit exactly as one machine runs a phase (:meth:`Sweep.run_phase`, batched across the
unit's problems, caches cleared first) into a :class:`Collected` buffer instead of the
store, and returns it. The driver keeps ``depth`` units in flight per worker, takes results
as they arrive (:func:`ray.wait`), and writes each unit in the store, one problem per
transaction, as on one machine.

What happens on failure:

- a worker that dies (killed, out of memory, its node lost) is restarted by Ray
  (``max_restarts``); its units in flight come back as errors and go back in the queue, to
  be run again by any worker, at most ``ray.retries`` times each;
- a unit is written only from a worker's complete result, so the store never holds half a
  unit, and a unit run twice (its first worker died after finishing it) is written once:
  records are keyed (config hash, problem, method, budget, seed) and the driver skips units
  it has written;
- the driver itself killed: what it wrote is in the store and a rerun plans only the rest.

The unit's wall time is measured by its worker; a record's ``wall_time`` is that unit's time
divided by its problems, as a phase's is on one machine (so it reads per-problem latency at
the unit's batch size, not the cluster's throughput: :class:`RaySummary` has that).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..types import Problem
from .store import Record
from .sweep import Phase

#: Units kept in flight per worker: the next one is queued while the current one runs.
DEPTH = 2
#: Seconds a TCP connection to the cluster's address may take before the address counts as unreachable.
CONNECT_TIMEOUT = 5.0


class RayClusterError(RuntimeError):
    """The Ray cluster cannot be reached or cannot run the sweep; the message says what to do."""


def parse_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` or ``ray://HOST:PORT``; a ValueError says what is wrong."""
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not a Ray address: give HOST:PORT of the head node (e.g. 10.0.0.1:6379, "
                         "printed by `ray start --head`), ray://HOST:10001 for Ray client, or 'auto'")
    return host.strip("[]"), int(port)


def connect(address: str | None):
    """Connect to the cluster (``None``: ``RAY_ADDRESS``, else start one on this machine) and
    return the ``ray`` module; already connected, the connection this process has. An address
    nothing answers at fails in seconds, before Ray's own minute-long retries, with a
    :class:`RayClusterError`."""
    try:
        import ray
    except ImportError:
        raise RayClusterError("ray: the Ray package is not installed: pip install 'itscale[ray]'") from None
    if ray.is_initialized():  # (run_bench connects first, then run_on_ray asks again)
        return ray
    target = address or os.environ.get("RAY_ADDRESS")
    if target and target not in ("auto", "local"):
        host, port = parse_address(target)
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
        except OSError as err:
            raise RayClusterError(f"ray.address: no Ray cluster answers at {target!r} ({err}); start one with "
                                  "`ray start --head` and give the address it prints, or omit the address to "
                                  "start a cluster on this machine") from None
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError) as err:
        raise RayClusterError(f"ray.address: could not join the Ray cluster at {target or 'this machine'}: "
                              f"{err}") from None
    return ray


@dataclass
class Collected:
    """What a worker writes instead of the store (it has the store's three write methods)."""

    items: list[tuple[list[Record], dict | None]] = field(default_factory=list)
    probes: list = field(default_factory=list)

    def add(self, records: Sequence[Record], pool: dict | None = None) -> None:
        self.items.append((list(records), pool))

    def add_probe(self, probe) -> None:
        self.probes.append(probe)

    def set_wall_time(self, keys, seconds) -> None:
        wall = dict(zip(map(tuple, keys), seconds))
        self.items = [([dataclasses.replace(r, wall_time=wall.get(r.key, r.wall_time)) for r in records], pool)
                      for records, pool in self.items]


@dataclass(frozen=True)
class Unit:
    """Part of one phase (``phase`` with ``todo`` cut to the unit's problems), or a batch of
    allocation probes (``phase`` None)."""

    index: int
    phase: Phase | None
    problems: tuple[Problem, ...]
    parent: int  # index of the phase in the plan (-1: probes)


@dataclass
class UnitResult:
    index: int
    collected: Collected
    seconds: float
    node: str
    pid: int


@dataclass
class RaySummary:
    """What the cluster did: units run and rerun, and where."""

    workers: int
    units: int
    retried: int = 0
    seconds: float = 0.0                      # the driver's wall time from the first unit sent to the last written
    busy: float = 0.0                         # the workers' summed unit time
    driver: float = 0.0                       # the driver's time taking results (ray.get) and writing them
    by_node: collections.Counter = field(default_factory=collections.Counter)


def make_units(phases: Sequence[Phase], probes: Sequence[Problem], chunk: int) -> list[Unit]:
    """Phases cut into units of at most ``chunk`` problems, in plan order, then the probes."""
    units: list[Unit] = []
    for parent, phase in enumerate(phases):
        for start in range(0, len(phase.todo), chunk):
            part = tuple(phase.todo[start:start + chunk])
            units.append(Unit(len(units), dataclasses.replace(phase, todo=list(part)), part, parent))
    for start in range(0, len(probes), chunk):
        units.append(Unit(len(units), None, tuple(probes[start:start + chunk]), -1))
    return units


class BenchWorker:
    """A Ray actor's body: the backends loaded once, then units run on request."""

    def __init__(self, config, run_id: int, fingerprint: str):
        from .backends import load_backends
        from .grading import Grader

        self.config = config
        self.run_id, self.fingerprint = run_id, fingerprint
        self.backends = load_backends(self.config)
        self.grader = Grader()

    def where(self) -> tuple[str, int]:
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()

    def run(self, unit: Unit) -> UnitResult:
        from .allocation import run_probes
        from .sweep import Sweep, run_phases

        collected = Collected()
        t0 = time.perf_counter()
        if unit.phase is not None:
            run_phases(Sweep(self.config, self.backends, collected, self.grader, self.run_id), [unit.phase])
        else:
            run_probes(self.config, self.backends, collected, self.grader, unit.problems, self.fingerprint,
                       self.run_id)
        node, pid = self.where()
        return UnitResult(unit.index, collected, time.perf_counter() - t0, node, pid)


def run_on_ray(config, store, phases: Sequence[Phase], probes: Sequence[Problem], fingerprint: str, run_id: int,
               on_unit: Callable[[Unit, UnitResult], None] = lambda unit, result: None,
               on_start: Callable[[int], None] = lambda workers: None) -> RaySummary:
    """Run ``phases`` and ``probes`` on the cluster ``config.ray`` names, writing every result
    to ``store`` as it arrives; ``on_unit`` is called after each unit is written."""
    settings = config.ray
    ray = connect(settings.address)
    from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

    workers = _workers(settings, ray.cluster_resources())
    units = make_units(phases, probes, settings.chunk)
    summary = RaySummary(workers, len(units))
    if not units:
        return summary
    actor = ray.remote(BenchWorker).options(num_cpus=settings.num_cpus, num_gpus=settings.num_gpus,
                                            max_restarts=max(settings.retries, 1), max_task_retries=0)
    handles = [actor.remote(config, run_id, fingerprint) for _ in range(min(workers, len(units)))]
    summary.workers = len(handles)  # (no more workers than units)
    try:
        _wait_ready(ray, handles, RayActorError)
        on_start(len(handles))
        pool = _Pool(ray, handles, ActorDiedError, RayActorError)
        queue = collections.deque((u, 0) for u in units)
        in_flight: dict[Any, tuple[Unit, int, int]] = {}  # ref -> (unit, attempt, worker)
        written: set[int] = set()
        t0 = time.perf_counter()
        while queue or in_flight:
            for w in sorted(pool.up):
                while queue and sum(1 for _, _, x in in_flight.values() if x == w) < DEPTH:
                    unit, attempt = queue.popleft()
                    in_flight[handles[w].run.remote(unit)] = (unit, attempt, w)
            ready = pool.wait(list(in_flight))
            for ref in ready:
                unit, attempt, w = in_flight.pop(ref)
                started = time.perf_counter()
                try:
                    result: UnitResult = ray.get(ref)
                except RayActorError as err:  # the worker died (or is restarting): the unit goes back
                    pool.lost(w)
                    if attempt >= settings.retries:
                        raise RayClusterError(f"a work unit ({_describe(unit)}) lost its worker {attempt + 1} "
                                              f"times; last: {_first_line(err)}. What finished is in the store: "
                                              "rerun to resume") from None
                    summary.retried += 1
                    queue.appendleft((unit, attempt + 1))
                    continue
                except RayTaskError as err:  # the unit itself raised: rerunning it would raise again
                    raise RayClusterError(f"a work unit ({_describe(unit)}) failed on its worker: "
                                          f"{_first_line(err.cause if err.cause is not None else err)}") from None
                if result.index in written:
                    continue
                for records, pool_row in result.collected.items:
                    store.add(records, pool_row)
                for probe in result.collected.probes:
                    store.add_probe(probe)
                summary.driver += time.perf_counter() - started
                written.add(result.index)
                summary.busy += result.seconds
                summary.by_node[result.node] += 1
                on_unit(unit, result)
        summary.seconds = time.perf_counter() - t0
    finally:
        for handle in handles:
            ray.kill(handle)
    return summary


class _Pool:
    """Which workers take units: a worker whose unit failed is left out until a ping says Ray
    has restarted it (its backends loaded again), or for good once Ray gives it up."""

    PING_EVERY = 0.5  # seconds between pings of a restarting worker

    def __init__(self, ray, handles, died_error, actor_error):
        self.ray, self.handles, self.died_error, self.actor_error = ray, handles, died_error, actor_error
        self.up = set(range(len(handles)))
        self.dead: set[int] = set()
        self.pings: dict[Any, int] = {}
        self.due: dict[int, float] = {}

    def lost(self, w: int) -> None:
        if w in self.up:
            self.up.discard(w)
            self.due[w] = time.monotonic()

    def wait(self, refs: list) -> list:
        """The unit refs that are ready (at least one, unless no worker can run any)."""
        while True:
            now = time.monotonic()
            for w, at in list(self.due.items()):
                if at <= now:
                    del self.due[w]
                    self.pings[self.handles[w].where.remote()] = w
            if not self.up and not self.pings and not self.due:
                raise RayClusterError("every Ray worker died and Ray gave up restarting them; what finished is in "
                                      "the store: rerun to resume")
            ready, _ = self.ray.wait(refs + list(self.pings), num_returns=1, timeout=self.PING_EVERY)
            done = [r for r in ready if r not in self.pings]
            for ping in [r for r in ready if r in self.pings]:
                w = self.pings.pop(ping)
                try:
                    self.ray.get(ping)
                    self.up.add(w)
                except self.died_error:
                    self.dead.add(w)
                except self.actor_error:  # still restarting
                    self.due[w] = time.monotonic() + self.PING_EVERY
            if done or (self.up and not refs):
                return done


def _workers(settings, resources: dict) -> int:
    """How many workers to start: ``ray.workers``, at most as many as the cluster's CPUs and GPUs
    hold (a worker Ray cannot place would wait forever); a worker that fits nowhere is an error."""
    asked = {"num_cpus": (settings.num_cpus, resources.get("CPU", 0.0)),
             "num_gpus": (settings.num_gpus, resources.get("GPU", 0.0))}
    fits = min(int(have // need) for need, have in asked.values() if need > 0)
    if fits < 1:
        field, (need, have) = next((k, v) for k, v in asked.items() if v[0] > v[1])
        what = "CPUs" if field == "num_cpus" else "GPUs"
        raise RayClusterError(f"ray.{field}: each worker asks for {need:g} {what}, the cluster has {have:g}; "
                              f"lower ray.{field} or add nodes with {what}")
    return min(settings.workers or fits, fits)


def _wait_ready(ray, pool, actor_error) -> None:
    """Every worker has loaded its backends, or the first one's error, named."""
    try:
        ray.get([handle.where.remote() for handle in pool])
    except actor_error as err:
        raise RayClusterError(f"a Ray worker could not load the backends: {_first_line(err)}") from None


def _describe(unit: Unit) -> str:
    what = unit.phase.label if unit.phase is not None else "allocation probes"
    return f"{what}, {len(unit.problems)} problems from {unit.problems[0].id}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
