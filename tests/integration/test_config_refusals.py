"""Settings that used to pass `--check-config` and then fail at start (as a traceback, or as a
retry loop): `meshlet sidecar` as a real process refuses each of them in `--check-config` and
at start, naming the key; a port someone else holds stops the start with one line naming the
key and the address, before anything is registered."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_agent_process import (
    ENV,
    MESHLET,
    Proc,
    _free_port,
    _get,
    start_dev,
)

# Each case: the file's extra sections, the environment's extra variables, and what stderr
# must say (the key path and the values it allows).
CASES = {
    "vault kubernetes auth": (
        "certs: {source: vault, vault: {address: 'http://127.0.0.1:1', role: web, "
        "auth: kubernetes}}\n",
        {"VAULT_TOKEN": "t"},
        "certs.vault.auth: expected one of token, approle, got 'kubernetes'",
    ),
    "vault token not in the environment": (
        "certs: {source: vault, vault: {address: 'http://127.0.0.1:1', role: web}}\n",
        {},
        "certs.vault.auth: token needs VAULT_TOKEN in the environment",
    ),
    "service name no leaf can carry": (
        "",
        {},
        "service.name: 'web api' cannot be the service name in a SPIFFE ID; expected letters, "
        "digits, '.', '-' and '_' only",
    ),
    "sidecar port is the service port": (
        "",
        {},
        "sidecar.port: 127.0.0.1:8080 collides with service.port (127.0.0.1:8080); expected a "
        "port from 1 to 65535 that no other listener of this file uses",
    ),
    "upstream port is the admin port": (
        "",
        {},
        "collides with sidecar.upstreams[0].local_bind_port (127.0.0.1:{admin})",
    ),
}


def _write(path: Path, consul: str, case: str, admin_port: int) -> None:
    name = "web api" if case == "service name no leaf can carry" else "web"
    sidecar_port = 8080 if case == "sidecar port is the service port" else _free_port()
    up_port = admin_port if case == "upstream port is the admin port" else _free_port()
    path.write_text(
        f"consul: {{address: '{consul}'}}\n"
        f"service: {{name: '{name}', port: 8080, address: 127.0.0.1}}\n"
        f"sidecar:\n  port: {sidecar_port}\n"
        f"  upstreams:\n  - {{name: api, local_bind_port: {up_port}}}\n"
        f"admin: {{address: '127.0.0.1:{admin_port}'}}\n"
        "watch: {retry_initial: 50ms, retry_max: 500ms}\n"
        "shutdown: {drain_period: 0s}\n" + CASES[case][0]
    )


@pytest.fixture
def consul() -> Iterator[str]:
    port = _free_port()
    dev = start_dev(port)
    yield f"127.0.0.1:{port}"
    dev.stop()


@pytest.mark.parametrize("case", list(CASES))
def test_check_config_and_start_refuse_what_would_fail_later(
    tmp_path: Path, consul: str, case: str
) -> None:
    admin_port = _free_port()
    cfg = tmp_path / "agent.yaml"
    _write(cfg, consul, case, admin_port)
    env = {k: v for k, v in ENV.items() if not k.startswith("VAULT_")} | CASES[case][1]
    expected = CASES[case][2].format(admin=admin_port)
    for args in (["--check-config", "-c", str(cfg)], ["-c", str(cfg)]):
        # The start is refused before anything runs: bounded, not timed.
        done = subprocess.run(
            [MESHLET, "sidecar", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert "invalid configuration" in done.stderr
        assert expected in done.stderr, done.stderr
        assert "Traceback" not in done.stderr + done.stdout
    services, _ = _get(f"http://{consul}/v1/agent/services")
    assert services == {}  # nothing was registered, nothing to clean up


@pytest.mark.parametrize("which", ["sidecar.port", "sidecar.upstreams[0].local_bind_port"])
def test_a_port_held_by_another_process_stops_the_start_with_one_line(
    tmp_path: Path, consul: str, which: str
) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    busy = holder.getsockname()[1]
    inbound = busy if which == "sidecar.port" else _free_port()
    upstream = busy if which != "sidecar.port" else _free_port()
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"consul: {{address: '{consul}'}}\n"
        "service: {name: web, port: 8080, address: 127.0.0.1}\n"
        f"sidecar:\n  port: {inbound}\n"
        f"  upstreams:\n  - {{name: api, local_bind_port: {upstream}}}\n"
        f"admin: {{address: '127.0.0.1:{_free_port()}'}}\n"
        "watch: {retry_initial: 50ms, retry_max: 500ms}\n"
        "shutdown: {drain_period: 0s}\n"
    )
    try:
        # --check-config does not test-bind (it runs while the instance holds its ports).
        checked = subprocess.run(
            [MESHLET, "sidecar", "--check-config", "-c", str(cfg)],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=60,
            check=False,
        )
        assert checked.returncode == 0, checked.stderr
        proc = Proc(["sidecar", "-c", str(cfg)])
        try:
            out, _ = proc.p.communicate(timeout=60)  # exits by itself: no retry loop
        finally:
            proc.stop()
    finally:
        holder.close()
    assert proc.p.returncode == 69, out  # EX_UNAVAILABLE
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1, out
    assert errors[0].endswith(
        f"cannot listen on {which} 127.0.0.1:{busy}: Address already in use"
    ), out
    services, _ = _get(f"http://{consul}/v1/agent/services")
    assert services == {}
