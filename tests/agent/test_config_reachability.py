"""A sidecar whose public listener is on loopback while the service is registered at an
address peers on other hosts dial: the configuration is refused, naming the keys, at load and
by `--check-config`. Loopback everywhere (one host, devstack) stays valid."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError, parse, public_listener_problems
from tests.integration.test_agent_process import ENV, MESHLET


def _raw(service_address: str = "", sidecar_address: str = "") -> dict[str, Any]:
    service: dict[str, Any] = {"name": "web", "port": 8080}
    sidecar: dict[str, Any] = {"port": 21000}
    if service_address:
        service["address"] = service_address
    if sidecar_address:
        sidecar["address"] = sidecar_address
    return {"service": service, "sidecar": sidecar}


@pytest.mark.parametrize(
    ("service_address", "sidecar_address"),
    [
        ("10.0.0.5", "127.0.0.1"),
        ("10.0.0.5", "localhost"),
        ("2001:db8::5", "::1"),
        ("web.internal", "127.0.0.2"),
    ],
)
def test_loopback_listener_with_a_routable_service_is_refused(
    service_address: str, sidecar_address: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse(_raw(service_address, sidecar_address), {}, source="web.yaml")
    (problem,) = info.value.problems
    assert problem.path == "sidecar.address"
    assert f"bound to loopback ({sidecar_address})" in problem.message
    assert f"service.address registers the service at {service_address}" in problem.message
    assert "peers on other hosts could never reach it" in problem.message


@pytest.mark.parametrize(
    ("service_address", "sidecar_address"),
    [
        ("", ""),  # the node's address is not in the file: see the node_address cases
        ("127.0.0.1", ""),  # one host: bound and registered at loopback
        ("127.0.0.1", "10.0.0.5"),  # the VM recipe: app on loopback, sidecar on the node
        ("10.0.0.5", ""),  # the sidecar binds the service's address
        ("10.0.0.5", "10.0.0.6"),
    ],
)
def test_consistent_addresses_are_valid(service_address: str, sidecar_address: str) -> None:
    parse(_raw(service_address, sidecar_address), {})


def test_with_the_node_address_known_an_unset_address_is_caught() -> None:
    cfg = parse(_raw(), {})
    (problem,) = public_listener_problems(cfg, node_address="10.0.0.5")
    assert problem.path == "sidecar.address"
    assert "sidecar.address and service.address are empty" in problem.message
    assert "registers it at the node's address 10.0.0.5" in problem.message
    assert public_listener_problems(cfg, node_address="127.0.0.1") == []
    set_up = parse(_raw("127.0.0.1", "10.0.0.5"), {})
    assert public_listener_problems(set_up, node_address="10.0.0.5") == []


def test_check_config_names_the_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "web.yaml"
    cfg.write_text(
        "service: {name: web, port: 8080, address: 10.0.0.5}\n"
        "sidecar: {port: 21000, address: 127.0.0.1}\n"
    )
    for command in ("sidecar", "agent"):
        done = subprocess.run(
            [MESHLET, command, "--check-config", "-c", str(cfg)],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=30,
            check=False,
        )
        assert done.returncode == 2, done.stdout
        assert f"{cfg}: sidecar.address: the sidecar's public listener" in done.stderr
        assert "service.address registers the service at 10.0.0.5" in done.stderr
