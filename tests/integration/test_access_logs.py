"""Access logs through two `meshlet sidecar` processes, configured as Consul does: the
proxy-defaults entry's AccessLogs block, read by the sidecars' watch and applied without a
restart. Lines go to stdout (Type: stdout), which the test reads from the processes' logs.

Before the entry enables them, a denied request is still logged (on stderr); after it, every
request is one JSON line on each sidecar: allowed, denied (with the rule that decided) and a
5xx from the app, with the request id and the traceparent's trace id. An entry meshlet cannot
use is refused and the settings in force stay.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.mesh import (
    DEADLINE,
    Mesh,
    access_log_lines,
    deny_prefix_intention,
    metrics,
    running,
    wait_applied,
    wait_line,
    write_entry,
)
from tests.integration.profiled_mesh import profiled_mesh
from tests.integration.test_agent_process import Proc

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    with running(profiled_mesh(tmp_path)) as m:
        yield m


def _get(port: int, path: str, request_id: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(
            "GET",
            path,
            headers={"x-request-id": request_id, "traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"},
        )
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _records(proc: Proc, request_id: str) -> list[dict[str, Any]]:
    return access_log_lines(proc, "request_id", request_id)


def _record(proc: Proc, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE
    while True:
        got = _records(proc, request_id)
        if got:
            assert len(got) == 1, got
            return got[0]
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no access-log line for {request_id}:\n{''.join(proc.lines[-30:])}"
            )
        time.sleep(0.05)


def _put_defaults(consul: str, access_logs: dict[str, Any]) -> None:
    write_entry(consul, {"Kind": "proxy-defaults", "Name": "global", "AccessLogs": access_logs})


def test_access_logs_follow_proxy_defaults(mesh: Mesh) -> None:
    mesh.apply_intentions(deny_prefix_intention("/deny"))
    web, api = mesh.sidecars["web"], mesh.sidecars["api"]

    # Off: only the denial is logged, by the sidecar that denied it.
    assert _get(mesh.web_upstream, "/deny/early", "req-early-deny") == 403
    early = _record(api, "req-early-deny")
    assert early["response_code"] == 403
    assert early["intention"] == "deny"
    assert _get(mesh.web_upstream, "/ok", "req-early-ok") == 200
    assert _records(api, "req-early-ok") == []
    assert _records(web, "req-early-ok") == []

    _put_defaults(mesh.consul, {"Enabled": True, "Type": "stdout"})
    wait_line(web, "access logs: on")
    wait_applied(mesh.web_admin)
    wait_line(api, "access logs: on")
    wait_applied(mesh.api_admin)

    assert _get(mesh.web_upstream, "/ok?x=1", "req-ok") == 200
    sent, got = _record(web, "req-ok"), _record(api, "req-ok")
    assert sent["reporter"] == "source"
    assert sent["method"] == "GET"
    assert sent["path"] == "/ok?x=1"
    assert sent["response_code"] == 200
    assert sent["response_flags"] == "-"
    assert sent["bytes_sent"] == 2  # "ok"
    assert sent["upstream_cluster"] == "api"
    assert sent["upstream_host"] == f"127.0.0.1:{mesh.api_public}"
    assert sent["trace_id"] == TRACE
    assert got["reporter"] == "destination"
    assert got["peer"].endswith("/svc/web")
    assert got["intention"] == "allow"
    assert "permission 1" in got["rule"]  # the second permission (allow /) decided
    assert got["upstream_host"] == f"127.0.0.1:{mesh.api_app.server_address[1]}"
    assert got["trace_id"] == TRACE
    assert got["duration_ms"] >= 0

    assert _get(mesh.web_upstream, "/deny/x", "req-deny") == 403
    denied = _record(api, "req-deny")
    assert denied["response_code"] == 403
    assert denied["intention"] == "deny"
    assert "permission 0" in denied["rule"]
    assert _record(web, "req-deny")["response_code"] == 403

    assert _get(mesh.web_upstream, "/fail", "req-fail") == 500
    assert _record(api, "req-fail")["response_code"] == 500
    assert _record(web, "req-fail")["response_code"] == 500

    # An entry meshlet cannot use: refused, counted, and the logs stay on.
    _put_defaults(mesh.consul, {"Enabled": True, "Type": "syslog"})
    deadline = time.monotonic() + DEADLINE
    while True:
        text = metrics(mesh.web_admin)
        if "meshlet_config_snapshots_rejected_total 1.0" in text:
            break
        assert time.monotonic() < deadline, text[-2000:]
        time.sleep(0.05)
    assert _get(mesh.web_upstream, "/ok", "req-after") == 200
    assert _record(web, "req-after")["response_code"] == 200

    # Disabled again without a restart: back to denials only.
    _put_defaults(mesh.consul, {"Enabled": False})
    wait_line(web, "access logs: off")
    wait_applied(mesh.web_admin)
    assert _get(mesh.web_upstream, "/ok", "req-off") == 200
    assert _get(mesh.web_upstream, "/deny/late", "req-late-deny") == 403
    assert _record(api, "req-late-deny")["intention"] == "deny"
    assert _records(web, "req-off") == []
