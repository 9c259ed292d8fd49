"""One meshlet sidecar as a process, for the proxy benchmark (not the product's CLI).

    proxy_sidecar.py --kind http|l4 --side in|out --listen PORT --target HOST:PORT \
        --ca ca.crt --cert leaf.crt --key leaf.key [--service api] [--trust-domain TD]

`in` terminates mesh mTLS, authorizes with the intentions engine (one allow intention, so the
decision path is the real one) and forwards to the app; `out` takes plaintext and dials
`--target` with mTLS, checking the server is `--service`. Runs on uvloop with the GC frozen
after start, as `meshlet sidecar` does. Prints "ready" once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import ssl
import time
from dataclasses import dataclass

import uvloop

from connect.access_log import AccessLog, AccessLogSettings
from connect.authz import allow_all, intentions_authorizers
from connect.balancer import BalancerConfig, Policy, Target
from connect.heap_trim import keep_read_buffers_on_heap
from connect.latest import Latest
from connect.observe import Telemetry
from connect.resumption import ResumingClientContext
from connect.sidecar import InboundSpec, Sidecar, SidecarSpec, UpstreamSpec
from connect.ssl_native import no_ticket_on_resumption, send_loaded_chain_only
from connect.tls import SESSION_TICKETS
from intentions.engine import Identity, compile_snapshot
from intentions.entries import load_entry


@dataclass(frozen=True, slots=True)
class FixedTLS:
    """The sidecar's `SidecarTLS` from files: no rotation in a benchmark run."""

    server_context: ssl.SSLContext
    client_context: ssl.SSLContext
    trust_domain: str
    grace_domains: tuple[str, ...] = ()

    def listener_context(self) -> ssl.SSLContext:
        return self.server_context

    def server(self) -> ssl.SSLContext:
        return self.server_context

    def client(self) -> ssl.SSLContext:
        return self.client_context


def contexts(args: argparse.Namespace) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(args.ca)
    server.load_cert_chain(args.cert, args.key)
    server.set_alpn_protocols(["http/1.1"])
    server.num_tickets = SESSION_TICKETS  # as connect/tls.py's server contexts
    no_ticket_on_resumption(server)  # and none on a resumed connection
    # As connect/tls.py builds it: a client context that can resume TLS sessions.
    client = ResumingClientContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.check_hostname = False
    client.verify_mode = ssl.CERT_REQUIRED
    client.load_verify_locations(args.ca)
    client.load_cert_chain(args.cert, args.key)
    for ctx in (server, client):
        send_loaded_chain_only(ctx)  # as connect/tls.py does
    return server, client


def telemetry_switch(service: str = "bench", principal: str = "") -> Telemetry | None:
    """The `Sidecar` telemetry that turns metrics and access logs on, as the agent
    attaches them (connect.observe): every exchange counted in the Istio families and every
    request logged, formatted and written to /dev/null (the cost measured is the proxy's, not
    the disk's). `make bench` runs a second HTTP pair with them on."""
    telemetry = Telemetry(service, principal)
    telemetry.access_log = AccessLog(AccessLogSettings(enabled=True, type="file", path=os.devnull))
    return telemetry


async def access_log_writer(telemetry: Telemetry) -> None:
    if isinstance(telemetry.access_log, AccessLog):
        await telemetry.access_log.run()


async def _watch_loop_lag(threshold: float = 0.02) -> None:
    """Prints each time this process's loop ran a 5 ms timer `threshold` late or more, with
    the CPU the process used meanwhile: about the lag itself means the loop was busy (GC, an
    import, a long callback, a burst of handshakes); near zero means the scheduler ran
    something else."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        due = loop.time() + 0.005
        cpu = time.process_time()
        await asyncio.sleep(0.005)
        late = loop.time() - due
        if late >= threshold:
            used = time.process_time() - cpu
            print(
                f"lag {late * 1e3:.1f} ms at {due - started:.3f} s (unix {time.time():.3f}), "
                f"cpu meanwhile {used * 1e3:.1f} ms",
                flush=True,
            )


def _log_slow_gc(threshold: float = 0.005) -> None:
    """Prints each collection that took `threshold` or more."""
    began: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began.append(time.perf_counter())
        elif began:
            took = time.perf_counter() - began.pop()
            if took >= threshold:
                print(
                    f"gc gen{info['generation']} {took * 1e3:.1f} ms (unix {time.time():.3f}), "
                    f"collected {info['collected']}, tracked {len(gc.get_objects())}",
                    flush=True,
                )

    gc.callbacks.append(on_gc)


async def main(args: argparse.Namespace) -> None:
    server_ctx, client_ctx = contexts(args)
    host, port = args.target.rsplit(":", 1)
    tls = FixedTLS(server_ctx, client_ctx, args.trust_domain)
    kind = "http" if args.kind == "http" else "tcp"
    principal = f"spiffe://{args.trust_domain}/ns/default/dc/dc1/svc/{args.service}"
    telemetry = telemetry_switch(args.service, principal) if args.telemetry else None
    # The same assembly as `meshlet sidecar` (connect/sidecar.py), with one fixed endpoint.
    peer: Latest[tuple[Target, ...]] = Latest((Target("bench/peer", host, int(port)),))
    if args.side == "in":
        entry = load_entry(
            {
                "Kind": "service-intentions",
                "Name": args.service,
                "Sources": [{"Name": "web", "Action": "allow"}],
            }
        )
        snapshot = compile_snapshot([entry], default_allow=False)
        authorizers = intentions_authorizers(lambda: snapshot, Identity(args.service))
        uri = f"spiffe://{args.trust_domain}/ns/default/dc/dc1/svc/{args.service}"
        spec = SidecarSpec(
            inbound=InboundSpec(kind, "127.0.0.1", args.listen, host, int(port), uri)
        )
    else:
        authorizers = allow_all()  # outbound listeners authorize nothing
        spec = SidecarSpec(upstreams=(UpstreamSpec(args.service, kind, "127.0.0.1", args.listen),))
    sidecar = Sidecar(
        tls,
        authorizers,
        endpoints=lambda up: peer,
        targets=lambda targets: targets,
        balancer=BalancerConfig(policy=Policy.LEAST_REQUEST),
        resume_tls=not args.no_resume,
        telemetry=telemetry,
    )
    await sidecar.apply(spec)
    writer: asyncio.Task[None] | None = None
    if telemetry is not None:
        writer = asyncio.get_running_loop().create_task(access_log_writer(telemetry))
    gc.collect()
    gc.freeze()  # as agent/sidecar.py does once serving
    gc.set_threshold(10_000, 10, 10)
    if not args.mmap_reads:
        keep_read_buffers_on_heap()  # as agent/sidecar.py does
    print("ready", flush=True)
    if args.diagnose:
        _log_slow_gc()
        lag: asyncio.Task[None] | None = asyncio.get_running_loop().create_task(_watch_loop_lag())
    else:
        lag = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for task in (lag, writer):
        if task is not None:
            task.cancel()
    await sidecar.close(grace=0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=["http", "l4"], required=True)
    parser.add_argument("--side", choices=["in", "out"], required=True)
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--service", default="api")
    parser.add_argument(
        "--no-resume", action="store_true", help="full TLS handshakes on every dial (out side)"
    )
    parser.add_argument(
        "--telemetry", action="store_true", help="metrics and access logs on (telemetry_switch)"
    )
    parser.add_argument(
        "--diagnose", action="store_true", help="print loop lags over 20 ms and slow GCs"
    )
    parser.add_argument(
        "--mmap-reads",
        action="store_true",
        help="leave glibc's mmap threshold alone (before keep_read_buffers_on_heap)",
    )
    parser.add_argument("--trust-domain", default="11111111-2222-3333-4444-555555555555.consul")
    uvloop.run(main(parser.parse_args()))
