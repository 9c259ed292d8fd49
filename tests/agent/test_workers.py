"""`meshlet sidecar --workers N`: the configuration rules, the restart decisions (pure), the
control channel's messages, the port claim, and the agent's `DataPlanes` over real (tiny)
stand-in data-plane processes on its real control socket."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.config import ConfigError, parse, to_raw, with_workers
from agent.dataplanes import PARENT_ONLY_ENV, DataPlanes
from agent.runtime import AgentRuntime
from agent.supervisor import RestartPolicy, WorkerState, describe_exit, sum_counters
from connect.dataplane.process import DataPlane
from connect.dataplane.snapshot import (
    IntentionsSource,
    PushedLeaf,
    PushedMaterial,
    PushedRoots,
    Snapshot,
    decode_message,
    encode_message,
)
from connect.sidecar import SidecarSpec, claim_port


def _raw(**sidecar: Any) -> dict[str, Any]:
    return {
        "service": {"name": "web", "port": 8080},
        "sidecar": {
            "port": 21000,
            "upstreams": [{"name": "api", "local_bind_port": 9191}],
            **sidecar,
        },
    }


# ---- configuration ----------------------------------------------------------------------------


def test_one_data_plane_by_default_and_zero_is_in_process() -> None:
    assert parse(_raw(), {}).sidecar.workers == 1
    assert parse(_raw(workers=0), {}).sidecar.workers == 0  # the in-process mode


@pytest.mark.parametrize("workers", [-1, 65])
def test_workers_out_of_range_names_the_key(workers: int) -> None:
    with pytest.raises(ConfigError) as info:
        parse(_raw(workers=workers), {})
    assert [str(p) for p in info.value.problems] == [
        f"sidecar.workers: expected an integer from 0 to 64, got {workers}"
    ]


def test_workers_must_be_an_integer() -> None:
    with pytest.raises(ConfigError) as info:
        parse(_raw(workers="two"), {})
    assert "sidecar.workers: expected an integer, got 'two'" in str(info.value)


def test_every_listener_port_is_fixed_so_workers_can_share_it() -> None:
    """SO_REUSEPORT needs one known port per listener: 0 (any free port) is refused for the
    inbound port and every upstream, whatever `workers` is, with the key named."""
    raw = _raw(workers=4, port=0)
    raw["sidecar"]["upstreams"][0]["local_bind_port"] = 0
    with pytest.raises(ConfigError) as info:
        parse(raw, {})
    paths = {p.path for p in info.value.problems}
    assert paths == {"sidecar.port", "sidecar.upstreams[0].local_bind_port"}


def test_the_command_line_wins_over_the_file() -> None:
    cfg = parse(_raw(workers=2), {})
    assert with_workers(cfg, 4).sidecar.workers == 4
    assert with_workers(cfg, None) is cfg
    assert with_workers(cfg, 0).sidecar.workers == 0
    with pytest.raises(ConfigError) as info:
        with_workers(cfg, -1)
    assert str(info.value) == "--workers: expected an integer from 0 to 64, got -1"


def test_the_running_config_round_trips_to_workers() -> None:
    raw = {
        "consul": {"address": "127.0.0.1:8501", "token": "s3cr3t", "timeout": "3s"},
        "service": {
            "name": "web",
            "port": 8080,
            "tags": ["a", "b"],
            "meta": {"k": "v"},
            "check": {"http": "http://127.0.0.1:8080/h", "interval": "5s"},
        },
        "sidecar": {
            "port": 21001,
            "protocol": "http",
            "workers": 3,
            "upstreams": [
                {"name": "api", "local_bind_port": 9191, "protocol": "http", "filter": "x"},
                {"name": "db", "local_bind_port": 9192, "datacenter": "dc2"},
            ],
        },
        "certs": {"source": "vault", "vault": {"address": "http://vault:8200", "role": "r"}},
        "watch": {"wait": "1m", "retry_max": "2s"},
        "log_level": "debug",
    }
    env = {"CONSUL_HTTP_ADDR": "127.0.0.1:9500"}
    cfg = parse(raw, env)
    # Through JSON, as over the control channel.
    assert parse(json.loads(json.dumps(to_raw(cfg))), env) == cfg


def test_check_config_with_workers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "web.yaml"
    path.write_text(json.dumps(_raw()))
    assert main(["sidecar", "-c", str(path), "--workers", "3", "--check-config"]) == 0
    assert "valid (service web, 1 upstreams, 3 workers)" in capsys.readouterr().out
    assert main(["sidecar", "-c", str(path), "--workers", "65", "--check-config"]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration: --workers: expected an integer from 0 to 64, got 65" in err


def test_status_lists_the_workers_before_they_start() -> None:
    runtime = AgentRuntime(parse(_raw(), {}), sidecar=True, workers=3)
    workers = runtime.status(None)["workers"]
    assert workers["count"] == 3
    # Three data-plane processes: the agent itself runs no listener with --workers > 1.
    assert workers["mode"] == "data planes"
    assert [(w["index"], w["state"], w["pid"]) for w in workers["processes"]] == [
        (1, "pending", None),
        (2, "pending", None),
        (3, "pending", None),
    ]
    default = AgentRuntime(parse(_raw(), {}), sidecar=True).status(None)["workers"]
    assert (default["count"], default["mode"], len(default["processes"])) == (1, "data planes", 1)
    one = AgentRuntime(parse(_raw(), {}), sidecar=True, workers=0).status(None)
    assert one["workers"] == {
        "count": 1,
        "processes": [],
        "stats_total": one["proxy"]["stats"],  # one process: its own counters are the total
    }
    assert AgentRuntime(parse(_raw(), {})).status(None)["workers"] is None


# ---- pure decisions ---------------------------------------------------------------------------


def test_restart_delay_doubles_per_quick_failure_and_is_capped() -> None:
    policy = RestartPolicy(initial=0.5, maximum=30.0, stable_after=60.0)
    assert [policy.delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert policy.delay(10_000) == 30.0


def test_a_worker_that_ran_long_enough_starts_the_doubling_over() -> None:
    policy = RestartPolicy(initial=0.5, maximum=30.0, stable_after=60.0)
    assert policy.after_exit(0, ran_for=2.0) == (1, 0.5)
    assert policy.after_exit(3, ran_for=2.0) == (4, 4.0)
    assert policy.after_exit(3, ran_for=60.0) == (1, 0.5)


def test_exits_in_words() -> None:
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(1) == "exit code 1"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"


def test_a_worker_down_or_not_serving_is_a_problem_to_show() -> None:
    w = WorkerState(1)
    assert w.problem() == "worker 1 not started yet"
    w.state, w.ready, w.problems = "running", False, ("no endpoints yet for api",)
    assert w.problem() == "worker 1 not serving: no endpoints yet for api"
    w.ready = True
    assert w.problem() == ""
    w.state, w.last_exit = "restarting", "killed by SIGKILL"
    assert w.problem() == "worker 1 down (killed by SIGKILL), restarting"


def test_control_messages() -> None:
    line = encode_message(ready=True, problems=[])
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_message(line) == {"v": 1, "ready": True, "problems": []}
    for bad in (b"[1, 2]\n", b"{nope\n", b'{"v": 2, "ready": true}\n', b'{"ready": true}\n'):
        with pytest.raises(ValueError):
            decode_message(bad)


# ---- the port claim ---------------------------------------------------------------------------


async def test_a_port_held_by_a_stranger_is_not_shared() -> None:
    """With SO_REUSEPORT any process of the same user could share the port; the first process
    of the group checks first that nothing holds it."""
    with socket.socket() as stranger:
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        with pytest.raises(OSError) as info:
            await claim_port("127.0.0.1", port)
        assert f"127.0.0.1:{port} is already in use" in str(info.value)
    await claim_port("127.0.0.1", port)  # free again


# ---- the data planes over real processes ------------------------------------------------------

# A stand-in data plane: dials the agent's socket, says hello, then behaves as `mode` says.
_FAKE = r"""
import json, os, signal, socket, sys
path, index, mode, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
sock = socket.socket(socket.AF_UNIX)
sock.connect(path)
channel = sock.makefile("rwb")
def send(**message):
    channel.write(json.dumps({"v": 1, **message}).encode() + b"\n")
    channel.flush()
send(hello={"index": index, "pid": os.getpid(), "applied": 0})
open(marker, "a").write("started\n")
if mode == "crash":
    sys.exit(3)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
send(ready=True, problems=[])
send(stats={"requests": 5, "handshake_failures": {"plaintext": 1}})
for line in channel:
    message = json.loads(line)
    open(marker, "a").write(json.dumps(message) + "\n")
    if "snapshot" in message:
        send(applied=message["snapshot"]["version"])
    if message.get("stop") == "now" and mode != "stubborn":
        sys.exit(0)
"""


def _fake(mode: str, marker: Path) -> Callable[[int, Path], list[str]]:
    def command(index: int, control_socket: Path) -> list[str]:
        return [sys.executable, "-c", _FAKE, str(control_socket), str(index), mode, str(marker)]

    return command


async def _until(done: Callable[[], bool], what: str, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while not done():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)  # polling a condition; the deadline only bounds a hang


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


FAST = RestartPolicy(initial=0.01, maximum=0.05, stable_after=60.0)


async def _planes(tmp_path: Path, count: int, mode: str, env: Any = None) -> DataPlanes:
    planes = DataPlanes(
        count, tmp_path / "ctl", env or {}, policy=FAST, command=_fake(mode, tmp_path / "m")
    )
    assert await planes.open() == 0  # nothing to adopt
    return planes


def _snapshot(version: int) -> Snapshot:
    return Snapshot(
        version=version,
        service="web",
        spec=SidecarSpec(),
        material=PushedMaterial(PushedLeaf("cert", "key"), PushedRoots("roots", "td")),
        intentions=IntentionsSource(False, "test", ()),
    )


async def test_a_data_plane_that_exits_is_restarted_with_its_exit_recorded(
    tmp_path: Path,
) -> None:
    planes = await _planes(tmp_path, 1, "crash")
    task = asyncio.ensure_future(planes.run())
    w = planes.workers[0]
    await _until(lambda: w.restarts >= 3, "three restarts")
    assert w.last_exit == "exit code 3"
    assert w.consecutive_failures >= 3
    await planes.stop(timeout=10)
    await asyncio.wait_for(task, 10)
    assert w.state == "stopped"
    assert (tmp_path / "m").read_text().count("started") >= 4


async def test_stop_drains_then_stops_and_snapshots_reach_every_data_plane(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "m"
    planes = await _planes(tmp_path, 2, "serve", {"NOTIFY_SOCKET": "/run/x", "KEEP": "1"})
    assert planes._env["KEEP"] == "1" and "NOTIFY_SOCKET" not in planes._env
    assert "NOTIFY_SOCKET" in PARENT_ONLY_ENV  # systemd talks to the agent only
    assert (os.stat(tmp_path / "ctl").st_mode & 0o777) == 0o700
    assert (os.stat(planes.socket_path).st_mode & 0o777) == 0o600
    task = asyncio.ensure_future(planes.run())
    await _until(lambda: all(w.ready for w in planes.workers), "both data planes ready")
    # Ready, but serving nothing until they have a snapshot.
    assert planes.problems() == [] and not planes.serving()
    pids = [w.pid for w in planes.workers]
    assert all(pid is not None and _alive(pid) for pid in pids)
    planes.publish(_snapshot(1))
    await _until(lambda: all(p.applied == 1 for p in planes.planes.values()), "snapshot 1")
    assert planes.serving()
    planes.begin_stop()
    await _until(lambda: marker.read_text().count('"drain"') == 2, "drain reached both")
    await planes.stop(timeout=10)
    await asyncio.wait_for(task, 10)
    text = marker.read_text()
    assert text.count('"snapshot"') == 2  # one to each
    assert text.count('"now"') == 2
    assert [w.state for w in planes.workers] == ["stopped", "stopped"]
    assert [w.last_exit for w in planes.workers] == ["exit code 0", "exit code 0"]
    assert all(w.restarts == 0 for w in planes.workers)
    assert not planes.socket_path.exists()


async def test_a_data_plane_that_attaches_later_gets_the_newest_snapshot(
    tmp_path: Path,
) -> None:
    planes = await _planes(tmp_path, 1, "serve")
    planes.publish(_snapshot(1))
    planes.publish(_snapshot(2))  # before any data plane runs
    task = asyncio.ensure_future(planes.run())
    plane = planes.planes[1]
    await _until(lambda: plane.applied == 2, "snapshot 2 applied")
    assert (tmp_path / "m").read_text().count('"snapshot"') == 1  # only the newest
    await planes.stop(timeout=10)
    await asyncio.wait_for(task, 10)


async def test_a_data_plane_that_ignores_stop_is_killed(tmp_path: Path) -> None:
    planes = await _planes(tmp_path, 1, "stubborn")
    task = asyncio.ensure_future(planes.run())
    await _until(lambda: planes.workers[0].ready, "the data plane ready")
    await planes.stop(timeout=0.2)
    await asyncio.wait_for(task, 10)
    assert planes.workers[0].last_exit == "killed by SIGKILL"


async def test_cancelling_the_data_planes_leaves_none_it_started_behind(tmp_path: Path) -> None:
    planes = await _planes(tmp_path, 2, "stubborn")
    task = asyncio.ensure_future(planes.run())
    await _until(lambda: all(w.ready for w in planes.workers), "both data planes ready")
    pids = [w.pid for w in planes.workers]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await planes.close()
    for pid in pids:
        assert pid is not None
        # Killed; reaped by the event loop's child watcher once it notices.
        await _until(lambda pid=pid: not _alive(pid) or _zombie(pid), f"pid {pid} gone")


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_meshlet_status_shows_each_worker() -> None:
    from agent.status_cli import render

    runtime = AgentRuntime(parse(_raw(), {}), sidecar=True, workers=3)
    st = runtime.status(None)
    one, two, _ = st["workers"]["processes"]
    one.update(state="running", pid=101, ready=True)
    two.update(state="restarting", pid=102, restarts=2, last_exit="killed by SIGKILL")
    text = render(st, time.time())
    assert re.search(r"^worker 1 +pid 101, serving$", text, re.M)
    assert re.search(
        r"^worker 2 +pid 102, restarting, 2 restarts, last killed by SIGKILL$", text, re.M
    )


def test_a_second_stop_signal_ends_a_data_planes_drain(tmp_path: Path) -> None:
    dp = DataPlane(1, tmp_path / "dataplane.sock")
    dp.request_stop()
    assert dp._stop.is_set() and not dp._now.is_set()
    dp.request_stop()
    assert dp._now.is_set()


def test_counters_of_all_processes_add_up_key_by_key() -> None:
    parent = {"requests": 7, "handshake_failures": {"plaintext": 1, "expired": 0}}
    worker = {"requests": 5, "handshake_failures": {"plaintext": 2}, "note": "ignored"}
    assert sum_counters([parent, worker, {}]) == {
        "requests": 12,
        "handshake_failures": {"plaintext": 3, "expired": 0},
    }


async def test_a_data_planes_counters_reach_the_agent(tmp_path: Path) -> None:
    planes = await _planes(tmp_path, 1, "serve")
    task = asyncio.ensure_future(planes.run())
    w = planes.workers[0]
    await _until(lambda: bool(w.stats), "the data plane's counters")
    assert w.stats == {"requests": 5, "handshake_failures": {"plaintext": 1}}
    assert planes.status()["processes"][0]["stats"] == w.stats
    await planes.stop(timeout=10)
    await asyncio.wait_for(task, 10)
