"""agent.dataplanes: the control directory is the instance's alone, a surviving data plane
is recognised only by a live process running that very command, and a new upstream's port
waits (bounded) for its first endpoints."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from agent.dataplanes import (
    ControlDirError,
    DataPlanes,
    control_dir,
    dataplane_command,
    hold_unanswered,
    private_dir,
    survivor,
)
from connect.dataplane.process import status_path
from connect.dataplane.snapshot import (
    IntentionsSource,
    PushedLeaf,
    PushedMaterial,
    PushedRoots,
    Snapshot,
    UpstreamEndpoints,
)
from connect.sidecar import SidecarSpec, UpstreamSpec


def test_the_control_directory_is_created_private(tmp_path: Path) -> None:
    path = tmp_path / "meshlet" / "sidecar-web-1"
    private_dir(path)
    assert (os.stat(path).st_mode & 0o777) == 0o700
    private_dir(path)  # again: already there and private


def test_a_directory_open_to_others_or_a_symlink_is_refused(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    with pytest.raises(ControlDirError, match="open to others"):
        private_dir(open_dir)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ControlDirError, match="not a directory"):
        private_dir(link)


def test_a_survivor_is_a_live_process_running_the_data_plane_command(tmp_path: Path) -> None:
    sock = tmp_path / "dataplane.sock"
    status = status_path(sock, 1)
    assert survivor(sock, 1) is None  # no status file
    # A status file naming a process that runs something else (a recycled pid): not ours.
    status.write_text(f'{{"pid": {os.getpid()}}}')
    assert survivor(sock, 1) is None
    # A real data plane with no agent to dial: it writes its status file and waits.
    status.unlink()
    proc = subprocess.Popen(dataplane_command(1, sock), stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30  # only catches a hang
        while not status.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        assert survivor(sock, 1) == proc.pid
        assert survivor(sock, 2) is None  # another index's file: none
        assert survivor(tmp_path / "other.sock", 1) is None
    finally:
        proc.kill()
        proc.wait()
    assert survivor(sock, 1) is None  # its file is left, but the process is gone


def _snapshot(*ups: tuple[str, int, bool]) -> Snapshot:
    return Snapshot(
        version=1,
        service="web",
        spec=SidecarSpec(
            upstreams=tuple(UpstreamSpec(name, "tcp", "127.0.0.1", port) for name, port, _ in ups)
        ),
        material=PushedMaterial(PushedLeaf("c", "k"), PushedRoots("r", "td")),
        intentions=IntentionsSource(True, "test", ()),
        endpoints=tuple(
            UpstreamEndpoints(name, targets=() if answered else None) for name, _, answered in ups
        ),
    )


def test_a_new_upstream_waits_for_its_first_answer_for_a_bounded_time() -> None:
    snap = _snapshot(("api", 9001, True), ("db", 9002, False), ("old", 9003, False))
    serving = {"127.0.0.1:9003"}  # already served: never taken away
    got, held = hold_unanswered(snap, serving, {}, now=100.0, wait=10.0)
    assert [u.name for u in got.spec.upstreams] == ["api", "old"]
    assert held == {"127.0.0.1:9002": 100.0}
    got, held = hold_unanswered(snap, serving, held, now=105.0, wait=10.0)
    assert [u.name for u in got.spec.upstreams] == ["api", "old"]
    assert held == {"127.0.0.1:9002": 100.0}  # held since the first time
    got, held = hold_unanswered(snap, serving, held, now=110.0, wait=10.0)
    assert [u.name for u in got.spec.upstreams] == ["api", "db", "old"]  # opened anyway
    assert held == {}
    answered = _snapshot(("db", 9002, True))
    assert hold_unanswered(answered, set(), {}, now=0.0, wait=10.0) == (answered, {})


async def test_a_survivor_beyond_the_new_count_is_stopped_and_the_others_adopted() -> None:
    """An agent started again with fewer data planes (--workers lowered) adopts the ones it
    still wants and stops the others (SIGTERM: they drain and exit)."""
    directory = Path(tempfile.mkdtemp(prefix="dpa-"))  # a unix socket path must stay short
    private_dir(directory)
    sock = directory / "dataplane.sock"
    procs = {
        i: await asyncio.create_subprocess_exec(
            *dataplane_command(i, sock), stdin=asyncio.subprocess.DEVNULL
        )
        for i in (1, 3)
    }
    try:
        deadline = time.monotonic() + 30  # only catches a hang
        while not all(status_path(sock, i).exists() for i in procs):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        planes = DataPlanes(2, directory, {})
        assert await planes.open() == 1
        assert planes.status()["processes"][0]["adopted"] is True
        assert planes.status()["processes"][1]["adopted"] is False
        assert await asyncio.wait_for(procs[3].wait(), 30) == 0  # drained, exited
        assert procs[1].returncode is None  # adopted: still running
        await planes.close()
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


def test_serving_means_the_newest_snapshot_or_the_previous_one_for_a_moment(
    tmp_path: Path,
) -> None:
    now = [1000.0]
    planes = DataPlanes(1, tmp_path / "c", {}, clock=lambda: now[0])
    plane = planes.planes[1]
    plane.state.state, plane.state.ready = "running", True
    assert not planes.serving()  # nothing published yet (an adopted plane's old one either)
    plane.applied = 3
    assert not planes.serving()
    planes.publish(_snapshot(("api", 9001, True)))  # version 1
    assert planes.version == 1
    assert planes.serving()  # its earlier snapshot counts while the new one is on its way
    now[0] += 6
    assert not planes.serving()  # stuck behind: not serving what the agent holds
    plane.applied = 1
    assert planes.serving()
    planes.publish(dataclasses.replace(_snapshot(("api", 9001, True)), version=2))
    assert planes.serving()
    plane.refused = "bad leaf"
    assert not planes.serving()  # refused the newest: fails closed at once


def test_a_long_service_id_still_gives_a_socket_path_that_binds() -> None:
    """Nomad's service IDs are about 70 characters: the readable directory name would make
    the socket's path longer than a unix socket allows (the agent failed to start)."""
    from agent.config import parse

    nomad_id = "_nomad-task-8f14e45f-ceea-467a-9c1e-5a1b2c3d4e5f-group-api-api-38881"
    raw = {
        "service": {"name": "api", "id": nomad_id, "port": 8080},
        "sidecar": {"port": 21000},
    }
    runtime = tempfile.mkdtemp(prefix="ml-")  # short, as $XDG_RUNTIME_DIR (/run/user/UID)
    try:
        env = {"XDG_RUNTIME_DIR": runtime}
        path = control_dir(parse(raw, {}), env)
        assert path == control_dir(parse(raw, {}), env)  # the same for the next agent
        assert nomad_id not in str(path) and str(path).endswith("-21000")
        private_dir(path)
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path / "dataplane.sock"))
        short = control_dir(parse({**raw, "service": {"name": "api", "port": 8080}}, {}), env)
        assert short.name == "sidecar-api-21000"  # readable when it fits
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
