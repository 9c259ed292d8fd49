"""`meshlet sidecar`'s memory around bursts of unauthenticated connections to its inbound port.

    .venv/bin/python bench/sidecar_conn_burst.py [--connections 2000] [--rounds 2]
        [--first-byte] [--max-connections N] [--max-pending-handshakes N]

Starts `meshlet dev`, an HTTP app and `meshlet sidecar` for it (tcp), then per round opens
`--connections` raw TCP connections to the inbound port (sending the first byte of a TLS
record on each with `--first-byte`, so their handshakes start), holds them 3 s, closes them,
waits 3 s, and prints the sidecar's VmRSS (/proc/PID/status) before, at the peak and after,
with the refusal and handshake-failure counters from /v1/status. The limits default to the
sidecar's own; give larger ones to admit the whole burst. Figures are printed, not asserted.
Everything listens on 127.0.0.1 and ends with the script.
"""

from __future__ import annotations

import argparse
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.test_agent_process import ENV, Proc, _free_port, start_dev
from tests.integration.test_sidecar_mesh import (
    _drain,
    start_app,
    status,
    wait_status,
    write_sidecar_config,
)


def vm_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--first-byte", action="store_true")
    ap.add_argument("--max-connections", type=int, default=0)
    ap.add_argument("--max-pending-handshakes", type=int, default=0)
    args = ap.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.connections * 2 + 256
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    tmp = Path(tempfile.mkdtemp())
    port = _free_port()
    dev = start_dev(port)
    app = start_app("api")
    admin = f"127.0.0.1:{_free_port()}"
    public = _free_port()
    cfg = tmp / "api.yaml"
    write_sidecar_config(
        cfg,
        consul=f"127.0.0.1:{port}",
        service="api",
        app_port=app.server_address[1],
        sidecar_port=public,
        admin=admin,
        protocol="tcp",
    )
    limits = "".join(
        f"  {key}: {value}\n"
        for key, value in (
            ("max_connections", args.max_connections),
            ("max_pending_handshakes", args.max_pending_handshakes),
        )
        if value
    )
    cfg.write_text(cfg.read_text().replace("sidecar:\n", "sidecar:\n" + limits, 1))
    sidecar = Proc(["sidecar", "-c", str(cfg)], env=ENV)
    try:
        sidecar.wait_for_line("ready:")
        _drain(sidecar)
        wait_status(admin, lambda s: s["sidecar"]["ready"], "the sidecar ready")
        pid = sidecar.p.pid
        time.sleep(1.0)
        print(f"before: {vm_rss_mb(pid):.1f} MB VmRSS (pid {pid}), {args.connections} per round")
        for r in range(1, args.rounds + 1):
            socks = []
            for _ in range(args.connections):
                sock = socket.socket()
                try:
                    sock.connect(("127.0.0.1", public))
                    if args.first_byte:
                        sock.send(b"\x16")
                except ConnectionResetError:
                    pass  # refused at accept
                socks.append(sock)
            time.sleep(3.0)
            peak = vm_rss_mb(pid)
            for sock in socks:
                sock.close()
            time.sleep(3.0)
            proxy = status(admin)["proxy"]
            stats = proxy["stats"]
            print(
                f"round {r}: peak {peak:.1f} MB, after close {vm_rss_mb(pid):.1f} MB; "
                f"refused {stats.get('connections_refused_limit')}, "
                f"handshakes failed {stats['handshakes_failed']}, "
                f"heap trims {proxy.get('heap_trims')}"
            )
    finally:
        sidecar.stop()
        dev.stop()
        app.shutdown()
        app.server_close()


if __name__ == "__main__":
    main()
