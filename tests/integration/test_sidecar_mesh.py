"""Two `meshlet sidecar` processes against `meshlet dev`, with real upstream HTTP apps.

web's app (this test) calls api through web's local upstream port; web's sidecar carries it
over mTLS (leaves from devstack's Connect CA) to api's sidecar, which enforces intentions and
forwards to api's app with X-Forwarded-Client-Cert. A deny intention written to Consul turns
the next requests into 403s (L7, api speaks http) or refused connections (L4, api speaks tcp).
Waits are on log lines, the sidecars' /v1/status and Consul blocking queries; never sleeps.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_agent_process import ENV, Proc, _free_port, start_dev, wait_catalog

DEADLINE = 60.0


class _App(BaseHTTPRequestHandler):
    """An upstream application: answers with its name and the headers it got."""

    protocol_version = "HTTP/1.1"
    name = "app"

    def do_GET(self) -> None:
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        body = json.dumps(
            {
                "app": self.name,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def start_app(name: str) -> ThreadingHTTPServer:
    handler = type(f"App_{name}", (_App,), {"name": name})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.paths = []  # type: ignore[attr-defined]
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _json(method: str, url: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def write_sidecar_config(
    path: Path,
    *,
    consul: str,
    service: str,
    app_port: int,
    sidecar_port: int,
    admin: str,
    protocol: str,
    certs: str = "",
    upstreams: tuple[tuple[str, int, str], ...] = (),
    service_id: str = "",
) -> None:
    ups = "".join(
        f"    - {{name: {n}, local_bind_port: {p}, protocol: {proto}}}\n"
        for n, p, proto in upstreams
    )
    ident = f"  id: {service_id}\n" if service_id else ""  # default: the service's name
    path.write_text(
        f"consul: {{address: '{consul}'}}\n"
        f"service:\n  name: {service}\n  port: {app_port}\n  address: 127.0.0.1\n"
        f"{ident}"
        f"  check: {{http: 'http://127.0.0.1:{app_port}/health', interval: 1s}}\n"
        f"sidecar:\n  port: {sidecar_port}\n  protocol: {protocol}\n  check_ttl: 3s\n"
        f"  upstreams:\n{ups or '    []'}\n"
        f"admin: {{address: '{admin}'}}\n"
        f"{certs}"
        "watch: {retry_initial: 50ms, retry_max: 500ms}\n"
        "shutdown: {drain_period: 0s}\n"
    )


def _drain(proc: Proc) -> threading.Thread:
    """Keep reading the process's log so a chatty sidecar never blocks on a full pipe; the
    thread ends at the process's EOF."""
    out = proc.p.stdout
    assert out is not None
    thread = threading.Thread(target=lambda: proc.lines.extend(out), daemon=True)
    thread.start()
    return thread


def status(admin: str) -> Any:
    return _json("GET", f"http://{admin}/v1/status")


def wait_status(admin: str, done: Any, what: str) -> Any:
    """Poll the sidecar's admin status until `done(status)`; fail after DEADLINE."""
    deadline = time.monotonic() + DEADLINE
    while True:
        st = status(admin)
        if done(st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {json.dumps(st)[:2000]}")
        # Status is cheap and local; a short poll interval is the wait, not an assertion.
        time.sleep(0.05)


def wait_line(proc: Proc, text: str) -> str:
    """The first line of the process's log that contains `text` (its drain thread reads
    the log as it comes); fail after DEADLINE."""
    deadline = time.monotonic() + DEADLINE
    while True:
        found = next((line for line in list(proc.lines) if text in line), None)
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line with {text!r}:\n{''.join(proc.lines[-50:])}")
        time.sleep(0.05)


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def put_intentions(consul: str, destination: str, action: str) -> int:
    entry = {
        "Kind": "service-intentions",
        "Name": destination,
        "Sources": [{"Name": "web", "Action": action}],
    }
    assert _json("PUT", f"http://{consul}/v1/config", entry) is True
    got = _json("GET", f"http://{consul}/v1/config/service-intentions/{destination}")
    return int(got["ModifyIndex"])


class Mesh:
    def __init__(
        self, tmp: Path, protocol: str, certs: str = "consul", dev_args: tuple[str, ...] = ()
    ) -> None:
        self.procs: list[Proc] = []
        self.apps: list[ThreadingHTTPServer] = []
        self.tmp = tmp
        self.protocol = protocol
        port = _free_port()
        self.consul = f"127.0.0.1:{port}"
        self.env = ENV
        self.certs = ""
        if certs == "consul":
            self.procs.append(start_dev(port, dev_args))
        else:
            vault = f"127.0.0.1:{_free_port()}"
            dev = Proc(
                ["dev", "--http-addr", self.consul, "--vault-addr", vault, "--vault-token", "t0k"]
            )
            self.procs.append(dev)
            dev.wait_for_line("Vault PKI API at")
            self.env = {**ENV, "VAULT_TOKEN": "t0k"}
            self.certs = (
                f"certs: {{source: vault, vault: {{address: 'http://{vault}', role: meshlet}}}}\n"
            )
        self.api_app = start_app("api")
        self.web_app = start_app("web")
        self.apps += [self.api_app, self.web_app]
        self.web_admin = f"127.0.0.1:{_free_port()}"
        self.api_admin = f"127.0.0.1:{_free_port()}"
        self.api_public = _free_port()
        self.web_public = _free_port()
        self.web_upstream = _free_port()

    def start(self, web_args: tuple[str, ...] = (), web_sidecar: str = "") -> None:
        """api's sidecar, then (once api passes its checks, so every web process's first
        answer has it) web's with `web_args` added to its command line and `web_sidecar`
        (indented YAML lines) to its config's `sidecar` section."""
        _json(
            "PUT",
            f"http://{self.consul}/v1/config",
            {"Kind": "service-defaults", "Name": "api", "Protocol": self.protocol},
        )
        api_cfg, web_cfg = self.tmp / "api.yaml", self.tmp / "web.yaml"
        write_sidecar_config(
            api_cfg,
            consul=self.consul,
            service="api",
            app_port=self.api_app.server_address[1],
            sidecar_port=self.api_public,
            admin=self.api_admin,
            protocol=self.protocol,
            certs=self.certs,
        )
        write_sidecar_config(
            web_cfg,
            consul=self.consul,
            service="web",
            app_port=self.web_app.server_address[1],
            sidecar_port=self.web_public,
            admin=self.web_admin,
            protocol="http",
            certs=self.certs,
            upstreams=(("api", self.web_upstream, self.protocol),),
        )
        if web_sidecar:
            text = web_cfg.read_text().replace("sidecar:\n", "sidecar:\n" + web_sidecar, 1)
            web_cfg.write_text(text)
        self.sidecars: dict[str, Proc] = {}
        self.drains: dict[str, threading.Thread] = {}
        self._start_sidecar("api", ["sidecar", "-c", str(api_cfg)])
        # api's sidecar passes its check (listeners up, leaf held), so web sees an endpoint.
        wait_catalog(
            self.consul,
            "/v1/health/connect/api",
            lambda b: (
                any(all(c["Status"] == "passing" for c in e["Checks"]) for e in b) and len(b) == 1
            ),
        )
        self._start_sidecar("web", ["sidecar", "-c", str(web_cfg), *web_args])
        wait_status(
            self.web_admin,
            lambda s: (
                s["proxy"]["upstreams"].get("api", {}).get("endpoints") == 1
                and s["proxy"]["intentions"]["loaded"]
            ),
            "web's api endpoint",
        )
        wait_status(self.api_admin, lambda s: s["sidecar"]["ready"], "api's sidecar ready")

    def _start_sidecar(self, name: str, args: list[str]) -> Proc:
        proc = Proc(args, env=self.env)
        self.procs.append(proc)
        self.sidecars[name] = proc
        proc.wait_for_line("ready:")
        self.drains[name] = _drain(proc)
        return proc

    def wait_intentions(self, index: int) -> None:
        wait_status(
            self.api_admin,
            lambda s: s["proxy"]["intentions"]["index"] >= index,
            f"api's intentions at index {index}",
        )

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        for app in self.apps:
            app.shutdown()
            app.server_close()


@pytest.fixture
def http_mesh(tmp_path: Path) -> Iterator[Mesh]:
    mesh = Mesh(tmp_path, "http")
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture
def tcp_mesh(tmp_path: Path) -> Iterator[Mesh]:
    mesh = Mesh(tmp_path, "tcp")
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()


def test_http_through_two_sidecars_then_denied_by_intention(http_mesh: Mesh) -> None:
    mesh = http_mesh
    index = put_intentions(mesh.consul, "api", "allow")
    mesh.wait_intentions(index)

    status_code, _, body = get(mesh.web_upstream, "/hello?x=1")
    assert status_code == 200
    seen = json.loads(body)
    assert seen["app"] == "api"
    assert seen["path"] == "/hello?x=1"
    xfcc = seen["headers"]["x-forwarded-client-cert"]
    web_uri = status(mesh.web_admin)["proxy"]["leaf"]["uri"]
    api_uri = status(mesh.api_admin)["proxy"]["leaf"]["uri"]
    assert web_uri.endswith("/svc/web") and api_uri.endswith("/svc/api")
    assert xfcc.startswith(f"By={api_uri};Hash=")
    assert xfcc.endswith(f";URI={web_uri}")
    assert seen["headers"]["x-request-id"]

    # Plaintext to api's public port never reaches the app; it is counted as plaintext and
    # logged once with the peer and the reason.
    plain_before = status(mesh.api_admin)["proxy"]["stats"]["handshake_failures"]["plaintext"]
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        get(mesh.api_public, "/plaintext")
    assert "/plaintext" not in mesh.api_app.paths  # type: ignore[attr-defined]
    wait_status(
        mesh.api_admin,
        lambda s: s["proxy"]["stats"]["handshake_failures"]["plaintext"] > plain_before,
        "the plaintext handshake counted",
    )
    wait_line(mesh.sidecars["api"], "refused (plaintext)")

    index = put_intentions(mesh.consul, "api", "deny")
    mesh.wait_intentions(index)
    status_code, _, body = get(mesh.web_upstream, "/hello")
    assert status_code == 403
    assert body == b"RBAC: access denied"
    assert status(mesh.api_admin)["proxy"]["stats"]["requests_denied"] >= 1

    # And back: allowed again once the allow is applied.
    index = put_intentions(mesh.consul, "api", "allow")
    mesh.wait_intentions(index)
    assert get(mesh.web_upstream, "/again")[0] == 200


def test_an_endpoint_with_the_wrong_identity_is_refused_and_failed_over(http_mesh: Mesh) -> None:
    """An instance registered as api's proxy whose port is web's sidecar: web's outbound
    side refuses its certificate (it names web, not api) and the request goes to api."""
    mesh = http_mesh
    mesh.wait_intentions(put_intentions(mesh.consul, "api", "allow"))
    impostor = {
        "Name": "api-sidecar-proxy",
        "ID": "impostor-sidecar-proxy",
        "Kind": "connect-proxy",
        "Address": "127.0.0.1",
        "Port": mesh.web_public,
        "Proxy": {"DestinationServiceName": "api"},
    }
    req = urllib.request.Request(
        f"http://{mesh.consul}/v1/agent/service/register",
        data=json.dumps(impostor).encode(),
        method="PUT",
    )
    urllib.request.urlopen(req, timeout=30).close()
    wait_status(
        mesh.web_admin,
        lambda s: s["proxy"]["upstreams"]["api"]["endpoints"] == 2,
        "both api endpoints at web",
    )
    web = mesh.sidecars["web"]
    deadline = time.monotonic() + DEADLINE
    served = 0
    # Each request picks an endpoint; go on until the impostor has been picked and refused.
    while not any("refused: server is" in line for line in web.lines):
        assert time.monotonic() < deadline, "the impostor endpoint was never picked"
        code, _, body = get(mesh.web_upstream, f"/n{served}")
        assert code == 200, body
        assert json.loads(body)["app"] == "api"
        served += 1
    refusal = next(line for line in web.lines if "refused: server is" in line)
    assert "/svc/web, not api" in refusal
    assert status(mesh.web_admin)["proxy"]["stats"]["upstream_failures"] >= 1
    assert get(mesh.web_upstream, "/after")[0] == 200


@pytest.fixture
def vault_mesh(tmp_path: Path) -> Iterator[Mesh]:
    mesh = Mesh(tmp_path, "http", certs="vault")
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()


def test_http_with_leaves_from_vault(vault_mesh: Mesh) -> None:
    mesh = vault_mesh
    mesh.wait_intentions(put_intentions(mesh.consul, "api", "allow"))
    code, _, body = get(mesh.web_upstream, "/vault")
    assert code == 200
    web_leaf = status(mesh.web_admin)["proxy"]["leaf"]
    assert web_leaf["source"] == "vault"
    assert web_leaf["uri"] in json.loads(body)["headers"]["x-forwarded-client-cert"]
    mesh.wait_intentions(put_intentions(mesh.consul, "api", "deny"))
    assert get(mesh.web_upstream, "/vault")[0] == 403


def test_sigterm_stops_the_sidecar_cleanly(http_mesh: Mesh) -> None:
    """SIGTERM deregisters, closes the listeners and exits 0."""
    mesh = http_mesh
    api = mesh.sidecars["api"]
    api.p.send_signal(signal.SIGTERM)
    assert api.p.wait(30) == 0
    mesh.drains["api"].join(30)  # the whole log, up to EOF
    wait_catalog(mesh.consul, "/v1/catalog/service/api-sidecar-proxy", lambda b: b == [])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", mesh.api_public), timeout=10).close()
    assert any("meshlet agent stopped" in line for line in api.lines)


def _tcp_exchange(port: int) -> bytes:
    """One HTTP/1.0 request over a raw connection; b"" if the mesh closed it."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(b"GET /raw HTTP/1.0\r\nHost: api\r\n\r\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            return b""
    return b"".join(chunks)


def test_tcp_through_two_sidecars_then_denied_by_intention(tcp_mesh: Mesh) -> None:
    mesh = tcp_mesh
    index = put_intentions(mesh.consul, "api", "allow")
    mesh.wait_intentions(index)
    reply = _tcp_exchange(mesh.web_upstream)
    assert reply.startswith(b"HTTP/1.0 200") or reply.startswith(b"HTTP/1.1 200")
    assert b'"app": "api"' in reply
    # At L4 nothing is added to the bytes: no XFCC reaches the app.
    assert b"x-forwarded-client-cert" not in reply

    index = put_intentions(mesh.consul, "api", "deny")
    mesh.wait_intentions(index)
    assert _tcp_exchange(mesh.web_upstream) == b""
    assert status(mesh.api_admin)["proxy"]["stats"]["connections_denied"] >= 1


def test_meshlet_sidecar_requires_a_config(tmp_path: Path) -> None:
    proc = Proc(["sidecar"], env=ENV)
    try:
        assert proc.p.wait(30) == 2
        assert proc.p.stdout is not None
        assert "meshlet sidecar: -c FILE is required" in proc.p.stdout.read()
    finally:
        proc.stop()
