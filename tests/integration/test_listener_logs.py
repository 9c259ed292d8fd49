"""Consul's listener logs (AccessLogs.DisableListenerLogs): with access logs on, a connection
the inbound listener refuses before it carries anything (here: plaintext bytes on the mTLS
port, as a scanner or a misconfigured client sends them) is one access-log line on the
callee's sidecar; with DisableListenerLogs it is not logged (it is still refused and
counted)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.mesh import (
    DEADLINE,
    Mesh,
    access_log_lines,
    running,
    wait_applied,
    wait_line,
    write_entry,
)
from tests.integration.profiled_mesh import profiled_mesh
from tests.integration.test_agent_process import Proc


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    with running(profiled_mesh(tmp_path)) as m:
        yield m


def _plaintext(port: int) -> str:
    """Raw HTTP bytes to the mTLS port; the address the sidecar saw them from."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        host, port = s.getsockname()[:2]
        local = f"{host}:{port}"
        s.sendall(b"GET /admin HTTP/1.1\r\nHost: api\r\n\r\n")
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
    return local


def _listener_lines(proc: Proc, address: str) -> list[dict[str, Any]]:
    return access_log_lines(proc, "downstream_remote_address", address)


def _put(consul: str, access_logs: dict[str, Any]) -> None:
    write_entry(consul, {"Kind": "proxy-defaults", "Name": "global", "AccessLogs": access_logs})


def test_refused_connections_are_listener_logs(mesh: Mesh) -> None:
    api = mesh.sidecars["api"]
    _put(mesh.consul, {"Enabled": True, "Type": "stdout"})
    wait_line(api, "access logs: on")
    wait_applied(mesh.api_admin)

    address = _plaintext(mesh.api_public)
    deadline = time.monotonic() + DEADLINE
    while not (got := _listener_lines(api, address)):
        assert time.monotonic() < deadline, "".join(api.lines[-30:])
        time.sleep(0.05)
    assert len(got) == 1, got
    record = got[0]
    assert record["listener"] is True
    assert record["reporter"] == "destination"
    assert record["upstream_cluster"] == "api"
    assert "TLS handshake failed (plaintext)" in record["listener_refusal"]
    assert record["bytes_received"] == record["bytes_sent"] == 0

    _put(mesh.consul, {"Enabled": True, "Type": "stdout", "DisableListenerLogs": True})
    wait_line(api, "access logs: on, listener logs off")
    wait_applied(mesh.api_admin)
    quiet = _plaintext(mesh.api_public)
    # Listener logs on again: refusals are logged again (tried until one is: the entry takes
    # a moment to reach the sidecar), and the one made while they were off never was.
    _put(mesh.consul, {"Enabled": True, "Type": "stdout"})
    deadline = time.monotonic() + DEADLINE
    tried: list[str] = []
    while not any(_listener_lines(api, a) for a in tried):
        assert time.monotonic() < deadline, "".join(api.lines[-30:])
        tried.append(_plaintext(mesh.api_public))
        time.sleep(0.2)
    assert _listener_lines(api, quiet) == []
