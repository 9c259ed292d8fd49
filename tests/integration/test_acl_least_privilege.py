"""`meshlet sidecar` (web -> api, traffic flowing) and `meshlet agent` run with exactly the
tokens docs/acl.md gives them, against `meshlet dev --acl-default-policy deny`; each rule of
those policies is needed: with any one removed, the process says what it was denied. No
process ever logs a token's secret.

Tokens and policies are made over the real ACL API with the management token, as
`consul acl policy create` / `consul acl token create` would.
"""

from __future__ import annotations

import json
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.integration.mesh import (
    drain_log,
    get,
    start_app,
    wait_line,
    wait_status,
    write_sidecar_config,
)
from tests.integration.test_agent_process import Proc, _free_port, start_dev

MANAGEMENT = str(uuid.uuid4())
NODE = "meshlet-dev"  # `meshlet dev`'s node name, which an agent rule names
HIDDEN = "ACLs hid part of the answer to GET /v1/health/connect/api"

# docs/acl.md's policies, rule by rule, with the text a process logs when that rule is gone.
SIDECAR_WEB = {
    'service "web" { policy = "write" }': "lacks permission 'service:write' on \"web\"",
    'service "web-sidecar-proxy" { policy = "write" }': (
        "lacks permission 'service:write' on \"web-sidecar-proxy\""
    ),
    'service "api" { policy = "read" }': "lacks permission 'service:read' on \"api\"",
    'service "api-sidecar-proxy" { policy = "read" }': HIDDEN,
    'node_prefix "" { policy = "read" }': HIDDEN,
    f'agent "{NODE}" {{ policy = "read" }}': f"lacks permission 'agent:read' on \"{NODE}\"",
}
SIDECAR_API = {
    'service "api" { policy = "write" }': "lacks permission 'service:write' on \"api\"",
    'service "api-sidecar-proxy" { policy = "write" }': (
        "lacks permission 'service:write' on \"api-sidecar-proxy\""
    ),
    # No node rule: its own registration (Proxy.Config: tracing, local app timeouts) is read
    # from the local agent, which needs service:read on api-sidecar-proxy only (the write rule).
    f'agent "{NODE}" {{ policy = "read" }}': f"lacks permission 'agent:read' on \"{NODE}\"",
}
AGENT = {
    'service "billing" { policy = "write" }': "lacks permission 'service:write' on \"billing\"",
    'service "api" { policy = "read" }': "lacks permission 'service:read' on \"api\"",
    'service "api-sidecar-proxy" { policy = "read" }': HIDDEN,
    'node_prefix "" { policy = "read" }': HIDDEN,
}
ROLES = {"web": SIDECAR_WEB, "api": SIDECAR_API, "agent": AGENT}


def consul(addr: str, method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        f"http://{addr}{path}", data=data, method=method, headers={"X-Consul-Token": MANAGEMENT}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def make_token(addr: str, name: str, rules: list[str]) -> str:
    """`consul acl policy create -name NAME -rules @file` then `consul acl token create
    -policy-name NAME`: the token's SecretID."""
    consul(addr, "PUT", "/v1/acl/policy", {"Name": name, "Rules": "\n".join(rules)})
    token = consul(addr, "PUT", "/v1/acl/token", {"Policies": [{"Name": name}]})
    secret: str = token["SecretID"]
    return secret


@dataclass
class AclMesh:
    tmp: Path
    procs: list[Proc] = field(default_factory=list)
    apps: list[ThreadingHTTPServer] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    drains: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        port = _free_port()
        self.addr = f"127.0.0.1:{port}"
        dev = start_dev(
            port,
            ("--acl-initial-management-token", MANAGEMENT, "--acl-default-policy", "deny"),
        )
        self.procs.append(dev)
        self.drains.append(drain_log(dev))
        self.api_app, self.web_app = start_app("api"), start_app("web")
        self.apps += [self.api_app, self.web_app]
        self.admin = {r: f"127.0.0.1:{_free_port()}" for r in ROLES}
        self.web_upstream = _free_port()
        self.api_otlp = f"http://127.0.0.1:{_free_port()}/v1/traces"
        consul(
            self.addr,
            "PUT",
            "/v1/config",
            {"Kind": "service-defaults", "Name": "api", "Protocol": "http"},
        )
        consul(
            self.addr,
            "PUT",
            "/v1/config",
            {
                "Kind": "service-intentions",
                "Name": "api",
                "Sources": [{"Name": "web", "Action": "allow"}],
            },
        )

    def token_file(self, role: str, rules: list[str]) -> Path:
        secret = make_token(self.addr, f"{role}-{len(self.secrets)}", rules)
        self.secrets.append(secret)
        path = self.tmp / f"{role}.token"
        path.write_text(secret + "\n")
        return path

    def start(self, role: str, rules: list[str]) -> Proc:
        token_file = self.token_file(role, rules)
        cfg = self.tmp / f"{role}.yaml"
        if role == "agent":
            cfg.write_text(
                f"consul: {{address: '{self.addr}', token_file: '{token_file}'}}\n"
                "service: {name: billing, port: 8080, check: {ttl: 60s}}\n"
                f"sidecar:\n  port: {_free_port()}\n  upstreams:\n"
                f"  - {{name: api, local_bind_port: {_free_port()}}}\n"
                f"admin: {{address: '{self.admin[role]}'}}\n"
                "watch: {retry_initial: 50ms, retry_max: 500ms}\n"
                "shutdown: {drain_period: 0s}\n"
            )
        else:
            app = self.api_app if role == "api" else self.web_app
            # api's own tracing, registered as its Proxy.Config.tracing and in force only once
            # its sidecar has read that registration back (nothing is sampled: 0 %).
            tracing = (
                f"telemetry: {{tracing: {{otlp_endpoint: '{self.api_otlp}', "
                "sampling_percent: 0}}\n"
            )
            write_sidecar_config(
                cfg,
                consul=self.addr,
                service=role,
                app_port=app.server_address[1],
                sidecar_port=_free_port(),
                admin=self.admin[role],
                protocol="http",
                upstreams=(("api", self.web_upstream, "http"),) if role == "web" else (),
                token_file=str(token_file),
                certs=tracing if role == "api" else "",
            )
        proc = Proc([("agent" if role == "agent" else "sidecar"), "-c", str(cfg)])
        self.procs.append(proc)
        self.drains.append(drain_log(proc))
        return proc

    def stop(self) -> list[str]:
        """Stop everything; every log line every process wrote."""
        for p in reversed(self.procs):
            p.stop()
        for t in self.drains:
            t.join(timeout=10)
        for app in self.apps:
            app.shutdown()
            app.server_close()
        return [line for p in self.procs for line in p.lines]


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[AclMesh]:
    m = AclMesh(tmp_path)
    try:
        yield m
    finally:
        lines = m.stop()
        # Tokens are never logged: not by devstack, the sidecars or the agent, in any run.
        leaked = [line for line in lines for s in [MANAGEMENT, *m.secrets] if s in line]
        assert not leaked, leaked


def test_minimal_tokens_run_the_mesh_and_the_agent(mesh: AclMesh) -> None:
    wait_line(mesh.start("api", list(SIDECAR_API)), "ready:")
    wait_status(mesh.admin["api"], lambda s: s["sidecar"]["ready"], "api's sidecar ready")
    # api's sidecar read its own registration with service rights only (on the old code the
    # catalog answered it with nothing, filtered by node:read, and tracing stayed off).
    wait_status(
        mesh.admin["api"],
        lambda s: s["proxy"]["tracing"]["otlp_endpoint"] == mesh.api_otlp,
        "api's tracing from its registration",
    )
    wait_line(mesh.start("web", list(SIDECAR_WEB)), "ready:")
    wait_status(
        mesh.admin["web"],
        lambda s: (
            s["proxy"]["upstreams"].get("api", {}).get("endpoints") == 1
            and s["proxy"]["intentions"]["loaded"]
        ),
        "web's api endpoint",
    )
    status_code, _, body = get(mesh.web_upstream, "/through-the-mesh")
    assert status_code == 200
    assert json.loads(body)["app"] == "api"
    assert "/through-the-mesh" in mesh.api_app.paths  # type: ignore[attr-defined]

    agent = mesh.start("agent", list(AGENT))
    wait_line(agent, "ready")
    wait_status(
        mesh.admin["agent"],
        lambda s: [len(u["endpoints"]) for u in s["upstreams"]] == [1],
        "the agent's api endpoint",
    )
    services = consul(mesh.addr, "GET", "/v1/catalog/services")
    assert {"api", "web", "billing"} <= set(services)
    for proc in mesh.procs[1:]:
        # Neither a refusal nor a filtered answer: the tokens hold exactly what is needed.
        assert not any("Permission denied" in line for line in proc.lines), proc.lines[-20:]
        assert not any("ACLs hid part" in line for line in proc.lines), proc.lines[-20:]


CASES = [(role, rule) for role, rules in ROLES.items() for rule in rules]


@pytest.mark.parametrize(("role", "missing"), CASES, ids=[f"{r}:{m}" for r, m in CASES])
def test_one_rule_less_fails_naming_what_was_denied(mesh: AclMesh, role: str, missing: str) -> None:
    if role in ("web", "agent"):
        # Failures to read an upstream show once api is there to be found.
        wait_line(mesh.start("api", list(SIDECAR_API)), "ready:")
        wait_status(mesh.admin["api"], lambda s: s["sidecar"]["ready"], "api's sidecar ready")
    rules = [r for r in ROLES[role] if r != missing]
    proc = mesh.start(role, rules)
    wait_line(proc, ROLES[role][missing])
