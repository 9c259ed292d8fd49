"""Listeners that follow the config: `meshlet sidecar` reloaded with SIGHUP, as real processes
against `meshlet dev`.

web's sidecar starts with one tcp upstream, api, carrying a long-lived keep-alive connection
to api's app. SIGHUP with a file that adds a second upstream (billing) and changes nothing
else: the new port serves and the old connection is untouched (the same TCP connection
reaches api's app). Changing billing's protocol tcp -> http: its port now speaks HTTP (web's
sidecar counts each request; as tcp it counted connections only). Removing api: its port stops
accepting while the open connection keeps being served (the drain period is long), and the
listener is closed as soon as that connection ends. A broken file on SIGHUP changes nothing
and is reported in /v1/status. With `--workers 2` both data planes apply the same listeners
and the agent holds none (checked in /proc).

Waits are on log lines, /v1/status and Consul blocking queries; no timing is asserted.
"""

from __future__ import annotations

import http.client
import json
import random
import signal
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.integration.mesh import settled_status
from tests.integration.test_agent_process import ENV, Proc, _free_port, start_dev, wait_catalog
from tests.integration.test_sidecar_mesh import (
    _drain,
    _json,
    status,
    wait_line,
    wait_status,
    write_sidecar_config,
)
from tests.integration.test_sidecar_workers import listens, wait_until

pytestmark = pytest.mark.timeout(240)

DRAIN = "30s"
"""web's drain period: how long a removed listener's open connections are served. Long, so
that the in-flight connection is still being served when the test looks."""


class _App(BaseHTTPRequestHandler):
    """Answers with its name and the port the request came from (which TCP connection)."""

    protocol_version = "HTTP/1.1"
    name = "app"

    def do_GET(self) -> None:
        body = json.dumps(
            {"app": self.name, "path": self.path, "from_port": self.client_address[1]}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _start_app(name: str) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), type(f"App_{name}", (_App,), {"name": name}))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _ask(conn: http.client.HTTPConnection, path: str) -> dict[str, Any]:
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 200, (resp.status, body)
    answer: dict[str, Any] = json.loads(body)
    return answer


def _get(port: int, path: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        return _ask(conn, path)
    finally:
        conn.close()


def _reserved_port() -> int:
    """A free port below the kernel's ephemeral range: one bound only at a reload, long after
    it was picked, must not be taken meanwhile by some process's outgoing connection."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    while True:
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def _refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


class ReloadMesh:
    """api (tcp) and billing (http) behind their sidecars; web's sidecar with upstreams
    written by `web_config`."""

    def __init__(self, tmp: Path, web_args: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []
        self.apps = [_start_app("api"), _start_app("billing")]
        port = _free_port()
        self.consul = f"127.0.0.1:{port}"
        self.procs.append(start_dev(port))
        self.web_admin = f"127.0.0.1:{_free_port()}"
        self.api_port, self.billing_port = _reserved_port(), _reserved_port()
        self.web_port, self.web_app_port = _free_port(), _free_port()
        self.web_cfg = tmp / "web.yaml"
        try:
            for (name, protocol), app in zip(
                (("api", "tcp"), ("billing", "http")), self.apps, strict=True
            ):
                self._start_destination(name, protocol, app)
            self.web_config(("api", self.api_port, "tcp"))
            self.web = Proc(["sidecar", "-c", str(self.web_cfg), *web_args], env=ENV)
            self.procs.append(self.web)
            self.web.wait_for_line("ready:")
            _drain(self.web)
            self.wait_upstream("api", "tcp")
        except BaseException:
            self.stop()
            raise

    def _start_destination(self, name: str, protocol: str, app: ThreadingHTTPServer) -> None:
        defaults = {"Kind": "service-defaults", "Name": name, "Protocol": protocol}
        _json("PUT", f"http://{self.consul}/v1/config", defaults)
        cfg = self.tmp / f"{name}.yaml"
        write_sidecar_config(
            cfg,
            consul=self.consul,
            service=name,
            app_port=app.server_address[1],
            sidecar_port=_free_port(),
            admin=f"127.0.0.1:{_free_port()}",
            protocol=protocol,
        )
        proc = Proc(["sidecar", "-c", str(cfg)], env=ENV)
        self.procs.append(proc)
        proc.wait_for_line("ready:")
        _drain(proc)
        wait_catalog(
            self.consul,
            f"/v1/health/connect/{name}",
            lambda b: any(all(c["Status"] == "passing" for c in e["Checks"]) for e in b),
        )

    def web_config(self, *upstreams: tuple[str, int, str], broken: bool = False) -> None:
        write_sidecar_config(
            self.web_cfg,
            consul=self.consul,
            service="web",
            app_port=self.web_app_port,
            sidecar_port=self.web_port,
            admin=self.web_admin,
            protocol="http",
            upstreams=upstreams,
        )
        text = self.web_cfg.read_text().replace("drain_period: 0s", f"drain_period: {DRAIN}")
        if broken:
            text += "sidecar_typo: {}\n"
        self.web_cfg.write_text(text)

    def reload(self, *upstreams: tuple[str, int, str], broken: bool = False) -> int:
        """Write web's file and SIGHUP it; returns the reload count to wait for."""
        before = int(status(self.web_admin)["config"]["reloads"])
        self.web_config(*upstreams, broken=broken)
        self.web.p.send_signal(signal.SIGHUP)
        return before + 1

    def wait_upstream(self, name: str, protocol: str) -> dict[str, Any]:
        got: dict[str, Any] = wait_status(
            self.web_admin,
            lambda s: (
                s["proxy"]["upstreams"].get(name, {}).get("endpoints") == 1
                and s["proxy"]["upstreams"][name]["protocol"] == protocol
                and s["ready"]
            ),
            f"web's {name} upstream ({protocol}) with its endpoint",
        )
        return got

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        for app in self.apps:
            app.shutdown()
            app.server_close()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[ReloadMesh]:
    m = ReloadMesh(tmp_path)
    try:
        yield m
    finally:
        m.stop()


def _stats(mesh: ReloadMesh) -> dict[str, Any]:
    stats: dict[str, Any] = settled_status(mesh.web_admin)["proxy"]["stats"]
    return stats


def test_upstreams_added_changed_and_removed_on_sighup(mesh: ReloadMesh) -> None:
    api, billing = mesh.api_port, mesh.billing_port
    # The long-lived connection: keep-alive through web's tcp upstream to api's app.
    held = http.client.HTTPConnection("127.0.0.1", api, timeout=30)
    first = _ask(held, "/held-1")
    assert first["app"] == "api"

    # 1. A second upstream, nothing else changed.
    reloads = mesh.reload(("api", api, "tcp"), ("billing", billing, "tcp"))
    mesh.wait_upstream("billing", "tcp")
    assert status(mesh.web_admin)["config"]["reloads"] == reloads
    wait_line(mesh.web, f"listeners: start upstream billing 127.0.0.1:{billing}")
    before = _stats(mesh)
    assert _get(billing, "/new")["app"] == "billing"
    # Relayed per connection: counted as a connection, not as a request.
    after = wait_status(
        mesh.web_admin,
        lambda s: s["proxy"]["stats"]["connections"] > before["connections"],
        "billing's connection counted",
    )["proxy"]["stats"]
    assert after["requests"] == before["requests"]
    again = _ask(held, "/held-2")
    assert again["app"] == "api"
    assert again["from_port"] == first["from_port"], "the held connection was re-established"

    # 2. billing's protocol tcp -> http: the same port now speaks HTTP.
    mesh.reload(("api", api, "tcp"), ("billing", billing, "http"))
    mesh.wait_upstream("billing", "http")
    wait_line(mesh.web, f"replace upstream billing 127.0.0.1:{billing} (tcp)")
    before = _stats(mesh)
    assert _get(billing, "/as-http")["app"] == "billing"
    wait_status(
        mesh.web_admin,
        lambda s: s["proxy"]["stats"]["requests"] == before["requests"] + 1,
        "billing's request counted by web's HTTP listener",
    )
    again = _ask(held, "/held-3")
    assert again["from_port"] == first["from_port"], "the held connection was re-established"

    # 3. api removed while the held connection is open: the port stops accepting, the open
    # connection is still served (drained), and the listener closes once it is done.
    mesh.reload(("billing", billing, "http"))
    wait_status(
        mesh.web_admin,
        lambda s: "api" not in [u["name"] for u in s["upstreams"]],
        "api's watch stopped",
    )
    wait_line(mesh.web, f"listeners: stop upstream api 127.0.0.1:{api}")
    assert _refused(api)
    again = _ask(held, "/held-4")
    assert again["from_port"] == first["from_port"]
    assert _get(billing, "/still")["app"] == "billing"

    # 4. A broken file: nothing changes, and the error is reported.
    reloads = int(status(mesh.web_admin)["config"]["reloads"])
    mesh.reload(("api", api, "tcp"), ("billing", billing, "tcp"), broken=True)
    st = wait_status(
        mesh.web_admin,
        lambda s: "sidecar_typo" in s["config"]["last_reload_error"],
        "the broken reload reported",
    )
    assert st["config"]["reloads"] == reloads
    assert st["proxy"]["upstreams"]["billing"]["protocol"] == "http"
    assert "api" not in st["proxy"]["upstreams"]
    assert _refused(api)
    before = _stats(mesh)
    assert _get(billing, "/after-broken")["app"] == "billing"
    wait_status(
        mesh.web_admin,
        lambda s: s["proxy"]["stats"]["requests"] == before["requests"] + 1,
        "billing still served over HTTP",
    )
    assert _ask(held, "/held-5")["from_port"] == first["from_port"]

    # The app ends the held connection: the removed listener's drain is over at once.
    held.request("GET", "/held-last", headers={"Connection": "close"})
    assert held.getresponse().read()
    held.close()
    wait_line(mesh.web, f"upstream api 127.0.0.1:{api}: closed")


@pytest.fixture
def workers_mesh(tmp_path: Path) -> Iterator[ReloadMesh]:
    m = ReloadMesh(tmp_path, web_args=("--workers", "2"))
    try:
        yield m
    finally:
        m.stop()


def test_workers_follow_the_parents_listeners(workers_mesh: ReloadMesh) -> None:
    """The agent runs no listener with --workers 2: both data planes follow its reloads."""
    mesh = workers_mesh
    st = wait_status(
        mesh.web_admin,
        lambda s: all(p["ready"] for p in s["workers"]["processes"]),
        "web's data planes serving",
    )
    agent = mesh.web.p.pid
    planes = [int(p["pid"]) for p in st["workers"]["processes"]]
    api, billing = mesh.api_port, mesh.billing_port

    def everywhere(port: int) -> bool:
        return all(listens(pid, port) for pid in planes)

    def nowhere(port: int) -> bool:
        return not any(listens(pid, port) for pid in planes)

    assert everywhere(api) and nowhere(billing) and not listens(agent, api)

    mesh.reload(("api", api, "tcp"), ("billing", billing, "http"))
    wait_until(lambda: everywhere(billing), "both on billing")
    wait_status(
        mesh.web_admin,
        lambda s: s["ready"] and all(p["ready"] for p in s["workers"]["processes"]),
        "both processes serving after the reload",
    )
    for i in range(10):
        assert _get(billing, f"/w{i}")["app"] == "billing"

    mesh.reload(("billing", billing, "http"))
    wait_until(lambda: nowhere(api), "api closed")
    assert everywhere(billing) and not listens(agent, billing)
    assert _refused(api)
