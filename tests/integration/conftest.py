"""Keep ``--dist loadgroup`` working for the real-server tests.

pytest-xdist 3.8 tags each worker's items with their ``xdist_group`` by appending
``@group`` to ``item._nodeid``; the controller then sends every test of a group to
one worker. Since pytest 9.2 ``Item.nodeid`` is derived from ``item._id`` (a
structured ``NodeId``), so that tag is lost and the group's tests are spread over
the workers — each of which would start its own pair of vLLM servers. This hook
re-applies the tag through ``_id`` when (and only when) xdist's own did not take.
"""

from __future__ import annotations

import pytest


@pytest.hookimpl(trylast=True)  # after xdist's own hook
def pytest_collection_modifyitems(config, items):
    if not getattr(config.option, "loadgroup", False):
        return
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # pytest < 9.2: xdist's tag works as it is
        return
    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        nodeid = item.nodeid
        if groups and nodeid.rfind("@") <= nodeid.rfind("]"):  # untagged (the test in xdist's _split_scope)
            item._id = NodeId.parse(f"{nodeid}@{'_'.join(groups)}")
