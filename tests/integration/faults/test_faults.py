"""Issue 14, item 1: faults under a steady load, with figures, nothing lost, nothing leaked.

Each test builds a `FaultMesh` (devstack, api-1 and api-2 behind http sidecars, echo behind a
tcp sidecar, web's sidecar with both as upstreams), runs `HttpLoad` (RATE GETs/s over CONNS
keep-alive connections to web's api port) and `TcpStreams` (long-lived echo connections
through web's tcp upstream), applies one fault, runs on, and checks: no GET failed, no
stream broke, every process is back to its fds at the baseline (plus FD_SLACK, the pools),
web holds no client connection once the clients closed theirs. Each prints sent, failed,
retried (GETs the client sent again because a keep-alive connection closed before any byte
of an answer: RFC 9112 9.3.1), pending, p99.

Short form by default (`make test`); MESHLET_FAULTS=full (`make faults`) makes each fault
longer.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from connect.routes import DEFAULT_REQUEST_TIMEOUT
from tests.connect.small_filesystem import fill, free, small_filesystem
from tests.integration.faults.harness import (
    CONNS,
    FULL,
    STREAMS,
    FaultMesh,
    HttpLoad,
    TcpStreams,
    make_mesh,
    metric,
    seconds,
    under_load,
)
from tests.integration.faults.test_routing_faults import sidecar_retries
from tests.integration.test_sidecar_mesh import put_intentions, status, wait_line, wait_status

pytestmark = pytest.mark.timeout(300)


full_only = pytest.mark.skipif(not FULL, reason="long form only: make faults")


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[FaultMesh]:
    m = make_mesh(tmp_path)
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="module")
def calm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultMesh]:
    """One mesh for the faults that leave it as they found it (intentions put back, apps
    answering, registrations removed): saves a mesh start per test in the short form."""
    m = make_mesh(tmp_path_factory.mktemp("calm"))
    try:
        yield m
    finally:
        m.stop()


def _generation(admin: str) -> int:
    gen: int = status(admin)["proxy"]["leaf"]["generation"]
    return gen


def _assert_clean(run_http_failed: list[str], retried: int, stream_failed: list[str]) -> None:
    assert run_http_failed == [], run_http_failed[:20]
    assert retried == 0
    assert stream_failed == [], stream_failed[:20]


# ---- certificates ----------------------------------------------------------------------------


def test_leaf_rotation_every_few_seconds(tmp_path: Path) -> None:
    """Leaves of 4 s: every sidecar takes a new one about every 3 s (soft expiry at 60-90 %)."""
    mesh = make_mesh(tmp_path, dev_args=("--leaf-cert-ttl", "4"))
    rotations = int(seconds(2, 20))
    try:

        def rotate(load: HttpLoad) -> str:
            start = {sid: _generation(mesh.admins[sid]) for sid in ("web", "api-1", "echo")}
            for sid, gen in start.items():
                wait_status(
                    mesh.admins[sid],
                    lambda s, gen=gen: s["proxy"]["leaf"]["generation"] >= gen + rotations,
                    f"{sid}'s leaf rotated {rotations} times",
                )
            return f"leaf generations {start} -> +{rotations} each"

        run = under_load(mesh, "leaf rotation", rotate)
    finally:
        mesh.stop()
    _assert_clean(run.http.failed, run.http.retried, run.streams.failed)


@full_only
def test_ca_root_rotation_cross_signed(mesh: FaultMesh) -> None:
    def rotate_root(load: HttpLoad) -> str:
        gens = {sid: _generation(mesh.admins[sid]) for sid in ("web", "api-1", "api-2", "echo")}
        body = {"Provider": "consul", "Config": {"PrivateKeyType": "rsa", "PrivateKeyBits": 2048}}
        req = urllib.request.Request(
            f"http://{mesh.consul}/v1/connect/ca/configuration",
            data=json.dumps(body).encode(),
            method="PUT",
        )
        urllib.request.urlopen(req, timeout=30).close()
        for sid, gen in gens.items():
            wait_status(
                mesh.admins[sid],
                lambda s, gen=gen: (
                    s["proxy"]["leaf"]["roots_changes"] >= 1
                    and s["proxy"]["leaf"]["generation"] > gen
                    and s["ready"]
                ),
                f"{sid} on a leaf of the new root",
            )
        return "every sidecar on a leaf of the new (cross-signed) root"

    run = under_load(mesh, "CA root rotation", rotate_root)
    _assert_clean(run.http.failed, run.http.retried, run.streams.failed)


# ---- the control plane -----------------------------------------------------------------------


def _kill_consul(mesh: FaultMesh, at_restart: dict[str, int]) -> Callable[[HttpLoad], str]:
    outage = seconds(8, 30)

    def kill_consul(load: HttpLoad) -> str:
        mesh.kill_dev()
        at_kill = load.snapshot()
        time.sleep(outage)  # the fault's duration, not a wait for anything
        during = load.snapshot()
        at_restart["served"] = during.ok - at_kill.ok
        at_restart["failed"] = len(during.failed)
        mesh.restart_dev()
        # Restarted empty: the sidecars register again (and web's watches answer again).
        mesh.wait_passing("api", 2)
        mesh.wait_passing("echo", 1)
        mesh.wait_web_endpoints(api=2, echo=1)
        for sid, admin in mesh.admins.items():
            wait_status(admin, lambda s: s["ready"], f"{sid} ready after the restart")
        return (
            f"during the {outage:g} s outage: {at_restart['served']} answered, "
            f"{at_restart['failed']} failed; after the restart: "
            f"{len(load.snapshot().failed) - at_restart['failed']} failed"
        )

    return kill_consul


def test_control_plane_killed_traffic_flows_on_the_last_snapshot(mesh: FaultMesh) -> None:
    """While devstack is down, every GET and stream is served from the last snapshots; once it
    is back (empty), every sidecar registers again, is ready, and the load flows."""
    at_restart: dict[str, int] = {}
    run = under_load(
        mesh, "control plane killed and restarted empty", _kill_consul(mesh, at_restart)
    )
    assert at_restart["failed"] == 0 and at_restart["served"] > 0, run.report()
    assert run.streams.failed == [], run.report()


@full_only
def test_control_plane_restarted_empty_fails_no_request(mesh: FaultMesh) -> None:
    at_restart: dict[str, int] = {}
    run = under_load(mesh, "control plane restarted empty (ideal)", _kill_consul(mesh, at_restart))
    _assert_clean(run.http.failed, run.http.retried, run.streams.failed)


# ---- an upstream instance --------------------------------------------------------------------


@full_only
def test_upstream_instance_killed(mesh: FaultMesh) -> None:
    def kill(load: HttpLoad) -> str:
        mesh.sidecars["api-2"].kill()
        mesh.apps["api-2"].kill()
        mesh.wait_web_endpoints(api=1)
        return ""

    run = under_load(mesh, "upstream instance killed", kill)
    # web's sidecar retries what the dead instance dropped; the client never sees it.
    _assert_clean(run.http.failed, run.http.retried, run.streams.failed)


@full_only
def test_upstream_instance_slow(mesh: FaultMesh) -> None:
    def slow(load: HttpLoad) -> str:
        mesh.apps["api-2"].mode("slow")
        load.wait_ok(int(seconds(3, 30) * 150))
        mesh.apps["api-2"].mode("ok")
        return "api-2 answered each GET after 200 ms"

    run = under_load(mesh, "upstream instance slow", slow)
    _assert_clean(run.http.failed, run.http.retried, run.streams.failed)


@full_only
def test_upstream_instance_flapping_in_and_out_of_the_catalog(mesh: FaultMesh) -> None:
    cycles = int(seconds(3, 15))

    def flap(load: HttpLoad) -> str:
        for _ in range(cycles):
            mesh.apps["api-2"].mode("sick")  # its check fails: Consul drops it
            mesh.wait_web_endpoints(api=1)
            load.wait_ok(100)
            mesh.apps["api-2"].mode("ok")
            mesh.wait_web_endpoints(api=2)
            load.wait_ok(100)
        return f"{cycles} cycles out of and back into web's endpoints"

    run = under_load(mesh, "upstream instance flapping", flap)
    _assert_clean(run.http.failed, run.http.retried, run.streams.failed)
    assert run.http.by_app.get("api-2", 0) > 0


@full_only
def test_upstream_instance_hung_its_requests_are_answered_504_after_the_timeout(
    mesh: FaultMesh,
) -> None:
    """No routing entries: web's sidecar applies Envoy's default route timeout, as Consul's
    Envoy does (connect.routes.DEFAULT_REQUEST_TIMEOUT, 15 s). A GET sent to an instance whose
    app accepts and never answers is answered 504 `upstream request timeout` once it passed,
    and the connections it held are released (checked: no leak); Consul's check drops the
    instance, and from then on every new GET goes to api-1. Without a retry policy those GETs
    fail; the Consul way to have them answered is the next test's."""
    timed_out: dict[str, int] = {}

    def hang(load: HttpLoad) -> str:
        mesh.apps["api-2"].mode("hang")
        mesh.wait_web_endpoints(api=1)
        # The keep-alive connections of the steady load that sent a GET to api-2 wait for
        # its answer; a fresh client shows the mesh itself still serves.
        fresh = HttpLoad(mesh.web_api, rate=50, conns=2)
        fresh.wait_ok(100)
        figures = fresh.stop()
        assert figures.failed == [] and figures.by_app.keys() == {"api-1"}, figures.line()
        # Every GET sent to api-2 was sent before now: past the timeout, each has its 504.
        time.sleep(DEFAULT_REQUEST_TIMEOUT + seconds(2, 5))
        timed_out["n"] = load.snapshot().statuses.get(504, 0)
        return f"GETs sent to the hung instance, answered 504: {timed_out['n']}"

    run = under_load(mesh, "upstream instance hung", hang, after=100)
    assert timed_out["n"] > 0, run.report()
    assert run.http.pending == 0, run.report()
    assert len(run.http.failed) == timed_out["n"], run.report()
    assert all(f.endswith("504 b'upstream request timeout'") for f in run.http.failed), run.report()
    assert run.streams.failed == [], run.report()


@full_only
def test_a_get_sent_to_a_hung_instance_is_answered_by_another(mesh: FaultMesh) -> None:
    """The Consul way: a service-router whose route retries (RetryOn gateway-error) with a
    per-try timeout (meshlet.io/route.0.per-try-timeout): a GET sent to the hung instance is
    sent again to api-1 after a second, and none fails. (test_routing_faults' split test
    shows it too, among other faults and with subsets and a splitter; this is it alone.)"""
    router = {
        "Kind": "service-router",
        "Name": "api",
        "Routes": [
            {
                "Match": {"HTTP": {"PathPrefix": "/"}},
                "Destination": {"NumRetries": 2, "RetryOn": ["gateway-error"]},
            }
        ],
        "Meta": {"meshlet.io/route.0.per-try-timeout": "1s"},
    }
    mesh.wait_routed(mesh.write(router))
    retries0 = sidecar_retries(mesh)
    mesh.apps["api-2"].mode("hang")
    load = HttpLoad(mesh.web_api, rate=50, conns=4)
    try:
        time.sleep(seconds(3, 10))  # long enough for several GETs to have picked api-2
    finally:
        figures = load.stop()
    retried = sidecar_retries(mesh) - retries0
    print(f"\nhung instance, per-try timeout and retries: {figures.line()} retries={retried:g}")
    assert figures.pending == 0 and figures.failed == [], figures.line()
    assert retried > 0 and figures.by_app.keys() == {"api-1"}, figures.line()


@full_only
def test_a_client_giving_up_on_a_held_get_releases_its_connections(mesh: FaultMesh) -> None:
    for app in mesh.apps.values():
        app.mode("hang")
    s = socket.create_connection(("127.0.0.1", mesh.web_api), timeout=10)
    s.sendall(b"GET /held HTTP/1.1\r\nHost: api\r\n\r\n")
    wait_status(
        mesh.admins["web"],
        lambda st: (
            sum(st["proxy"]["connections"][k]["open"] for k in st["proxy"]["connections"]) >= 1
        ),
        "web holding the GET",
    )
    time.sleep(1)  # the GET reaches a hung app
    s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        conns = status(mesh.admins["web"])["proxy"]["connections"]
        if not any(c["open"] for c in conns.values()):
            return
        time.sleep(0.2)
    raise AssertionError(f"web still holds the abandoned GET's connection: {conns}")


def _inbound_open(admin: str) -> int:
    return sum(c["open"] for c in status(admin)["proxy"]["connections"].values())


def test_pooled_connections_to_an_endpoint_that_left_are_closed(calm: FaultMesh) -> None:
    """Instances that come and go with new IDs (pods, allocations) all served by api-1's
    sidecar: once each has left, web's pooled connections to it should be closed."""
    mesh = calm
    api1 = mesh.admins["api-1"]
    port = int(next(iter(status(api1)["proxy"]["connections"])).split(":")[1])
    burst = HttpLoad(mesh.web_api, rate=200, conns=4)
    burst.wait_ok(100)
    burst.stop()
    baseline = _inbound_open(api1)
    base = f"http://{mesh.consul}/v1/agent/service"
    for n in range(10):
        sid = f"api-gone-{n}"
        body = {
            "Name": "api-sidecar-proxy",
            "ID": sid,
            "Kind": "connect-proxy",
            "Address": "127.0.0.1",
            "Port": port,
            "Proxy": {"DestinationServiceName": "api"},
        }
        req = urllib.request.Request(
            f"{base}/register", data=json.dumps(body).encode(), method="PUT"
        )
        urllib.request.urlopen(req, timeout=30).close()
        mesh.wait_web_endpoints(api=3)
        burst = HttpLoad(mesh.web_api, rate=200, conns=4)
        burst.wait_ok(60)
        burst.stop()
        req = urllib.request.Request(f"{base}/deregister/{sid}", method="PUT")
        urllib.request.urlopen(req, timeout=30).close()
        mesh.wait_web_endpoints(api=2)
    after = _inbound_open(api1)
    print(f"\napi-1's inbound connections: {baseline} before, {after} after 10 endpoints left")
    assert after <= baseline + 4, f"{after - baseline} connections to departed endpoints kept"


# ---- the sidecars themselves -----------------------------------------------------------------


def test_server_sidecar_restarted_with_a_drain(tmp_path: Path) -> None:
    mesh = make_mesh(tmp_path, drain="2s")
    try:

        def restart(load: HttpLoad) -> str:
            api1 = mesh.sidecars["api-1"]
            api1.p.send_signal(signal.SIGTERM)
            assert api1.p.wait(60) == 0
            mesh.wait_web_endpoints(api=1)
            load.wait_ok(100)  # api-2 alone carries it
            mesh.restart_sidecar("api-1")
            mesh.wait_web_endpoints(api=2)
            return ""

        run = under_load(mesh, "server sidecar restarted with a drain", restart)
    finally:
        mesh.stop()
    _assert_clean(run.http.failed, run.http.retried, run.streams.failed)
    assert run.http.by_app.get("api-1", 0) > 0


def test_config_reload(calm: FaultMesh) -> None:
    mesh = calm

    def reload(load: HttpLoad) -> str:
        for sid in ("web", "api-1", "echo"):
            before = sum("reloaded" in line for line in mesh.sidecars[sid].lines)
            mesh.sidecars[sid].p.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            while sum("reloaded" in line for line in mesh.sidecars[sid].lines) == before:
                assert time.monotonic() < deadline, f"{sid} never said it reloaded"
                time.sleep(0.05)
            load.wait_ok(50)
        return "SIGHUP to web, api-1 and echo"

    run = under_load(mesh, "config reload", reload)
    _assert_clean(run.http.failed, run.http.retried, run.streams.failed)


def test_access_log_disk_full(tmp_path: Path) -> None:
    """web writes an access line per request to a file on a small tmpfs, which fills up
    under the load and is then given space back: no GET fails or waits on the log, the lost
    lines are counted (meshlet_access_log_write_failed_total), the failure and the recovery
    are each logged once, and lines reach the file again after."""
    with small_filesystem(tmp_path / "fs", 2048) as fs:
        path = fs / "web-access.log"
        logs = f"telemetry:\n  access_logs: {{enabled: true, type: file, path: '{path}'}}\n"
        mesh = make_mesh(tmp_path, web_yaml=logs)
        web, admin = mesh.sidecars["web"], mesh.admins["web"]
        try:

            def disk_full(load: HttpLoad) -> str:
                assert path.stat().st_size > 0
                fill(fs)
                wait_line(web, "access log: cannot write to")
                load.wait_ok(int(seconds(400, 4000)))  # a few seconds full, under the load
                lost = metric(admin, "meshlet_access_log_write_failed_total")
                assert lost > 0
                # The queue never backed up: the writer failed fast, the proxy never waited.
                assert metric(admin, "meshlet_access_log_dropped_total") == 0
                free(fs)
                wait_line(web, "access log: writing to")
                size = path.stat().st_size
                load.wait_ok(200)
                deadline = time.monotonic() + 30
                while path.stat().st_size <= size:  # the writer's next batch
                    assert time.monotonic() < deadline, "no line written after space came back"
                    time.sleep(0.05)
                return f"{lost:.0f} access-log lines lost while the disk was full"

            run = under_load(mesh, "access log disk full", disk_full)
        finally:
            mesh.stop()
    _assert_clean(run.http.failed, run.http.retried, run.streams.failed)
    logged = "".join(web.lines)
    assert logged.count("access log: cannot write to") == 1, logged[-3000:]
    assert logged.count("access log: writing to") == 1, logged[-3000:]
    assert "No space left on device" in logged


@full_only
def test_a_worker_process_killed(tmp_path: Path) -> None:
    """web on `--workers 2`, one data plane SIGKILLed: the client connections it held die
    with it (a killed process's sockets are reset by the kernel). What may be lost is bounded:
    at most the GET in flight on each of them and the streams it carried; every other GET is
    answered, new connections are served by the other data plane and by the restarted one."""
    mesh = make_mesh(tmp_path, web_args=("--workers", "2"))
    try:
        worker = wait_status(
            mesh.admins["web"], lambda s: s["workers"]["processes"][0]["ready"], "worker ready"
        )["workers"]["processes"][0]["pid"]

        def kill_worker(load: HttpLoad) -> str:
            os.kill(int(worker), signal.SIGKILL)
            wait_line(mesh.sidecars["web"], f"(pid {worker}) exited unexpectedly")
            wait_status(
                mesh.admins["web"],
                lambda s: (
                    s["workers"]["processes"][0]["restarts"] == 1
                    and s["workers"]["processes"][0]["ready"]
                ),
                "the worker restarted",
            )
            return f"worker pid {worker} killed and restarted"

        run = under_load(mesh, "worker process killed", kill_worker)
    finally:
        mesh.stop()
    assert len(run.http.failed) <= CONNS, run.report()
    assert len(run.streams.failed) <= STREAMS, run.report()
    assert all("ConnectionResetError" in f or "closed" in f for f in run.http.failed), (
        run.http.failed
    )


# ---- intentions --------------------------------------------------------------------------------


def test_an_intention_change_applies_to_the_next_request(calm: FaultMesh) -> None:
    """L7: once api's sidecars have the deny (one watch round trip), the next GET is a 403;
    once they have the allow back, the next is a 200."""
    mesh = calm
    load = HttpLoad(mesh.web_api, rate=50, conns=2)
    try:
        load.wait_ok(20)
        index = put_intentions(mesh.consul, "api", "deny")
        for sid in ("api-1", "api-2"):
            wait_status(
                mesh.admins[sid],
                lambda s: s["proxy"]["intentions"]["index"] >= index,
                f"{sid} has the deny",
            )
        denied_from = load.snapshot().sent + CONNS  # requests already in flight may pass
        load.wait_ok(0)
        deadline = time.monotonic() + 30
        while load.snapshot().statuses.get(403, 0) < 20:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        after_deny = load.snapshot()
        index = put_intentions(mesh.consul, "api", "allow")
        for sid in ("api-1", "api-2"):
            wait_status(
                mesh.admins[sid],
                lambda s: s["proxy"]["intentions"]["index"] >= index,
                f"{sid} has the allow",
            )
        load.wait_ok(20)
    finally:
        figures = load.stop()
    print(f"\nL7 intention change: {figures.line()} statuses={figures.statuses}")
    assert after_deny.sent >= denied_from
    assert figures.statuses.get(403, 0) >= 20


def _stream(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"ping")
    assert s.recv(4) == b"ping"
    return s


def _closed(s: socket.socket) -> bool:
    try:
        s.sendall(b"ping")
        return s.recv(4) == b""
    except OSError:
        return True


def _echo_intention(mesh: FaultMesh, action: str) -> None:
    index = put_intentions(mesh.consul, "echo", action)
    wait_status(
        mesh.admins["echo"],
        lambda s: s["proxy"]["intentions"]["index"] >= index,
        f"echo has the {action}",
    )


def test_an_intention_change_applies_to_the_next_l4_connection(calm: FaultMesh) -> None:
    mesh = calm
    _stream(mesh.web_echo).close()
    _echo_intention(mesh, "deny")
    try:
        s = socket.create_connection(("127.0.0.1", mesh.web_echo), timeout=10)
        with s:
            assert _closed(s)
        wait_status(
            mesh.admins["echo"],
            lambda s: s["proxy"]["stats"]["connections_denied"] >= 1,
            "the denied connection counted",
        )
    finally:
        _echo_intention(mesh, "allow")


def test_revoking_an_allow_closes_open_l4_connections(calm: FaultMesh) -> None:
    mesh = calm
    streams = [_stream(mesh.web_echo) for _ in range(3)]
    try:
        _echo_intention(mesh, "deny")
        # One watch round trip has passed (echo's sidecar applied the deny); give the close
        # a moment to travel through both sidecars.
        deadline = time.monotonic() + 5
        still_open = streams
        while still_open and time.monotonic() < deadline:
            still_open = [s for s in still_open if not _closed(s)]
            time.sleep(0.2)
        assert still_open == [], f"{len(still_open)} of 3 streams still open after the deny"
    finally:
        for s in streams:
            s.close()
        _echo_intention(mesh, "allow")


def test_streams_survive_on_their_own(calm: FaultMesh) -> None:
    """The harness's own control: no fault, the same load: nothing fails."""
    mesh = calm
    run = under_load(mesh, "no fault", lambda load: None)
    _assert_clean(run.http.failed, run.http.retried, run.streams.failed)
    assert isinstance(TcpStreams, type)


def test_l4_client_close_is_released(calm: FaultMesh) -> None:
    """A client that closes its end (FIN, nothing more to say) of a connection whose server
    waits for it to finish: the server gets the EOF, and both sidecars release the relays.
    (Before: the EOF could not cross the TLS leg, and connect/l4.py held the relays, both
    sidecars' sockets and the server's connection until the 300 s idle timeout.)"""
    mesh = calm
    s = socket.create_connection(("127.0.0.1", mesh.web_echo), timeout=10)
    hello = b"a client that closes first"
    s.sendall(hello)
    assert s.recv(len(hello), socket.MSG_WAITALL) == hello
    s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        web_open = status(mesh.admins["web"])["proxy"]["connections"]
        echo_open = status(mesh.admins["echo"])["proxy"]["connections"]
        with mesh.echo.lock:
            reached = hello in mesh.echo.closed_by_client
        if reached and not any(c["open"] for c in [*web_open.values(), *echo_open.values()]):
            return
        time.sleep(0.2)
    raise AssertionError(
        f"10 s after the client closed: its EOF reached the server: {reached}; "
        f"still open: {web_open} {echo_open}"
    )
