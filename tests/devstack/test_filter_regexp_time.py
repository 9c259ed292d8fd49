"""`?filter=... matches "<regexp>"` is evaluated with RE2, as Go's regexp evaluates it: time
linear in the filtered values whatever the pattern. With Python's `re`, `^(a+)+$` against a
service whose meta holds 64 letters and a `!` held devstack's event loop for ever (every client of
the control plane stalled), and any client may send a filter. Found while writing the fuzz targets
(tests/fuzz)."""

from __future__ import annotations

import pytest

from tests.conftest import Http

EVIL = "a" * 64 + "!"


# A hang is a failure: without RE2 the first GET never returns (pytest-timeout ends it).
@pytest.mark.timeout(30)
async def test_a_backtracking_filter_cannot_stall_devstack(http: Http) -> None:
    body = {"Name": "web", "ID": "web-1", "Port": 8080, "Meta": {"m": EVIL}}
    assert (await http.put("/v1/agent/service/register", json=body))[0] == 200
    for expression, want in (
        ('Meta.m matches "^(a+)+$"', []),
        ('Meta.m matches "^(a|aa)+$"', []),
        ('Meta.m matches "^(a+)+!$"', ["web-1"]),
    ):
        status, services, _ = await http.get("/v1/agent/services", params={"filter": expression})
        assert status == 200, services
        assert sorted(services) == want, expression
