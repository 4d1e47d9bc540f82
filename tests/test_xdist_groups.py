"""The suite's split over two processes holds: each expensive session fixture is built once."""

from __future__ import annotations

import pytest
from conftest import SHARED_FIXTURES


def test_tests_of_a_shared_fixture_share_one_xdist_group(request):
    """Under ``-n 2 --dist loadgroup`` xdist appends ``@group`` to a grouped test's node id and
    schedules by it; when that silently stops (pytest 9.2 with xdist 3.8) the two-round EMT
    campaign is built in both processes and the suite runs eight minutes longer."""
    users = [item for item in request.session.items if set(SHARED_FIXTURES) & set(item.fixturenames)]
    if not users:
        pytest.skip("no test of a shared session fixture was collected in this run")
    for item in users:
        groups = {mark.args[0] for mark in item.iter_markers("xdist_group")}
        assert len(groups) == 1, f"{item.nodeid}: groups {groups}"
        if request.config.getvalue("loadgroup"):  # inside an xdist worker of --dist loadgroup
            assert item.nodeid.endswith(f"@{groups.pop()}"), f"{item.nodeid} is not scheduled by its group"
