"""The Ray sweep's pieces that need no cluster: units, the workers' buffer, addresses."""

from __future__ import annotations

import pytest

from itscale.bench.config import validate_config
from itscale.bench.ray_sweep import Collected, make_units, parse_address
from itscale.bench.store import Record
from itscale.bench.sweep import Phase

def _phase(kind: str, n: int) -> Phase:
    from itscale.types import Problem

    problems = [Problem(f"p{i}", "Start at 1. Apply in order: +1.", "2") for i in range(n)]
    return Phase(kind, [], 4, 0, problems)


def test_units_cut_every_phase_into_chunks_and_keep_each_problem_once():
    phases = [_phase("run", 5), _phase("pool", 3)]
    units = make_units(phases, [], chunk=2)
    assert [len(u.problems) for u in units] == [2, 2, 1, 2, 1]
    assert [u.parent for u in units] == [0, 0, 0, 1, 1]
    for parent, phase in enumerate(phases):  # each problem in exactly one unit, its pool kept whole
        ids = [p.id for u in units if u.parent == parent for p in u.phase.todo]
        assert sorted(ids) == sorted(p.id for p in phase.todo) and len(ids) == len(set(ids))
        assert all(u.phase.kind == phase.kind for u in units if u.parent == parent)
    assert [u.index for u in units] == list(range(len(units)))


def test_collected_records_get_their_units_wall_time():
    rec = [Record("h", f"p{i}", "m", 1, 0, 1.0, 1.0, "2", "2", "ok", "", 3.0, 0.0, None, None, 1) for i in range(2)]
    c = Collected()
    c.add(rec[:1])
    c.add(rec[1:], {"pool": 1})
    c.set_wall_time([rec[0].key], [0.5])
    assert [r.wall_time for records, _ in c.items for r in records] == [0.5, None]
    assert c.items[1][1] == {"pool": 1}


@pytest.mark.parametrize("address", ["nonsense", "host:", ":6379", "host:99999", "ray://host"])
def test_a_malformed_address_names_the_field(address):
    with pytest.raises(ValueError, match="not a Ray address"):
        parse_address(address)
    with pytest.raises(Exception, match=r"ray\.address"):
        validate_config({"methods": [{"name": "greedy"}], "ray": {"address": address}})


def test_workers_fit_the_cluster_or_the_field_is_named():
    from itscale.bench.config import RayConfig
    from itscale.bench.ray_sweep import RayClusterError, _workers

    cluster = {"CPU": 16.0, "GPU": 4.0}
    assert _workers(RayConfig(), cluster) == 16  # default: the CPUs / num_cpus
    assert _workers(RayConfig(num_gpus=1), cluster) == 4  # GPUs bound it
    assert _workers(RayConfig(workers=64, num_gpus=0.5), cluster) == 8  # never more than Ray can place
    assert _workers(RayConfig(workers=2, num_cpus=2), cluster) == 2
    with pytest.raises(RayClusterError, match=r"ray\.num_gpus: each worker asks for 1 GPUs, the cluster has 0"):
        _workers(RayConfig(num_gpus=1), {"CPU": 8.0})
    with pytest.raises(RayClusterError, match=r"ray\.num_cpus"):
        _workers(RayConfig(num_cpus=4), {"CPU": 2.0})
