"""Per-request cost of the HTTP sidecar pair, in one process (a quick check, not proxy_bench).

    .venv/bin/python bench/http_pair_micro.py [--requests 20000] [--connections 8] [--uvloop]

client (raw keep-alive connections, closed loop) -> OutboundHTTP -> mTLS -> InboundHTTP
(per-request intentions through the real engine) -> a raw app answering a fixed 200. The
client and the app are as cheap as asyncio allows and the same for every run, so the
difference between two runs of this command on two commits is the sidecar pair's. Prints the
process CPU time per request and requests per second (best of --rounds). Compare runs of
one sitting only: the box is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from connect.access_log import AccessLog, AccessLogSettings
from connect.authz import intentions_authorizers
from connect.balancer import BalancerConfig, Target, compile_balancer
from connect.cluster import fixed_endpoints
from connect.dial import Upstream
from connect.http1 import InboundHTTP, OutboundHTTP
from connect.inbound import InboundGate
from connect.observe import Telemetry
from connect.seams import PeerCache
from connect.stats import ProxyStats
from connect.tracing_settings import TracingSettings
from intentions.engine import Identity, compile_snapshot
from intentions.entries import load_entry
from tests.connect.proxy_test_ca import ProxyTestCA, spiffe

ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: text/plain\r\n\r\nhello"
REQUEST = b"GET /hello HTTP/1.1\r\nhost: api\r\nuser-agent: micro\r\naccept: */*\r\n\r\n"


_SINK = """
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""
"""An OTLP/HTTP collector stand-in: accepts every export."""


class App(asyncio.Protocol):
    """Answers every request head with ANSWER (requests carry no body)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        n = self.buf.count(b"\r\n\r\n")
        if n:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4 :]
            self.transport.write(ANSWER * n)


class Client(asyncio.Protocol):
    """One request at a time; a response is complete when its 5-byte body has arrived."""

    def __init__(self, left: list[int], done: asyncio.Future[None]) -> None:
        self.left = left
        self.done = done
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def send(self) -> None:
        if self.left[0] <= 0:
            if not self.done.done():
                self.done.set_result(None)
            return
        self.left[0] -= 1
        self.transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end >= 0 and len(self.buf) >= end + 4 + 5:
            if not self.buf.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"unexpected answer: {self.buf[:200]!r}")
            self.buf = self.buf[end + 9 :]
            self.send()


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    tmp = tempfile.TemporaryDirectory()
    ca = ProxyTestCA(Path(tmp.name))
    app = await loop.create_server(App, "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    intentions = compile_snapshot(
        [
            load_entry(
                {
                    "Kind": "service-intentions",
                    "Name": "api",
                    "Sources": [
                        {
                            "Name": "web",
                            "Permissions": [
                                {"Action": "deny", "HTTP": {"PathPrefix": "/private"}},
                                {"Action": "allow", "HTTP": {"PathPrefix": "/"}},
                            ],
                        }
                    ],
                }
            )
        ],
        default_allow=False,
    )
    _, authorize = intentions_authorizers(lambda: intentions, Identity("api"))
    gate = InboundGate(ca.server_context(ca.leaf("api")), PeerCache(ca.verifier()), ProxyStats())
    inbound = InboundHTTP(gate, "127.0.0.1", app_port, authorize=authorize, local_uri=spiffe("api"))
    await inbound.start()
    client_ctx = ca.client_context(ca.leaf("web"))
    upstream = Upstream(
        name="api",
        endpoints=fixed_endpoints(
            compile_balancer([Target("n0/api", "127.0.0.1", inbound.port)], BalancerConfig())
        ),
        client_ssl=lambda: client_ctx,
        verify_peer=PeerCache(ca.verifier()),
        expected_service="api",
        rng=random.Random(1),
    )
    outbound = OutboundHTTP(upstream)
    writer: asyncio.Task[None] | None = None
    if args.metrics or args.access_log or args.tracing is not None:
        # What the agent attaches (connect.observe): both sidecars count every exchange.
        telemetry = Telemetry("bench", spiffe("web"))
        inbound.observer = telemetry.http(telemetry.inbound("http"))
        outbound.observer = telemetry.http(telemetry.upstream("api", "http"))
        if args.access_log:
            # Every request logged by both sidecars, formatted and written (to /dev/null).
            access = AccessLog(AccessLogSettings(enabled=True, type="file", path=os.devnull))
            telemetry.access_log = access
            writer = loop.create_task(access.run())
        if args.tracing is not None:
            telemetry.set_tracing(TracingSettings(args.otlp_endpoint, args.tracing))
    await outbound.start()

    async def round_(total: int) -> tuple[float, float]:
        left = [total]
        done: asyncio.Future[None] = loop.create_future()
        clients = []
        for _ in range(args.connections):
            _, c = await loop.create_connection(
                lambda: Client(left, done), "127.0.0.1", outbound.port
            )
            clients.append(c)
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        for c in clients:
            c.send()
        await done
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        for c in clients:
            c.transport.close()
        return wall, cpu

    await round_(2000)  # warm-up: pooled connections, caches
    best_cpu, best_rps = float("inf"), 0.0
    for _ in range(args.rounds):
        wall, cpu = await round_(args.requests)
        best_cpu = min(best_cpu, cpu / args.requests * 1e6)
        best_rps = max(best_rps, args.requests / wall)
    observing = "metrics+access-log" if args.access_log else "metrics" if args.metrics else "off"
    if args.tracing is not None:
        observing = f"metrics+tracing({args.tracing:g}%)"
    print(
        f"requests={args.requests} connections={args.connections} rounds={args.rounds} "
        f"loop={'uvloop' if args.uvloop else 'asyncio'} observing={observing}: "
        f"best CPU {best_cpu:.1f} us/request (whole process), best {best_rps:,.0f} req/s"
    )
    if writer is not None:
        writer.cancel()
    if args.tracing is not None:
        telemetry.set_tracing(None)
    await outbound.close(grace=0)
    await inbound.close(grace=0)
    app.close()
    tmp.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument(
        "--metrics", action="store_true", help="attach the metrics observers (connect.observe)"
    )
    parser.add_argument(
        "--access-log", action="store_true", help="metrics and an access log of every request"
    )
    parser.add_argument(
        "--tracing",
        type=float,
        default=None,
        metavar="PERCENT",
        help="metrics and tracing, PERCENT %% of requests sampled, spans exported (OTLP/HTTP)",
    )
    args = parser.parse_args()
    sink: subprocess.Popen[bytes] | None = None
    if args.tracing is not None:
        # Spans are exported for real, to a collector stand-in in another process: what
        # sending them costs is counted here, what receiving them costs is not.
        sink = subprocess.Popen([sys.executable, "-c", _SINK], stdout=subprocess.PIPE)
        assert sink.stdout is not None
        args.otlp_endpoint = f"http://127.0.0.1:{int(sink.stdout.readline())}/v1/traces"
    try:
        if args.uvloop:
            import uvloop

            uvloop.run(run(args))
        else:
            asyncio.run(run(args))
    finally:
        if sink is not None:
            sink.terminate()
            sink.wait()


if __name__ == "__main__":
    main()
