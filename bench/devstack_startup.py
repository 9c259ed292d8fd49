"""Time from spawning `meshlet dev` to `GET /v1/status/leader` answering a leader.

    .venv/bin/python bench/devstack_startup.py [--runs 5]

Prints each run and the median. Loopback only; every run stops its server.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

MESHLET = shutil.which("meshlet", path=str(Path(sys.executable).parent)) or "meshlet"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def spawn_to_ready(deadline: float = 10.0) -> float:
    port = free_port()
    started = time.monotonic()
    proc = subprocess.Popen(
        [MESHLET, "dev", "--http-addr", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while time.monotonic() - started < deadline:
            try:
                url = f"http://127.0.0.1:{port}/v1/status/leader"
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.read().strip(b'"\n '):
                        return time.monotonic() - started
            except OSError:
                time.sleep(0.005)  # polling a process we do not control: nothing to wait on
        raise TimeoutError(f"meshlet dev not ready within {deadline}s")
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    times = [spawn_to_ready() for _ in range(args.runs)]
    print("spawn-to-ready (s):", " ".join(f"{t:.3f}" for t in times))
    print(f"median {statistics.median(times):.3f} s over {args.runs} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
