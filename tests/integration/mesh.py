"""The mesh the integration tests run: `meshlet dev`, `meshlet sidecar` processes written an
agent.yaml each, and the app servers behind them, on 127.0.0.1.

`Mesh` is web calling api, each behind its own sidecar; `Mesh.start_instances` puts api on
several instances instead. Waits poll the sidecars' /v1/status, their logs or Consul's
blocking queries against DEADLINE; none asserts on how long something took.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tests.integration.test_agent_process import (
    ENV,
    MESHLET,
    Proc,
    _free_port,
    start_dev,
    wait_catalog,
)

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


def serve(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """An app server on a free port, answering with `handler` on a daemon thread."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def start_app(name: str) -> ThreadingHTTPServer:
    """An `_App` named `name`; its server's `paths` lists the paths it was asked for."""
    server = serve(type(f"App_{name}", (_App,), {"name": name}))
    server.paths = []  # type: ignore[attr-defined]
    return server


def http_json(method: str, url: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def write_entry(consul: str, entry: Mapping[str, Any]) -> int:
    """Write a config entry to Consul; the ModifyIndex it was stored at."""
    assert http_json("PUT", f"http://{consul}/v1/config", entry) is True
    got = http_json("GET", f"http://{consul}/v1/config/{entry['Kind']}/{entry['Name']}")
    return int(got["ModifyIndex"])


def put_intentions(consul: str, destination: str, action: str) -> int:
    entry = {
        "Kind": "service-intentions",
        "Name": destination,
        "Sources": [{"Name": "web", "Action": action}],
    }
    return write_entry(consul, entry)


def deny_prefix_intention(prefix: str) -> dict[str, Any]:
    """api's service-intentions: web denied the paths under `prefix`, allowed all others."""
    return {
        "Kind": "service-intentions",
        "Name": "api",
        "Sources": [
            {
                "Name": "web",
                "Permissions": [
                    {"Action": "deny", "HTTP": {"PathPrefix": prefix}},
                    {"Action": "allow", "HTTP": {"PathPrefix": "/"}},
                ],
            }
        ],
    }


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
    meta: Mapping[str, str] | None = None,
    sidecar_extra: str = "",
    token_file: str = "",
) -> None:
    """An agent.yaml for `meshlet sidecar`; `certs` and `sidecar_extra` are YAML lines added
    at the top level and to the `sidecar` section."""
    ups = "".join(
        f"    - {{name: {n}, local_bind_port: {p}, protocol: {proto}}}\n"
        for n, p, proto in upstreams
    )
    ident = f"  id: {service_id}\n" if service_id else ""  # default: the service's name
    meta_line = f"  meta: {json.dumps(dict(meta))}\n" if meta else ""
    token = f", token_file: '{token_file}'" if token_file else ""
    path.write_text(
        f"consul: {{address: '{consul}'{token}}}\n"
        f"service:\n  name: {service}\n  port: {app_port}\n  address: 127.0.0.1\n"
        f"{meta_line}"
        f"{ident}"
        f"  check: {{http: 'http://127.0.0.1:{app_port}/health', interval: 1s}}\n"
        f"sidecar:\n{sidecar_extra}  port: {sidecar_port}\n  protocol: {protocol}\n"
        "  check_ttl: 3s\n"
        f"  upstreams:\n{ups or '    []'}\n"
        f"admin: {{address: '{admin}'}}\n"
        f"{certs}"
        "watch: {retry_initial: 50ms, retry_max: 500ms}\n"
        "shutdown: {drain_period: 0s}\n"
    )


def drain_log(proc: Proc) -> threading.Thread:
    """Keep reading the process's log so a chatty sidecar never blocks on a full pipe; the
    thread ends at the process's EOF."""
    out = proc.p.stdout
    assert out is not None
    thread = threading.Thread(target=lambda: proc.lines.extend(out), daemon=True)
    thread.start()
    return thread


def status(admin: str) -> Any:
    return http_json("GET", f"http://{admin}/v1/status")


def metrics(admin: str) -> str:
    """The sidecar's Prometheus exposition, from its admin listener."""
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as resp:
        text: str = resp.read().decode()
    return text


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


def settled_status(admin: str) -> Any:
    """The status once the data planes' counters stop moving (each reports them every
    0.25 s): a baseline that includes every request answered so far."""
    st = status(admin)
    deadline = time.monotonic() + DEADLINE
    while True:
        time.sleep(0.6)  # over two reports: a request answered before `st` is in by now
        again = status(admin)
        if again["proxy"]["stats"] == st["proxy"]["stats"]:
            return again
        if time.monotonic() > deadline:
            raise AssertionError("the counters never settled")
        st = again


def wait_applied(admin: str) -> Any:
    """Until the sidecar's data planes serve the agent's newest snapshot: a setting the
    agent logged as changed (access logs, tracing) is then in force for the next request.
    (In-process, `--workers 0`, it is in force when logged.)"""
    return wait_status(
        admin,
        lambda s: s["proxy"].get("snapshot", {"current": True})["current"],
        "the data planes serving the agent's newest snapshot",
    )


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


def access_log_lines(proc: Proc, field: str, value: str) -> list[dict[str, Any]]:
    """The access-log records (JSON lines on stdout) in the process's log so far whose
    string `field` is `value`."""
    out = []
    for line in list(proc.lines):
        if line.startswith('{"start_time"') and f'"{field}":"{value}"' in line:
            out.append(json.loads(line))
    return out


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def tcp_exchange(port: int) -> bytes:
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


def routes_apply(consul: str, *files: Path) -> str:
    """`meshlet routes apply --callers web` of `files` to Consul; its warnings (stderr)."""
    args = [MESHLET, "routes", "apply", "--callers", "web"]
    for f in files:
        args += ["-f", str(f)]
    done = subprocess.run(
        args,
        capture_output=True,
        text=True,
        env={**ENV, "CONSUL_HTTP_ADDR": consul},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stderr


class AppServer(Protocol):
    """What a mesh needs of an app: a ThreadingHTTPServer, or an app in its own process that
    quacks like one."""

    server_address: Any

    def shutdown(self) -> None: ...

    def server_close(self) -> None: ...


class Mesh:
    """web calls api through its upstream port `web_upstream`; api's app is `api_app("api")`
    (an `_App` by default). Construction starts devstack and the apps; `start` the sidecars;
    `stop` ends all of it."""

    def __init__(
        self,
        tmp: Path,
        protocol: str,
        certs: str = "consul",
        dev_args: tuple[str, ...] = (),
        api_app: Callable[[str], AppServer] = start_app,
    ) -> None:
        self.procs: list[Proc] = []
        self.apps: list[AppServer] = []
        self.sidecars: dict[str, Proc] = {}
        self.drains: dict[str, threading.Thread] = {}
        self.tmp = tmp
        self.protocol = protocol
        port = _free_port()
        self.consul = f"127.0.0.1:{port}"
        self.env = ENV
        self.certs = ""
        try:
            self._start_dev_and_apps(port, certs, dev_args, api_app)
        except BaseException:
            self.stop()
            raise
        self.web_admin = f"127.0.0.1:{_free_port()}"
        self.api_admin = f"127.0.0.1:{_free_port()}"
        self.api_public = _free_port()
        self.web_public = _free_port()
        self.web_upstream = _free_port()

    def _start_dev_and_apps(
        self,
        port: int,
        certs: str,
        dev_args: tuple[str, ...],
        api_app: Callable[[str], AppServer],
    ) -> None:
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
        self.api_app = api_app("api")
        self.apps.append(self.api_app)
        self.web_app = start_app("web")
        self.apps.append(self.web_app)

    def start(
        self, web_args: tuple[str, ...] = (), web_sidecar: str = "", api_sidecar: str = ""
    ) -> None:
        """api's sidecar, then (once api passes its checks, so every web process's first
        answer has it) web's with `web_args` added to its command line; `web_sidecar` and
        `api_sidecar` are indented YAML lines added to their config's `sidecar` section."""
        self.write_entry({"Kind": "service-defaults", "Name": "api", "Protocol": self.protocol})
        api_cfg = self.tmp / "api.yaml"
        write_sidecar_config(
            api_cfg,
            consul=self.consul,
            service="api",
            app_port=self.api_app.server_address[1],
            sidecar_port=self.api_public,
            admin=self.api_admin,
            protocol=self.protocol,
            certs=self.certs,
            sidecar_extra=api_sidecar,
        )
        self._start_sidecar("api", ["sidecar", "-c", str(api_cfg)])
        # api's sidecar passes its check (listeners up, leaf held), so web sees an endpoint.
        wait_catalog(
            self.consul,
            "/v1/health/connect/api",
            lambda b: (
                any(all(c["Status"] == "passing" for c in e["Checks"]) for e in b) and len(b) == 1
            ),
        )
        self.start_web(self.protocol, web_args, web_sidecar)
        wait_status(
            self.web_admin,
            lambda s: (
                s["proxy"]["upstreams"].get("api", {}).get("endpoints") == 1
                and s["proxy"]["intentions"]["loaded"]
            ),
            "web's api endpoint",
        )
        wait_status(self.api_admin, lambda s: s["sidecar"]["ready"], "api's sidecar ready")

    def start_instances(
        self,
        apps: Mapping[str, AppServer],
        upstream_protocol: str,
        meta: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        """Instead of `start`: api speaks http and runs as one instance per app (service id
        api-<name>, Meta `meta[name]`), each behind its own sidecar; then web's sidecar, its
        api upstream with `upstream_protocol` ('""': the chain's)."""
        self.write_entry({"Kind": "service-defaults", "Name": "api", "Protocol": "http"})
        # Owned from here on, so `stop` closes them whatever fails next.
        self.apps += [app for app in apps.values() if app not in self.apps]
        for name, app in apps.items():
            self.start_api_instance(f"api-{name}", app, "http", (meta or {}).get(name))
        self.start_web(upstream_protocol)

    def start_api_instance(
        self,
        service_id: str,
        app: AppServer,
        protocol: str,
        meta: Mapping[str, str] | None = None,
    ) -> str:
        """One more instance of api for `app` (which the caller owns), behind its own
        sidecar, named `service_id` in `sidecars`; its sidecar's admin address."""
        admin = f"127.0.0.1:{_free_port()}"
        cfg = self.tmp / f"{service_id}.yaml"
        write_sidecar_config(
            cfg,
            consul=self.consul,
            service="api",
            service_id=service_id,
            app_port=app.server_address[1],
            sidecar_port=_free_port(),
            admin=admin,
            protocol=protocol,
            certs=self.certs,
            meta=meta,
        )
        self._start_sidecar(service_id, ["sidecar", "-c", str(cfg)])
        return admin

    def start_web(
        self, upstream_protocol: str, args: tuple[str, ...] = (), sidecar_extra: str = ""
    ) -> Proc:
        web_cfg = self.tmp / "web.yaml"
        write_sidecar_config(
            web_cfg,
            consul=self.consul,
            service="web",
            app_port=self.web_app.server_address[1],
            sidecar_port=self.web_public,
            admin=self.web_admin,
            protocol="http",
            certs=self.certs,
            upstreams=(("api", self.web_upstream, upstream_protocol),),
            sidecar_extra=sidecar_extra,
        )
        return self._start_sidecar("web", ["sidecar", "-c", str(web_cfg), *args])

    def _start_sidecar(self, name: str, args: list[str]) -> Proc:
        proc = Proc(args, env=self.env)
        self.procs.append(proc)
        self.sidecars[name] = proc
        proc.wait_for_line("ready:")
        self.drains[name] = drain_log(proc)
        return proc

    def write_entry(self, entry: Mapping[str, Any]) -> int:
        return write_entry(self.consul, entry)

    def wait_intentions(self, index: int) -> None:
        wait_status(
            self.api_admin,
            lambda s: s["proxy"]["intentions"]["index"] >= index,
            f"api's intentions at index {index}",
        )

    def apply_intentions(self, entry: Mapping[str, Any]) -> None:
        """Write api's service-intentions entry and wait until api's sidecar enforces it."""
        self.wait_intentions(self.write_entry(entry))

    def stop(self) -> None:
        """Kill every process (sidecars before devstack) and close every app, each even if
        another one failed to stop, so nothing is left running."""
        try:
            for p in reversed(self.procs):
                p.stop()
        finally:
            for app in self.apps:
                app.shutdown()
                app.server_close()


M = TypeVar("M", bound=Mesh)


@contextmanager
def running(mesh: M, **start: Any) -> Iterator[M]:
    """`mesh` started with `start`'s arguments, stopped on the way out (a fixture's body)."""
    try:
        mesh.start(**start)
        yield mesh
    finally:
        mesh.stop()
