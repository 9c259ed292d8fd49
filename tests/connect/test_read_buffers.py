"""TLS reads through the real L4 pair on uvloop map no new memory per read once the sidecar has
called `keep_read_buffers_on_heap` (connect.heap_trim).

glibc's mmap threshold is process state: it starts at 128 KiB and rises after some frees
(which ones a process happens to make decides whether its TLS reads map memory: in `make
bench` the server sidecar did in 4 runs of 6). So each run is a fresh interpreter that first
pins the threshold at its starting value, the state in which every read mapped a buffer. What
is counted is minor page faults per round trip (getrusage): a new mapping faults its pages in,
a reused heap chunk does not. A count, not a time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import asyncio, ctypes, json, resource, sys
from pathlib import Path
import uvloop
from connect.heap_trim import keep_read_buffers_on_heap
from tests.connect import test_l4_relay as scenarios
from tests.connect.proxy_test_ca import ProxyTestCA

async def main(tuned: bool, tmp: str) -> None:
    ctypes.CDLL(None).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD at glibc's initial value
    tuned_ok = keep_read_buffers_on_heap() if tuned else None
    pair, servers = await scenarios.build_pair(ProxyTestCA(Path(tmp)))
    reader, writer = await pair.connect()
    msg = b"x" * 200
    for _ in range(50):  # handshakes, pools and first allocations out of the way
        writer.write(msg)
        await reader.readexactly(len(msg))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    n = 1000
    for _ in range(n):  # each: two TLS reads in the sidecars (request, reply)
        writer.write(msg)
        assert await reader.readexactly(len(msg)) == msg
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    writer.close()
    await scenarios.close_all(pair, servers)
    print(json.dumps({"faults_per_round_trip": faults / n, "tuned": tuned_ok}))

uvloop.run(main(sys.argv[1] == "tuned", sys.argv[2]))
"""


def _run(mode: str, tmp: Path) -> dict[str, Any]:
    tmp.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, str(tmp)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_tls_reads_reuse_heap_once_tuned(tmp_path: Path) -> None:
    tuned = _run("tuned", tmp_path / "tuned")
    assert tuned["tuned"] is True
    # Before the fix: 4 faults per round trip (a fresh 256 KiB mapping per TLS read).
    assert tuned["faults_per_round_trip"] < 0.5


def test_untuned_process_maps_a_buffer_per_read(tmp_path: Path) -> None:
    """The control: without the call the same traffic faults on every read, so the test
    above measures the mechanism it claims to (if glibc stops doing this, drop both)."""
    untuned = _run("default", tmp_path / "default")
    assert untuned["faults_per_round_trip"] >= 1.0
