"""agent.dataplanes: the control directory is the instance's alone, and a surviving data
plane is recognised only by a live process running that very command."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from agent.dataplanes import ControlDirError, dataplane_command, private_dir, survivor
from connect.dataplane.process import status_path


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
