"""The fault suite's mesh, its steady load and its census of fds and connections.

`FaultMesh` is `meshlet dev` plus four `meshlet sidecar`s: api-1 and api-2 (http, each in
front of a `FaultApp` in its own process), echo (tcp, in front of an echo server) and web,
whose upstreams are api (http) and echo (tcp). `HttpLoad` sends GETs at a constant rate over
keep-alive connections to web's api port; `TcpStreams` holds long-lived connections to web's
echo port, each exchanging a numbered message every tick. `Census` counts each sidecar's
open fds (/proc/PID/fd) and its listeners' connection gauges (/v1/status) so a test can say
that a fault leaked nothing.

Durations: the short form (the default, run by `make test`) keeps each fault to a few
seconds; MESHLET_FAULTS=full (`make faults`) runs the long form.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.integration.test_agent_process import Proc, _free_port, start_dev, wait_catalog
from tests.integration.test_sidecar_mesh import (
    _drain,
    put_intentions,
    start_app,
    status,
    wait_status,
    write_sidecar_config,
)

ROOT = Path(__file__).resolve().parents[3]
FULL = os.environ.get("MESHLET_FAULTS") == "full"


def seconds(short: float, full: float) -> float:
    return full if FULL else short


RATE = 200.0
"""GETs per second offered to web's api port: a few hundred, within what two cores shared
with the rest of the machine carry for four sidecars, devstack and the load itself."""
TASK_SLACK = 3
"""asyncio tasks a sidecar may hold beyond its baseline: a blocking query or a leaf renewal
caught in flight by the census."""
CONNS = 8
STREAMS = 6
FD_SLACK = 2
"""fds a process may gain beyond its pooled connections (see `allowance`): a Consul watch
reconnected, a log file reopened. A leak per request (thousands) or per stream is far
beyond it."""


# ---- the api app: answers, hangs, is slow, fails, or fails its health check on demand --------


def _fault_app(name: str) -> web.Application:
    mode = {"mode": "ok"}

    async def control(request: web.Request) -> web.Response:
        mode["mode"] = request.query["mode"]
        return web.Response(text=mode["mode"])

    async def health(request: web.Request) -> web.Response:
        if mode["mode"] == "hang":
            await asyncio.Event().wait()
        if mode["mode"] == "sick":
            return web.Response(status=503, text="sick")
        return web.Response(text="ok")

    async def hello(request: web.Request) -> web.Response:
        if mode["mode"] == "hang":
            await asyncio.Event().wait()
        if mode["mode"] == "slow":
            await asyncio.sleep(0.2)
        if mode["mode"] == "fail":  # healthy to Consul, failing every request
            return web.Response(status=503, text="fail")
        return web.json_response({"app": name, "path": request.path_qs})

    app = web.Application()
    app.router.add_get("/__mode", control)
    app.router.add_get("/health", health)
    app.router.add_get("/{tail:.*}", hello)
    return app


def serve_fault_app(name: str) -> None:
    async def main() -> None:
        runner = web.AppRunner(_fault_app(name), access_log=None)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        print(f"app {name} listening on 127.0.0.1:{sock.getsockname()[1]}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


class FaultApp:
    def __init__(self, name: str) -> None:
        self.name = name
        code = f"from tests.integration.faults.harness import serve_fault_app as s; s({name!r})"
        self.p = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        assert "listening on" in line, line
        self.port = int(line.rsplit(":", 1)[1])

    def mode(self, mode: str) -> None:
        """Asked directly, not through the mesh."""
        url = f"http://127.0.0.1:{self.port}/__mode?mode={mode}"
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert resp.read().decode() == mode

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(30)
        if self.p.stdout is not None:
            self.p.stdout.close()


class _Echo(socketserver.BaseRequestHandler):
    """Echoes; closes after echoing a message that ends in BYE (a protocol-level quit, as
    Redis's QUIT or SMTP's: the server closes first). A connection whose client closed first
    (its EOF reached the server) is recorded by the first bytes it sent."""

    server: EchoServer

    def handle(self) -> None:
        first = b""
        while data := self.request.recv(65536):
            first = first or data
            self.request.sendall(data)
            if data.endswith(BYE):
                return
        with self.server.lock:
            self.server.closed_by_client.append(first)


BYE = b"BYE\n"


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Echo)
        self.lock = threading.Lock()
        self.closed_by_client: list[bytes] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        port: int = self.server_address[1]
        return port


# ---- the mesh ------------------------------------------------------------------------------


class FaultMesh:
    def __init__(
        self,
        tmp: Path,
        *,
        dev_args: tuple[str, ...] = (),
        web_args: tuple[str, ...] = (),
        web_yaml: str = "",
        drain: str = "0s",
        apis: Mapping[str, str] | None = None,
    ) -> None:
        """`web_yaml`: top-level sections added to web's agent.yaml (e.g. `telemetry`).
        `apis`: the api instances' ids and the `version` each registers in its Meta (the
        routing faults' subsets); "" registers none. Default: api-1 and api-2, no Meta."""
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        self.web_yaml = web_yaml
        self.dev_args = dev_args
        self.drain = drain
        self.procs: list[Proc] = []
        self.sidecars: dict[str, Proc] = {}
        self.admins: dict[str, str] = {}
        self.cfgs: dict[str, Path] = {}
        self.apps: dict[str, FaultApp] = {}
        self.versions = dict(apis if apis is not None else {"api-1": "", "api-2": ""})
        self.port = _free_port()
        self.consul = f"127.0.0.1:{self.port}"
        self.dev = start_dev(self.port, dev_args)
        self.echo = EchoServer()
        self.web_app = start_app("web")
        self.web_api, self.web_echo = _free_port(), _free_port()
        try:
            self._configure()
            for sid in self.versions:
                self.apps[sid] = FaultApp(sid)
                self._sidecar(sid, "api", self.apps[sid].port, "http")
            self._sidecar("echo", "echo", self.echo.port, "tcp")
            self.wait_passing("api", len(self.versions))
            self.wait_passing("echo", 1)
            self._sidecar(
                "web",
                "web",
                self.web_app.server_address[1],
                "http",
                upstreams=(("api", self.web_api, "http"), ("echo", self.web_echo, "tcp")),
                args=web_args,
            )
            self.wait_web_endpoints(api=len(self.versions), echo=1)
        except BaseException:
            self.stop()
            raise

    def _configure(self) -> None:
        for name, protocol in (("api", "http"), ("echo", "tcp")):
            body = {"Kind": "service-defaults", "Name": name, "Protocol": protocol}
            req = urllib.request.Request(
                f"http://{self.consul}/v1/config", data=json.dumps(body).encode(), method="PUT"
            )
            urllib.request.urlopen(req, timeout=30).close()
            put_intentions(self.consul, name, "allow")

    def _sidecar(
        self,
        sid: str,
        service: str,
        app_port: int,
        protocol: str,
        *,
        upstreams: tuple[tuple[str, int, str], ...] = (),
        args: tuple[str, ...] = (),
    ) -> None:
        cfg = self.tmp / f"{sid}.yaml"
        if sid not in self.admins:
            self.admins[sid] = f"127.0.0.1:{_free_port()}"
            write_sidecar_config(
                cfg,
                consul=self.consul,
                service=service,
                service_id=sid if service != sid else "",
                app_port=app_port,
                sidecar_port=_free_port(),
                admin=self.admins[sid],
                protocol=protocol,
                upstreams=upstreams,
            )
            text = (
                cfg.read_text()
                .replace("drain_period: 0s", f"drain_period: {self.drain}")
                # A hung app fails its check within a second, not Consul's default 10 s.
                .replace("interval: 1s}", "interval: 1s, timeout: 1s}")
            )
            if sid == "web":
                text += self.web_yaml
            if self.versions.get(sid):
                text = text.replace(
                    "  address: 127.0.0.1\n",
                    f"  address: 127.0.0.1\n  meta: {{version: {self.versions[sid]}}}\n",
                    1,
                )
            if protocol == "tcp":  # the echo server speaks no HTTP: a TCP check
                text = text.replace(
                    f"http: 'http://127.0.0.1:{app_port}/health'", f"tcp: '127.0.0.1:{app_port}'"
                )
            cfg.write_text(text)
            self.cfgs[sid] = cfg
        proc = Proc(["sidecar", "-c", str(cfg), *args])
        self.procs.append(proc)
        self.sidecars[sid] = proc
        proc.wait_for_line("ready:")
        _drain(proc)

    def restart_sidecar(self, sid: str) -> None:
        service = "api" if sid.startswith("api") else sid
        self._sidecar(sid, service, 0, "")

    def revive(self, sid: str) -> None:
        """An api instance killed whole (app and sidecar, if they still run) and started
        again: a new app process, its sidecar on its old port, address and id."""
        old = self.apps[sid]
        if self.sidecars[sid].p.poll() is None:
            self.sidecars[sid].kill()
            self.sidecars[sid].p.wait(30)
        old.kill()
        self.apps[sid] = FaultApp(sid)
        cfg = self.cfgs[sid]
        new = self.apps[sid].port
        text = cfg.read_text().replace(f":{old.port}/", f":{new}/")  # its check
        cfg.write_text(text.replace(f"port: {old.port}\n", f"port: {new}\n"))
        self.restart_sidecar(sid)

    def write(self, *entries: dict[str, Any]) -> int:
        """Config entries written to devstack; the highest ModifyIndex among them."""
        index = 0
        for entry in entries:
            req = urllib.request.Request(
                f"http://{self.consul}/v1/config", data=json.dumps(entry).encode(), method="PUT"
            )
            with urllib.request.urlopen(req, timeout=30) as resp:
                assert json.load(resp) is True, entry
            url = f"http://{self.consul}/v1/config/{entry['Kind']}/{entry['Name']}"
            with urllib.request.urlopen(url, timeout=30) as resp:
                index = max(index, int(json.load(resp)["ModifyIndex"]))
        return index

    def wait_routed(self, index: int) -> dict[str, Any]:
        """Until web's api listener applies the chain compiled from entries at `index` or
        later (every target of it answered)."""
        st: dict[str, Any] = wait_status(
            self.admins["web"],
            lambda s: (
                s["proxy"]["routing"].get("upstreams", {}).get("api", {}).get("applied", 0) >= index
            ),
            f"web's api chain at index {index} applied",
        )
        return st

    def wait_passing(self, service: str, count: int) -> None:
        wait_catalog(
            self.consul,
            f"/v1/health/connect/{service}",
            lambda b: sum(all(c["Status"] == "passing" for c in e["Checks"]) for e in b) == count,
        )

    def wait_web_endpoints(self, **want: int) -> None:
        wait_status(
            self.admins["web"],
            lambda s: all(
                s["proxy"]["upstreams"].get(name, {}).get("endpoints") == n
                for name, n in want.items()
            ),
            f"web's endpoints {want}",
        )

    def kill_dev(self) -> None:
        self.dev.stop()

    def restart_dev(self) -> None:
        self.dev = start_dev(self.port, self.dev_args)

    def pids(self) -> dict[str, int]:
        """Every live sidecar process (and web's workers), by name."""
        out = {sid: p.p.pid for sid, p in self.sidecars.items() if p.p.poll() is None}
        with contextlib.suppress(OSError, KeyError, ValueError):
            for k, w in enumerate(
                status(self.admins["web"]).get("workers", {}).get("processes", [])
            ):
                if w.get("pid"):
                    out[f"web-worker-{k + 1}"] = int(w["pid"])
        return out

    def every_pid(self) -> dict[str, int]:
        """`pids` and every other sidecar's data-plane processes too (for the soak: a proxy
        leak shows only in a data plane). The fault census keeps to `pids`: its allowance for
        pooled connections is counted for web's data planes only."""
        out = self.pids()
        for sid in self.sidecars:
            if sid == "web" or sid not in out:
                continue
            with contextlib.suppress(OSError, KeyError, ValueError):
                processes = status(self.admins[sid]).get("workers", {}).get("processes", [])
                for k, w in enumerate(processes):
                    if w.get("pid"):
                        out[f"{sid}-worker-{k + 1}"] = int(w["pid"])
        return out

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.dev.stop()
        for app in self.apps.values():
            app.kill()
        for server in (self.echo, self.web_app):
            server.shutdown()
            server.server_close()


def make_mesh(tmp: Path, **kwargs: Any) -> FaultMesh:
    """A FaultMesh; started again (up to three times) when a port `_free_port` chose was
    taken before its sidecar bound it: the load's own outgoing connections draw their local
    ports from the same ephemeral range."""
    for attempt in range(3):
        try:
            return FaultMesh(tmp / f"try{attempt}", **kwargs)
        except AssertionError as err:
            if "Address already in use" not in str(err) or attempt == 2:
                raise
    raise AssertionError("unreachable")


# ---- the load ------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class LoadFigures:
    sent: int = 0
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    retried: int = 0
    pending: int = 0
    by_app: dict[str, int] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def line(self) -> str:
        p99 = _percentile(self.latencies, 0.99) * 1e3
        return (
            f"sent={self.sent} ok={self.ok} failed={len(self.failed)} retried={self.retried} "
            f"pending={self.pending} p99={p99:.1f}ms by_app={self.by_app} "
            f"first failures={self.failed[:5]}"
        )


class _Gone(Exception):
    """The connection closed before any byte of the answer: an idempotent GET may be sent
    again on a new connection (RFC 9112 section 9.3.1), and the client counts it retried."""


async def _get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
) -> tuple[int, bytes, bool]:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: api\r\n\r\n".encode())
    await writer.drain()
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as err:
        if not err.partial:
            raise _Gone() from err
        raise
    lines = head.decode("latin-1").split("\r\n")
    code = int(lines[0].split(" ", 2)[1])
    headers = dict(
        (k.strip().lower(), v.strip()) for k, v in (x.split(":", 1) for x in lines[1:] if ":" in x)
    )
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return code, body, headers.get("connection", "").lower() == "close"


class HttpLoad:
    """GETs at `rate` per second over `conns` keep-alive connections, in a thread of its own:
    request k is due at start + k/rate on connection k mod conns, and its latency counts from
    when it was due (a late answer delays the next ones, and they count it)."""

    def __init__(self, port: int, rate: float = RATE, conns: int = CONNS) -> None:
        self.port, self.rate, self.conns = port, rate, conns
        self.figures = LoadFigures()
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.stopping: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._thread, daemon=True)
        self.started = threading.Event()
        self.thread.start()
        self.started.wait(30)

    def _thread(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())
        self.loop.close()

    async def _main(self) -> None:
        self.stopping = asyncio.Event()
        start = time.perf_counter() + 0.05
        tasks = [asyncio.ensure_future(self._conn(i, start)) for i in range(self.conns)]
        self.started.set()
        await self.stopping.wait()
        # Answers in flight get a moment; whatever is still waiting then is counted pending.
        _, hung = await asyncio.wait(tasks, timeout=5)
        for task in hung:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _conn(self, i: int, start: float) -> None:
        assert self.stopping is not None
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        j = 0
        try:
            while not self.stopping.is_set():
                due = start + (i + j * self.conns) / self.rate
                j += 1
                delay = due - time.perf_counter()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stopping.wait(), delay)
                    if self.stopping.is_set():
                        break
                path = f"/load/{i}/{j}"
                with self.lock:
                    self.figures.sent += 1
                    self.figures.pending += 1
                retried, failure, app, code = False, "", "", 0
                for attempt in (0, 1):
                    fresh = conn is None
                    try:
                        if conn is None:
                            conn = await asyncio.open_connection("127.0.0.1", self.port)
                        code, body, close = await _get(*conn, path)
                        if code == 200:
                            app = json.loads(body)["app"]
                        else:
                            failure = f"{code} {body[:80]!r}"
                        if close:
                            conn[1].close()
                            conn = None
                        break
                    except _Gone:
                        if conn is not None:
                            conn[1].close()
                        conn = None
                        if fresh or attempt:
                            failure = "closed before an answer on a new connection"
                            break
                        retried = True
                    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                        failure = f"{type(exc).__name__}: {exc}"
                        if conn is not None:
                            conn[1].close()
                        conn = None
                        break
                latency = time.perf_counter() - due
                with self.lock:
                    f = self.figures
                    f.pending -= 1
                    f.retried += retried
                    f.statuses[code] = f.statuses.get(code, 0) + 1
                    if failure:
                        f.failed.append(f"{path}: {failure}")
                    else:
                        f.ok += 1
                        f.by_app[app] = f.by_app.get(app, 0) + 1
                        f.latencies.append(latency)
        finally:
            if conn is not None:
                conn[1].close()

    def snapshot(self) -> LoadFigures:
        with self.lock:
            f = self.figures
            return LoadFigures(
                f.sent, f.ok, list(f.failed), f.retried, f.pending, dict(f.by_app), dict(f.statuses)
            )

    def wait_ok(self, more: int, timeout: float = 60) -> None:
        """Until `more` answers beyond now were OK (the load is flowing)."""
        target = self.snapshot().ok + more
        deadline = time.monotonic() + timeout
        while self.snapshot().ok < target:
            assert time.monotonic() < deadline, f"the load stalled: {self.figures.line()}"
            time.sleep(0.05)

    def stop(self) -> LoadFigures:
        assert self.stopping is not None
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(60)
        return self.figures


@dataclass
class StreamFigures:
    opened: int = 0
    exchanges: int = 0
    failed: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"streams opened={self.opened} exchanges={self.exchanges} "
            f"failed={len(self.failed)} first failures={self.failed[:5]}"
        )


class TcpStreams:
    """`count` long-lived connections through web's tcp upstream to the echo server; each
    sends a numbered 64-byte message every `tick` seconds and expects it back. A connection
    that closes or returns other bytes is a failure, and is opened again."""

    def __init__(self, port: int, count: int = STREAMS, tick: float = 0.1) -> None:
        self.port, self.count, self.tick = port, count, tick
        self.figures = StreamFigures()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(count)
        ]
        for thread in self.threads:
            thread.start()

    def _run(self, k: int) -> None:
        n = 0
        while not self.stopping.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
                    with self.lock:
                        self.figures.opened += 1
                    while not self.stopping.wait(self.tick):
                        n += 1
                        self._exchange(s, f"stream {k} message {n}".encode().ljust(64, b"."))
                        with self.lock:
                            self.figures.exchanges += 1
                    # The server closes first, as a protocol-level quit does (a client-first
                    # close: test_l4_client_close_is_released).
                    self._exchange(s, b"".ljust(60, b".") + BYE)
                    if s.recv(1) != b"":
                        raise ConnectionError("open after BYE")
            except OSError as exc:
                with self.lock:
                    self.figures.failed.append(f"stream {k}: {type(exc).__name__}: {exc}")
                self.stopping.wait(self.tick)

    @staticmethod
    def _exchange(s: socket.socket, msg: bytes) -> None:
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            chunk = s.recv(len(msg) - len(got))
            if not chunk:
                raise ConnectionError("closed by the mesh")
            got += chunk
        if got != msg:
            raise ConnectionError(f"echo mismatch: {got!r}")

    def stop(self) -> StreamFigures:
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)
        return self.figures


# ---- what the processes hold ---------------------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def metric(admin: str, name: str) -> float:
    """One unlabelled sample of the sidecar's /metrics."""
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=30) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no {name} in {admin}'s /metrics")


def connection_gauges(admin: str) -> dict[str, int]:
    return {name: c["open"] for name, c in status(admin)["proxy"]["connections"].items()}


def peer_ports(pid: int) -> list[int]:
    """The peer port of each established TCP connection process `pid` holds (the mesh is all
    on 127.0.0.1, so a port names the peer). /proc/PID/net/tcp lists the whole network
    namespace: the process's own sockets are picked by the inodes its fds point at."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
    peers = []
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                f = row.split()
                if f[9] in inodes and f[3] == "01":  # 01: ESTABLISHED
                    peers.append(int(f[2].rsplit(":", 1)[1], 16))
    return peers


def _inbound_port(gauges: Mapping[str, int]) -> int | None:
    for name in gauges:
        if name.startswith("inbound :"):
            return int(name.rsplit(":", 1)[1])
    return None


@dataclass
class Census:
    fds: dict[str, int]
    gauges: dict[str, dict[str, int]]
    tasks: dict[str, int] = field(default_factory=dict)
    pooled: dict[str, int] = field(default_factory=dict)
    """Per process, the pooled connections it holds, counted on its sockets: web's (and each
    of its data planes') to the api sidecars' inbound ports; an api sidecar's to its app, plus
    its inbound connections (web's pool seen from the other end)."""

    @classmethod
    def take(cls, mesh: FaultMesh) -> Census:
        fds: dict[str, int] = {}
        pids = mesh.pids()
        for name, pid in pids.items():
            with contextlib.suppress(FileNotFoundError):
                fds[name] = fd_count(pid)
        gauges, tasks = {}, {}
        for sid, admin in mesh.admins.items():
            if mesh.sidecars[sid].p.poll() is None:
                st = status(admin)
                gauges[sid] = {n: c["open"] for n, c in st["proxy"]["connections"].items()}
                tasks[sid] = st["tasks"]
        api_ports = {
            port for sid in mesh.apps if (port := _inbound_port(gauges.get(sid, {}))) is not None
        }
        pooled: dict[str, int] = {}
        for name, pid in pids.items():
            with contextlib.suppress(FileNotFoundError):
                peers = peer_ports(pid)
                if name in mesh.apps:
                    app = mesh.apps[name].port
                    pooled[name] = peers.count(app) + sum(gauges.get(name, {}).values())
                elif name.startswith("web"):
                    pooled[name] = sum(peers.count(port) for port in api_ports)
        return cls(fds, gauges, tasks, pooled)


def allowance(baseline: Census, now: Census) -> dict[str, int]:
    """How many more fds than at the baseline each process may hold: the pooled connections it
    gained (counted on its sockets, `Census.pooled`), up to two per load connection (one at
    each hop). Counted, not inferred from the api sidecars' gauges: an api sidecar's pool to
    its app may grow while its inbound connections stay (a request taken on an idle inbound
    connection dials the app), and when a web data plane is killed its pools die with it and
    the other data plane's grow while the api sidecars' gauges stay level."""
    return {
        name: FD_SLACK + min(2 * CONNS, max(0, n - baseline.pooled.get(name, 0)))
        for name, n in now.pooled.items()
    }


def settled(mesh: FaultMesh, baseline: Census, timeout: float = 30) -> Census:
    """Wait (bounded) until no process holds more fds than at `baseline` plus its pooled
    connections (`allowance`) and web's listeners hold no more client connections than then
    (the load closed all of its own); fail with both censuses if that never comes. A
    process that was replaced is compared with the one it replaced."""
    deadline = time.monotonic() + timeout
    while True:
        now = Census.take(mesh)
        allowed = allowance(baseline, now)
        grown = {
            name: (baseline.fds[name], n)
            for name, n in now.fds.items()
            if name in baseline.fds and n > baseline.fds[name] + allowed.get(name, FD_SLACK)
        }
        # Connections web held at the baseline are not the load's.
        held = baseline.gauges.get("web", {})
        web_open = {k: v for k, v in now.gauges.get("web", {}).items() if v > held.get(k, 0)}
        # No task per connection or request outlives it; the watches and timers are fixed.
        more_tasks = {
            sid: (baseline.tasks[sid], n)
            for sid, n in now.tasks.items()
            if sid in baseline.tasks and n > baseline.tasks[sid] + TASK_SLACK
        }
        if not grown and not web_open and not more_tasks:
            return now
        if time.monotonic() > deadline:
            pids = mesh.pids()
            peers = {
                name: sorted(Counter(peer_ports(pids[name])).items())
                for name in grown
                if name in pids
            }
            raise AssertionError(
                f"leak: fds grown {grown} (allowed {allowed}), web's open client connections "
                f"{web_open}, tasks grown {more_tasks}; established connections of the grown "
                f"by peer port {peers} (Consul {mesh.port}); before {baseline}, after {now}"
            )
        time.sleep(0.2)  # polling /proc; the deadline only catches a leak


@dataclass
class Run:
    """One fault under load: figures for the report and the leak check's censuses."""

    name: str
    http: LoadFigures
    streams: StreamFigures
    before: Census
    after: Census
    extra: str = ""

    def report(self) -> str:
        return (
            f"\nFAULT {self.name}: {self.http.line()}\n  {self.streams.line()}\n"
            f"  fds before {self.before.fds} after {self.after.fds}\n"
            f"  tasks before {self.before.tasks} after {self.after.tasks}\n"
            f"  pooled before {self.before.pooled} after {self.after.pooled}\n"
            f"  gauges after {self.after.gauges} {self.extra}"
        )


def under_load(
    mesh: FaultMesh,
    name: str,
    fault: Callable[[HttpLoad], str | None],
    *,
    warm: int = 200,
    after: int = 200,
    leaks: bool = True,
) -> Run:
    """Warm the mesh up, take the baseline census, run the load and the streams, apply
    `fault(load)`, go on until `after` more answers are OK, stop, and check for leaks."""
    warmup = HttpLoad(mesh.web_api)
    warmup.wait_ok(warm)
    warmup.stop()
    before = settled(mesh, Census.take(mesh))
    load = HttpLoad(mesh.web_api)
    streams = TcpStreams(mesh.web_echo)
    try:
        load.wait_ok(warm)
        extra = fault(load) or ""
        load.wait_ok(after)
    finally:
        figures = load.stop()
        stream_figures = streams.stop()
    census = settled(mesh, before) if leaks else Census.take(mesh)
    run = Run(name, figures, stream_figures, before, census, extra)
    print(run.report())
    return run
