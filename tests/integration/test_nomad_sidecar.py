"""`meshlet sidecar --nomad` as Nomad runs it: real processes against `meshlet dev`.

For web and api, the test does what Nomad does for a Connect group: it PUTs the registration
Nomad sends (parent service + Connect.SidecarService, tests/nomad/nomad_fixtures.py), writes
`envoy_bootstrap.json` (and for web an si_token) into the task's secrets directory, and starts
the sidecar with the command line of nomad/web-api.nomad.hcl's `sidecar_task` and Nomad's
environment. ACLs are on (default deny): the tokens Nomad hands over are what let meshlet in.
Then web -> api traffic goes over mTLS through both sidecars, and on exit Nomad's registrations
are still there, untouched (meshlet never writes or removes them).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.integration.mesh import start_app, status, wait_line, wait_status
from tests.integration.test_agent_process import Proc, _free_port
from tests.nomad.nomad_fixtures import bootstrap, parent_id, proxy_id, registration
from tests.nomad.nomad_specs import interpolate, labelled, load_job, one

ROOT = "root-t0ken"
ALLOC = "8f14e45f-ceea-467a-9c1e-5a1b2c3d4e5f"
# The environment of the test run, less anything that would tell meshlet where Consul is.
BASE_ENV = {
    k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "NOMAD_", "VAULT_"))
} | {"PYTHONSAFEPATH": "1"}


def _call(consul: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        f"http://{consul}{path}", data=data, method=method, headers={"X-Consul-Token": ROOT}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _spec_args(group: str, env: dict[str, str]) -> list[str]:
    """The sidecar_task's args in nomad/web-api.nomad.hcl, interpolated as Nomad would."""
    _, job = load_job("web-api.nomad.hcl")
    service = one(labelled(job["group"])[group]["service"], "service")
    task = one(one(service["connect"], "connect")["sidecar_task"], "sidecar_task")
    return [interpolate(a, env) for a in one(task["config"], "config")["args"]]


class NomadGroup:
    """One allocation's group: its app, Nomad's registration, its secrets and its sidecar."""

    def __init__(
        self,
        tmp: Path,
        consul: str,
        service: str,
        *,
        upstreams: tuple[tuple[str, int, str], ...] = (),
        si_token: str = "",
        boot_token: str = ROOT,
    ) -> None:
        self.service = service
        self.consul = consul
        self.app: ThreadingHTTPServer = start_app(service)
        self.app_port = self.app.server_address[1]
        self.proxy_port = _free_port()
        self.admin = f"127.0.0.1:{_free_port()}"
        self.proxy_id = proxy_id(ALLOC, service, service, str(self.app_port))
        self.parent_id = parent_id(ALLOC, service, service, str(self.app_port))
        self.registration = registration(
            alloc=ALLOC,
            group=service,
            service=service,
            app_port=self.app_port,
            proxy_port=self.proxy_port,
            upstreams=upstreams,
        )
        self.secrets = tmp / service / "secrets"
        self.secrets.mkdir(parents=True)
        self.secrets.joinpath("envoy_bootstrap.json").write_text(
            json.dumps(bootstrap(self.proxy_id, service, token=boot_token))
        )
        if si_token:
            self.secrets.joinpath("si_token").write_text(si_token + "\n")
        # What Nomad puts in a Connect sidecar task's environment (client/taskenv/env.go and
        # the envoy_bootstrap hook), plus the job's env block with the test's Consul.
        self.env = BASE_ENV | {
            "NOMAD_ALLOC_ID": ALLOC,
            "NOMAD_GROUP_NAME": service,
            "NOMAD_JOB_ID": "web-api",
            "NOMAD_SECRETS_DIR": str(self.secrets),
            "NOMAD_ALLOC_DIR": str(tmp / service / "alloc"),
            "NOMAD_TASK_DIR": str(tmp / service / "local"),
            f"NOMAD_PORT_connect_proxy_{service}": str(self.proxy_port),
            f"NOMAD_ALLOC_PORT_connect_proxy_{service}": str(self.proxy_port),
            f"NOMAD_ENVOY_ADMIN_ADDR_{service}": self.admin,
            f"NOMAD_ENVOY_READY_ADDR_{service}": f"127.0.0.1:{_free_port()}",
            "CONSUL_HTTP_ADDR": f"http://{consul}",
        }
        self.proc: Proc | None = None

    def register(self) -> None:
        assert _call(self.consul, "PUT", "/v1/agent/service/register", self.registration)[0] == 200

    def held(self) -> tuple[int, Any]:
        """Nomad's proxy registration as the Consul agent holds it now."""
        return _call(self.consul, "GET", f"/v1/agent/service/{self.proxy_id}")

    def start(self, *extra: str) -> Proc:
        self.proc = Proc(_spec_args(self.service, self.env) + list(extra), env=self.env)
        self.proc.wait_for_line("ready:")
        out = self.proc.p.stdout
        assert out is not None
        self.drain = threading.Thread(
            target=lambda: self.proc.lines.extend(out) if self.proc else None, daemon=True
        )
        self.drain.start()
        return self.proc

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        self.app.shutdown()
        self.app.server_close()


@pytest.fixture
def consul() -> Iterator[str]:
    port = _free_port()
    dev = Proc(
        [
            "dev",
            "--http-addr",
            f"127.0.0.1:{port}",
            "--acl-initial-management-token",
            ROOT,
            "--acl-default-policy",
            "deny",
        ]
    )
    try:
        dev.wait_for_line("HTTP API at http://")
        yield f"127.0.0.1:{port}"
    finally:
        dev.stop()


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _allow(consul: str, source: str, destination: str) -> None:
    entry = {
        "Kind": "service-intentions",
        "Name": destination,
        "Sources": [{"Name": source, "Action": "allow"}],
    }
    assert _call(consul, "PUT", "/v1/config", entry) == (200, True)


@pytest.fixture
def mesh(consul: str, tmp_path: Path) -> Iterator[tuple[NomadGroup, NomadGroup, int]]:
    web_upstream = _free_port()
    # api's token only in the bootstrap (no si_token: Nomad without workload identity);
    # web's in si_token, with a bootstrap token that would be refused if it were used.
    api = NomadGroup(tmp_path, consul, "api")
    web = NomadGroup(
        tmp_path,
        consul,
        "web",
        upstreams=(("api", web_upstream, "http"),),
        si_token=ROOT,
        boot_token="not-a-token",
    )
    try:
        _allow(consul, "web", "api")
        api.register()
        web.register()
        yield web, api, web_upstream
    finally:
        web.stop()
        api.stop()


def test_web_to_api_over_mtls_through_nomad_registered_sidecars(
    mesh: tuple[NomadGroup, NomadGroup, int],
) -> None:
    web, api, web_upstream = mesh
    api_before, web_before = api.held(), web.held()
    api.start()
    web.start()
    # Each sidecar says what it serves and where its token came from (never the token).
    assert web.proc is not None and api.proc is not None
    said = wait_line(web.proc, f"meshlet sidecar --nomad: {web.proxy_id}: service web")
    assert f"upstreams api on 127.0.0.1:{web_upstream}" in said
    assert f"Consul token from {web.secrets / 'si_token'}" in said
    said = wait_line(api.proc, f"meshlet sidecar --nomad: {api.proxy_id}: service api")
    assert f"public listener 127.0.0.1:{api.proxy_port}" in said
    assert "envoy_bootstrap.json (x-consul-token)" in said
    assert ROOT not in "".join(web.proc.lines + api.proc.lines)
    wait_status(
        web.admin,
        lambda s: (
            s["proxy"]["upstreams"].get("api", {}).get("endpoints") == 1
            and s["proxy"]["intentions"]["loaded"]
        ),
        "web's api endpoint",
    )
    wait_status(api.admin, lambda s: s["proxy"]["intentions"]["loaded"], "api's intentions")

    code, body = _get(web_upstream, "/orders?id=7")
    assert code == 200, body
    seen = json.loads(body)
    assert seen["app"] == "api" and seen["path"] == "/orders?id=7"
    web_uri = status(web.admin)["proxy"]["leaf"]["uri"]
    api_uri = status(api.admin)["proxy"]["leaf"]["uri"]
    assert web_uri.endswith("/svc/web") and api_uri.endswith("/svc/api")
    xfcc = seen["headers"]["x-forwarded-client-cert"]
    assert xfcc.startswith(f"By={api_uri};") and xfcc.endswith(f";URI={web_uri}")

    # The admin API is where Nomad told Envoy's to be, and it says who owns the registration.
    for group in (web, api):
        # Readiness is kept for /ready and /v1/status (reported to no check of meshlet's).
        st = wait_status(group.admin, lambda s: s["sidecar"]["ready"], "sidecar ready")
        assert st["registration"]["registrations"] == 0  # no PUT from meshlet, ever
        assert st["registration"]["phase"] == "registered"
    # Nomad's registrations are as Nomad made them: same definition, only Nomad's checks.
    assert (api.held(), web.held()) == (api_before, web_before)
    code, checks = _call(web.consul, "GET", "/v1/agent/checks")
    assert code == 200
    assert sorted(c["Name"] for c in checks.values() if c["ServiceID"] == web.proxy_id) == [
        f"Connect Sidecar Aliasing {web.parent_id}",
        "Connect Sidecar Listening",
    ]

    # Nomad stops a sidecar with SIGINT (its default kill_signal for sidecar tasks).
    for group in (web, api):
        assert group.proc is not None
        group.proc.p.send_signal(signal.SIGINT)
        assert group.proc.p.wait(30) == 0
        group.drain.join(30)
        assert any(
            f"leaving {group.proxy_id} registered: nomad owns it" in line
            for line in group.proc.lines
        )
    assert (api.held(), web.held()) == (api_before, web_before)
    code, parent = _call(web.consul, "GET", f"/v1/agent/service/{web.parent_id}")
    assert code == 200 and parent["Service"] == "web"


def test_nomads_stop_sequence_deregister_then_signal_is_not_undone(
    mesh: tuple[NomadGroup, NomadGroup, int], tmp_path: Path
) -> None:
    """Nomad deregisters the group's services, waits shutdown_delay, then signals. meshlet,
    whose anti-entropy would repair a registration of its own, leaves Nomad's gone."""
    _, api, _ = mesh
    settings = tmp_path / "meshlet.yaml"
    settings.write_text("watch: {anti_entropy_interval: 100ms, retry_initial: 50ms}\n")
    api.start("-c", str(settings))
    wait_status(api.admin, lambda s: s["sidecar"]["ready"], "api's sidecar ready")
    assert _call(api.consul, "PUT", f"/v1/agent/service/deregister/{api.parent_id}")[0] == 200
    assert api.proc is not None
    wait_line(api.proc, f"{api.proxy_id} was deregistered by nomad")
    # Several anti-entropy rounds later, still gone.
    wait_status(
        api.admin,
        lambda s: s["registration"]["phase"] == "deregistered",
        "api's registration seen gone",
    )
    assert api.held()[0] == 404
    api.proc.p.send_signal(signal.SIGINT)
    assert api.proc.p.wait(30) == 0
    assert api.held()[0] == 404
    assert status_code_of(api.consul, f"/v1/agent/service/{api.parent_id}") == 404


def status_code_of(consul: str, path: str) -> int:
    return _call(consul, "GET", path)[0]


@pytest.mark.parametrize(
    ("node", "token", "expected"),
    [
        ({"id": "../agent/self"}, "", "node.id: expected a Consul service ID"),
        (None, "t\r\nX-Injected: 1", "x-consul-token: expected an ACL token"),
    ],
)
def test_a_hostile_bootstrap_stops_the_sidecar_with_a_clear_error(
    consul: str, tmp_path: Path, node: Any, token: str, expected: str
) -> None:
    group = NomadGroup(tmp_path, consul, "api")
    try:
        group.register()
        boot = bootstrap(group.proxy_id, "api", token=token)
        if node is not None:
            boot["node"] = node
        path = group.secrets / "envoy_bootstrap.json"
        path.write_text(json.dumps(boot))
        proc = Proc(_spec_args("api", group.env), env=group.env)
        out, _ = proc.p.communicate(timeout=30)
        assert proc.p.returncode == 2, out
        assert out.startswith(f"meshlet sidecar --nomad: invalid configuration: {path}: ")
        assert expected in out
        assert "Traceback" not in out
        assert group.held()[0] == 200  # Nomad's registration untouched
    finally:
        group.stop()
