"""`meshlet sidecar --workers 2` as real processes against `meshlet dev`.

web (an http service) runs `meshlet sidecar --workers 2`: its agent and two data-plane
processes (connect/dataplane), with one http upstream, api, whose sidecar is a single
process. Checked from outside, through /proc: both data planes hold listening sockets on
every port and the agent none; new connections through the upstream port are accepted by
both (the kernel's SO_REUSEPORT hash spreads them) and all reach api's app; a data plane
SIGKILLed is restarted while the other keeps serving; SIGTERM to the agent stops every
process (exit 0, nothing left); SIGKILL to the agent leaves the data planes serving, and the
agent started again adopts them and feeds them again. A data plane loads neither aiohttp nor
cryptography, and refuses a malformed snapshot whole.

Waits are on log lines, the parent's /v1/status and Consul blocking queries; the only polls
are of /proc and of status, bounded by a deadline that only catches a hang. No timing is
asserted.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_agent_process import wait_catalog
from tests.integration.test_sidecar_mesh import (
    Mesh,
    put_intentions,
    status,
    wait_line,
    wait_status,
)

DEADLINE = 60.0

pytestmark = pytest.mark.timeout(180)


# ---- who holds which socket, from /proc -------------------------------------------------------


def _tcp_sockets() -> list[tuple[int, int, str, int]]:
    """(local port, remote port, state, inode) of every TCP socket in our network namespace."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
            out.append(
                (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state, inode)
            )
    return out


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            link = os.readlink(fd_dir / fd)
        except FileNotFoundError:
            continue  # closed meanwhile
        if link.startswith("socket:["):
            inodes.add(int(link[len("socket:[") : -1]))
    return inodes


_LISTEN = "0A"


def listens(pid: int, port: int) -> bool:
    """Does process `pid` hold a listening socket on `port`?"""
    wanted = {i for lp, _, st, i in _tcp_sockets() if lp == port and st == _LISTEN}
    return bool(wanted & _socket_inodes(pid))


def accepted_by(port: int, client_port: int, pids: list[int]) -> int | None:
    """Which of `pids` holds the server side of the connection from `client_port` to `port`."""
    inodes = {i for lp, rp, st, i in _tcp_sockets() if lp == port and rp == client_port}
    for pid in pids:
        if inodes & _socket_inodes(pid):
            return pid
    return None


def gone(pid: int) -> bool:
    """No such process any more (or a zombie: it has exited, its sockets are closed)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_until(done: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # polling /proc; the deadline only catches a hang


# ---- the mesh -----------------------------------------------------------------------------------


def dataplane_pids(control: Path) -> list[int]:
    """The data-plane processes of the instance whose control directory is `control`."""
    wanted = str(control / "dataplane.sock").encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"connect.dataplane" in args and wanted in args and not gone(int(entry)):
            out.append(int(entry))
    return sorted(out)


class WorkersMesh(Mesh):
    """test_sidecar_mesh's Mesh (api and web speak http) with web's sidecar on two data
    planes (`web_args`: one, the default, with none), its control directory in a private
    temporary one (a unix socket path is short)."""

    def __init__(self, tmp: Path, web_args: tuple[str, ...] = ("--workers", "2")) -> None:
        super().__init__(tmp, "http")
        self.runtime = Path(tempfile.mkdtemp(prefix="ml-"))
        self.env = {**self.env, "XDG_RUNTIME_DIR": str(self.runtime)}
        self.control = self.runtime / "meshlet" / f"sidecar-web-{self.web_public}"
        try:
            put_intentions(self.consul, "api", "allow")
            self.start(web_args=web_args)
            st = wait_status(
                self.web_admin,
                lambda s: all(p["ready"] for p in s["workers"]["processes"]),
                "web's data planes serving",
            )
        except BaseException:
            self.stop()
            raise
        self.api, self.web = self.sidecars["api"], self.sidecars["web"]
        self.threads = self.drains
        self.parent = self.web.p.pid
        self.worker = int(st["workers"]["processes"][0]["pid"])
        self.other = int(st["workers"]["processes"][-1]["pid"])

    def stop(self) -> None:
        # Data planes outlive a SIGKILLed agent by design: stopped here by pid, or the
        # agent's log pipe they share never reaches EOF.
        for pid in dataplane_pids(self.control):
            os.kill(pid, signal.SIGKILL)
        super().stop()
        shutil.rmtree(self.runtime, ignore_errors=True)


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[WorkersMesh]:
    m = WorkersMesh(tmp_path)
    try:
        yield m
    finally:
        m.stop()


def _through_upstream(port: int, path: str, pids: tuple[int, ...] = ()) -> int | None:
    """One request on a new connection, answered by api's app; which of `pids` accepted it
    (asked while the connection is open: the serving process holds its socket meanwhile)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, (resp.status, body)
        assert json.loads(body)["app"] == "api"
        assert conn.sock is not None
        return accepted_by(port, conn.sock.getsockname()[1], pids)
    finally:
        conn.close()


# ---- tests ---------------------------------------------------------------------------------------


def test_both_processes_serve_and_a_killed_worker_comes_back(mesh: WorkersMesh) -> None:
    parent, worker, other = mesh.parent, mesh.worker, mesh.other
    assert len({parent, worker, other}) == 3
    for port in (mesh.web_public, mesh.web_upstream):
        assert not listens(parent, port), f"the agent listens on {port}"
        assert listens(worker, port), f"data plane 1 does not listen on {port}"
        assert listens(other, port), f"data plane 2 does not listen on {port}"

    # New connections are spread by the kernel's hash of each connection's addresses: with
    # 60 of them, one socket getting them all has a chance of 2**-59.
    before = status(mesh.web_admin)["workers"]["stats_total"]["requests"]
    owners = [_through_upstream(mesh.web_upstream, f"/n{i}", (other, worker)) for i in range(60)]
    assert set(owners) == {other, worker}, owners
    # The parent's status counts every process's requests (workers report once a second).
    wait_status(
        mesh.web_admin,
        lambda s: s["workers"]["stats_total"]["requests"] >= before + 60,
        "all 60 requests counted across the processes",
    )
    st = status(mesh.web_admin)
    # The agent serves nothing itself: `proxy.stats` is the data planes' total.
    assert st["proxy"]["stats"]["requests"] == st["workers"]["stats_total"]["requests"]
    assert st["workers"]["stats_total"]["requests"] >= 60

    os.kill(worker, signal.SIGKILL)
    line = wait_line(mesh.web, f"data plane 1 (pid {worker}) exited unexpectedly")
    assert "(killed by SIGKILL)" in line
    # The data plane is dead and reaped (its sockets closed): every new connection is served,
    # by the other one or by the restarted one once that one has bound.
    for i in range(20):
        _through_upstream(mesh.web_upstream, f"/down{i}")

    st = wait_status(
        mesh.web_admin,
        lambda s: (
            s["workers"]["processes"][0]["restarts"] == 1 and s["workers"]["processes"][0]["ready"]
        ),
        "the worker restarted and serving",
    )
    proc = st["workers"]["processes"][0]
    assert proc["last_exit"] == "killed by SIGKILL"
    assert proc["state"] == "running"
    restarted = int(proc["pid"])
    assert restarted != worker and gone(worker)
    assert listens(restarted, mesh.web_upstream) and listens(restarted, mesh.web_public)
    assert st["ready"] is True  # a worker down never made the instance unready
    assert st["degraded"] is False
    _through_upstream(mesh.web_upstream, "/after")


def test_sigterm_stops_every_process(mesh: WorkersMesh) -> None:
    worker = mesh.worker
    mesh.web.p.send_signal(signal.SIGTERM)
    assert mesh.web.p.wait(30) == 0
    mesh.threads["web"].join(30)  # the whole log (the worker's too), up to EOF
    text = "".join(mesh.web.lines)
    assert f"data plane 1 (pid {worker}) stopped (exit code 0)" in text
    assert f"dataplane 1 (pid {worker}) meshlet.connect.dataplane: data plane stopped" in text
    assert "exited unexpectedly" not in text
    assert text.index("data plane stopped") < text.index("meshlet agent stopped")
    assert gone(worker) and gone(mesh.other)
    assert dataplane_pids(mesh.control) == []
    for port in (mesh.web_upstream, mesh.web_public):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
    wait_catalog(mesh.consul, "/v1/catalog/service/web-sidecar-proxy", lambda b: b == [])


def _dataplane_status(mesh: WorkersMesh, index: int) -> dict[str, Any]:
    return dict(json.loads((mesh.control / f"dataplane-{index}.json").read_text()))


def test_data_planes_serve_through_an_agent_restart(mesh: WorkersMesh) -> None:
    planes = (mesh.worker, mesh.other)
    _through_upstream(mesh.web_upstream, "/before")
    mesh.web.p.kill()
    mesh.web.p.wait(30)
    wait_until(
        lambda: all(_dataplane_status(mesh, i)["agent"] == "lost" for i in (1, 2)),
        "both data planes saying the agent is lost",
    )
    # Without its agent, each data plane keeps serving the last snapshot.
    owners = [_through_upstream(mesh.web_upstream, f"/alone{i}", planes) for i in range(40)]
    assert set(owners) == set(planes), owners
    assert dataplane_pids(mesh.control) == sorted(planes)
    lost = _dataplane_status(mesh, 1)
    assert lost["agent_losses"] == 1 and lost["agent_lost_since"] is not None

    # The agent started again adopts them (no new process, no port conflict) ...
    again = mesh._start_sidecar(
        "web", ["sidecar", "-c", str(mesh.tmp / "web.yaml"), "--workers", "2"]
    )
    mesh.web = again
    st = wait_status(
        mesh.web_admin,
        lambda s: all(p["ready"] and p["adopted"] for p in s["workers"]["processes"]),
        "the restarted agent's data planes adopted and serving",
    )
    assert sorted(int(p["pid"]) for p in st["workers"]["processes"]) == sorted(planes)
    # One loss each: a redial the dying (or the starting) agent dropped unanswered is not one.
    assert all(p["agent_losses"] == 1 for p in st["workers"]["processes"]), st["workers"]
    assert dataplane_pids(mesh.control) == sorted(planes)
    wait_until(
        lambda: all(_dataplane_status(mesh, i)["agent"] == "attached" for i in (1, 2)),
        "both data planes attached again",
    )
    # ... and a change the new agent sees reaches them: api's only instance leaves, so
    # web's upstream has no endpoint to send to.
    _through_upstream(mesh.web_upstream, "/adopted")
    mesh.api.p.send_signal(signal.SIGTERM)
    assert mesh.api.p.wait(30) == 0
    wait_status(
        mesh.web_admin,
        lambda s: s["proxy"]["upstreams"]["api"]["endpoints"] == 0,
        "api's instance gone at web's agent",
    )

    def refused_everywhere() -> bool:
        # Each data plane answers 503 once the new snapshot (no endpoints) is applied.
        codes = set()
        for i in range(20):
            conn = http.client.HTTPConnection("127.0.0.1", mesh.web_upstream, timeout=30)
            try:
                conn.request("GET", f"/gone{i}")
                codes.add(conn.getresponse().status)
            finally:
                conn.close()
        return codes == {503}

    wait_until(refused_everywhere, "every data plane applying the endpoint change")


def test_a_data_plane_loads_neither_aiohttp_nor_cryptography(mesh: WorkersMesh) -> None:
    for pid, index in ((mesh.worker, 1), (mesh.other, 2)):
        modules = set(_dataplane_status(mesh, index)["modules"])
        assert {"connect", "ssl", "uvloop", "httptools"} <= modules
        assert not modules & {"aiohttp", "cryptography", "msgspec", "yaml", "agent"}, modules
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "cryptography" not in maps and "aiohttp" not in maps
        rss = _kib(pid, "VmRSS")
        print(f"data plane {index} (pid {pid}): VmRSS {rss / 1024:.1f} MiB")
    print(f"agent (pid {mesh.parent}): VmRSS {_kib(mesh.parent, 'VmRSS') / 1024:.1f} MiB")


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def test_a_malformed_snapshot_is_refused_whole(mesh: WorkersMesh) -> None:
    """Something other than the agent on the control socket (it is 0700, so: a bug, or a
    compromised agent) pushes broken snapshots: each is refused whole, the data plane keeps
    serving the last good one and says so."""
    mesh.web.p.kill()
    mesh.web.p.wait(30)
    wait_until(lambda: _dataplane_status(mesh, 1)["agent"] == "lost", "data plane 1 lost")
    good = _dataplane_status(mesh, 1)["snapshot_version"]
    path = mesh.control / "dataplane.sock"
    path.unlink()
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        server.settimeout(DEADLINE)
        conns = []
        try:
            hellos = {}
            while len(hellos) < 2:
                conn, _ = server.accept()
                conns.append(conn)
                reader = conn.makefile("rb")
                hello = json.loads(reader.readline())["hello"]
                hellos[hello["index"]] = (conn, reader)
            conn, reader = hellos[1]
            bad = [
                b'{"v":1,"snapshot":{"version":7,"service":"web"}}\n',  # fields missing
                b'{"v":1,"snapshot":[1,2]}\n',
                b"not json\n",
                b'{"v":2,"snapshot":{}}\n',  # another wire version
            ]
            for line in bad:
                conn.sendall(line)
            # A whole snapshot whose leaf is not PEM: decoded, then refused by TLS.
            conn.sendall(
                json.dumps(
                    {"v": 1, "snapshot": {**_snapshot_skeleton(mesh), "version": 9}}
                ).encode()
                + b"\n"
            )
            refusals = []
            while len(refusals) < 3:
                message = json.loads(reader.readline())
                if "refused" in message:
                    refusals.append(message["refused"])
            assert "missing field" in refusals[0]["error"], refusals
            assert "expected an object" in refusals[1]["error"], refusals
            assert refusals[2]["version"] == 9, refusals
            owners = [
                _through_upstream(mesh.web_upstream, f"/kept{i}", (mesh.worker,)) for i in range(20)
            ]
            assert mesh.worker in owners  # data plane 1 still serves, with the old snapshot
            st = _dataplane_status(mesh, 1)
            assert st["snapshot_version"] == good and st["refused"] == 3
        finally:
            for c in conns:
                c.close()


def _snapshot_skeleton(mesh: WorkersMesh) -> dict[str, Any]:
    return {
        "service": "web",
        "spec": {
            "upstreams": [
                {"name": "api", "protocol": "http", "host": "127.0.0.1", "port": mesh.web_upstream}
            ]
        },
        "material": {
            "leaf": {
                "cert_pem": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                "key_pem": "nope",
            },
            "bundle": {
                "pem": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                "trust_domain": "x",
            },
        },
        "intentions": {"default_allow": False, "default_reason": "test", "entries": []},
        "endpoints": [{"name": "api", "targets": []}],
    }


def listens_any(port: int) -> bool:
    return any(lp == port and st == _LISTEN for lp, _, st, _ in _tcp_sockets())


def _scraped_requests(admin: str) -> float:
    """istio_requests_total of the source reporter, summed over its series, from /metrics."""
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("istio_requests_total{") and 'reporter="source"' in line
    )


def test_one_scrape_counts_the_requests_of_every_process(mesh: WorkersMesh) -> None:
    other, worker = mesh.other, mesh.worker
    owners = [_through_upstream(mesh.web_upstream, f"/m{i}", (other, worker)) for i in range(60)]
    assert set(owners) == {other, worker}, owners
    # Workers report their counters at most once a second: wait for the total.
    deadline = time.monotonic() + 30
    while _scraped_requests(mesh.web_admin) < 60:
        assert time.monotonic() < deadline, _scraped_requests(mesh.web_admin)
        time.sleep(0.1)
    assert _scraped_requests(mesh.web_admin) == 60
    # `proxy.stats` in /v1/status is the data planes' total, as /metrics is.
    assert status(mesh.web_admin)["proxy"]["stats"]["requests"] >= 60


# ---- the default: one data plane ----------------------------------------------------------------


def test_a_default_sidecar_is_one_lean_data_plane_that_outlives_its_agent(tmp_path: Path) -> None:
    """`meshlet sidecar` without --workers: exactly one data-plane process, not the agent,
    holds the listeners, loads neither aiohttp nor cryptography, and /v1/status's `proxy`
    section says what it serves. SIGKILL the agent: requests keep flowing through it."""
    mesh = WorkersMesh(tmp_path, web_args=())
    try:
        st = status(mesh.web_admin)
        assert st["workers"]["count"] == 1 and st["workers"]["mode"] == "data planes"
        plane = mesh.worker
        assert dataplane_pids(mesh.control) == [plane]
        assert plane != mesh.parent
        for port in (mesh.web_public, mesh.web_upstream):
            assert not listens(mesh.parent, port), f"the agent listens on {port}"
            assert listens(plane, port), f"the data plane does not listen on {port}"
        modules = set(_dataplane_status(mesh, 1)["modules"])
        assert {"connect", "ssl", "uvloop", "httptools"} <= modules
        assert not modules & {"aiohttp", "cryptography", "agent"}, modules
        maps = Path(f"/proc/{plane}/maps").read_text()
        assert "cryptography" not in maps and "aiohttp" not in maps

        # The proxy section comes from the data plane's reports.
        proxy = st["proxy"]
        assert all(proxy["listeners"].values()) and len(proxy["listeners"]) == 2, proxy
        assert proxy["upstreams"]["api"]["endpoints"] == 1
        assert proxy["intentions"]["loaded"] and proxy["leaf"]["generation"] >= 1
        for i in range(5):
            assert _through_upstream(mesh.web_upstream, f"/d{i}", (plane,)) == plane
        wait_status(
            mesh.web_admin,
            lambda s: s["proxy"]["stats"]["requests"] >= 5,
            "the data plane's requests counted in proxy.stats",
        )

        mesh.web.p.kill()  # the agent alone
        mesh.web.p.wait(30)
        wait_until(lambda: _dataplane_status(mesh, 1)["agent"] == "lost", "the agent lost")
        for i in range(20):
            assert _through_upstream(mesh.web_upstream, f"/alone{i}", (plane,)) == plane
        assert dataplane_pids(mesh.control) == [plane]
    finally:
        mesh.stop()
