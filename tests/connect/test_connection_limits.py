"""Listener admission over real sockets, on asyncio and on uvloop: beyond a listener's
`max_pending_handshakes` (connections not yet through TLS) or `max_connections`, a new
connection is reset at accept, before any TLS work, and counted by cap; once connections go,
new ones are admitted again. A client whose TLS starts in pieces (TLS begins only when its
first bytes arrive) still gets through, and a mesh client reaches the app.

The inbound listeners are the ones of test_handshake_failures (devstack's Connect CA, a leaf
from the Consul leaf API, an echo app); the plaintext upstream listener is an OutboundHTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import Callable

import pytest

from connect.balancer import BalancerConfig, compile_balancer
from connect.cluster import fixed_endpoints
from connect.dial import Upstream
from connect.heap_trim import HeapTrimmer
from connect.http1 import OutboundHTTP
from connect.listener import ConnectionLimits
from connect.seams import PeerCache
from connect.stats import ProxyStats
from tests.connect.devstack_tls import LOOPS, run
from tests.connect.proxy_test_ca import CAPeerVerifier
from tests.connect.test_handshake_failures import Site, inbound_site


async def _until(check: Callable[[], bool], what: str) -> None:
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def _raw(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def _refused(sock: socket.socket) -> bool:
    """True when the server ends the connection without sending a byte."""
    try:
        got = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 1), 10)
    except ConnectionResetError:
        return True
    finally:
        sock.close()
    return got == b""


async def _mesh_ping(site: Site) -> bytes:
    """A mesh client (the site's own leaf) through the listener: what came back (the echo
    app's b"ping" through L4, the proxy's answer to a non-HTTP request through HTTP), or b""
    when it was refused."""
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", site.listener.port, ssl=site.tls.client(), server_hostname=""
        )
    except (OSError, asyncio.IncompleteReadError):
        return b""
    try:
        writer.write(b"ping")
        return await asyncio.wait_for(reader.read(4), 10)
    except OSError:
        return b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("kind", ["l4", "http"])
def test_handshake_cap_refuses_at_accept_counts_and_recovers(kind: str, loop: str) -> None:
    async def main() -> None:
        async with inbound_site(kind) as site:
            listener, stats = site.listener, site.stats
            listener.connection_limits = ConnectionLimits(
                max_connections=50, max_pending_handshakes=4
            )
            idle = [await _raw(listener.port) for _ in range(4)]
            # Half of them start a handshake (one byte of a TLS record), half say nothing.
            for sock in idle[:2]:
                sock.send(b"\x16")
            await _until(lambda: listener.pending_handshakes == 4, "4 pending handshakes")

            extra = [await _raw(listener.port) for _ in range(3)]
            assert all([await _refused(sock) for sock in extra])
            assert await _mesh_ping(site) == b""  # full for everyone, mesh peers included
            refusals = stats.connections_refused_limit
            assert refusals.max_pending_handshakes == 4 and refusals.max_connections == 0
            # Refused before any TLS work: no handshake failed, nothing reached the app.
            assert stats.handshakes_failed == 0 and site.app.accepted == 0
            assert listener.pending_handshakes == 4

            for sock in idle:
                sock.close()
            await _until(lambda: listener.open_connections == 0, "the idle ones gone")
            assert stats.handshake_failures.closed == 4
            assert await _mesh_ping(site) == (b"ping" if kind == "l4" else b"HTTP")
            assert stats.connections == 1
            assert stats.connections_refused_limit.max_pending_handshakes == 4

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_connection_cap_counts_established_connections(loop: str) -> None:
    async def main() -> None:
        async with inbound_site("l4") as site:
            listener, stats = site.listener, site.stats
            listener.connection_limits = ConnectionLimits(
                max_connections=3, max_pending_handshakes=3
            )
            held = []
            for _ in range(2):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", listener.port, ssl=site.tls.client(), server_hostname=""
                )
                writer.write(b"hi")
                assert await asyncio.wait_for(reader.readexactly(2), 10) == b"hi"
                held.append(writer)
            idle = await _raw(listener.port)  # the third: not through TLS yet, but open
            await _until(lambda: listener.open_connections == 3, "3 open connections")

            assert await _refused(await _raw(listener.port))
            assert await _mesh_ping(site) == b""
            refusals = stats.connections_refused_limit
            assert refusals.max_connections == 2 and refusals.max_pending_handshakes == 0
            assert site.app.accepted == 2

            held.pop().close()
            idle.close()
            await _until(lambda: listener.open_connections == 1, "two connections gone")
            assert await _mesh_ping(site) == b"ping"
            for writer in held:
                writer.close()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("kind", ["l4", "http"])
def test_tls_that_starts_in_pieces_still_completes(kind: str, loop: str) -> None:
    """TLS starts on the client's first bytes, which the listener hands to the SSL protocol
    ahead of the rest: a ClientHello split after its first byte (the rest later) works."""

    async def main() -> None:
        async with inbound_site(kind) as site:
            first_sent = asyncio.Event()
            writers: list[asyncio.StreamWriter] = []

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(OSError):
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                dst.close()

            async def splitter(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                up_r, up_w = await asyncio.open_connection("127.0.0.1", site.listener.port)
                writers.extend([w, up_w])
                hello = await r.read(65536)
                up_w.write(hello[:1])
                await up_w.drain()
                # The first byte has started TLS before the rest is sent.
                handshaking = site.listener._handshaking
                await _until(lambda: any(a.started for a in handshaking), "TLS to start")
                first_sent.set()
                up_w.write(hello[1:])
                await asyncio.gather(pipe(r, up_w), pipe(up_r, w))

            relay = await asyncio.start_server(splitter, "127.0.0.1", 0)
            port = relay.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=site.tls.client(), server_hostname=""
            )
            assert first_sent.is_set()
            if kind == "l4":
                writer.write(b"ping")
                assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
            else:
                writer.write(b"GET /x HTTP/1.1\r\nHost: api\r\nContent-Length: 0\r\n\r\n")
                await _until(lambda: b"GET /x" in site.app.received, "the request at the app")
            writer.close()
            for w in [writer, *writers]:
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()
            relay.close()
            await relay.wait_closed()
            assert site.stats.handshakes_failed == 0

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_upstream_listener_caps_connections(loop: str) -> None:
    async def main() -> None:
        from tests.connect.devstack_tls import dev_mesh

        async with dev_mesh() as mesh:
            tls = await mesh.tls("web")
            stats = ProxyStats()
            upstream = Upstream(
                name="api",
                endpoints=fixed_endpoints(compile_balancer([], BalancerConfig())),
                client_ssl=tls.client,
                verify_peer=PeerCache(CAPeerVerifier(tls.trust_domain)),
                expected_service="api",
                rng=random.Random(1),
            )
            outbound = OutboundHTTP(upstream, stats=stats)
            await outbound.start(limits=ConnectionLimits(max_connections=2))
            try:
                held = [await _raw(outbound.port) for _ in range(2)]
                await _until(lambda: outbound.open_connections == 2, "2 open connections")
                assert await _refused(await _raw(outbound.port))
                refusals = stats.connections_refused_limit
                assert refusals.max_connections == 1 and refusals.max_pending_handshakes == 0
                held.pop().close()
                await _until(lambda: outbound.open_connections == 1, "one gone")
                # Admitted again: an HTTP request gets the upstream's answer (no endpoint).
                sock = await _raw(outbound.port)
                loop_ = asyncio.get_running_loop()
                await loop_.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
                answer = await asyncio.wait_for(loop_.sock_recv(sock, 100), 10)
                assert answer.startswith(b"HTTP/1.1 503"), answer
                sock.close()
                for s in held:
                    s.close()
            finally:
                await outbound.close(grace=0)

    run(loop, main)


class _Gauge:
    def __init__(self) -> None:
        self.open_connections = 0
        self.peak_connections = 0
        self.accepted_connections = 0

    def reset_peak(self) -> None:
        self.peak_connections = self.open_connections

    def churn(self, opened: int, closed: int) -> None:
        self.accepted_connections += opened
        self.open_connections += opened
        self.peak_connections = max(self.peak_connections, self.open_connections)
        self.open_connections -= closed


def test_heap_trimmer_trims_once_after_a_burst_drains_not_under_churn() -> None:
    trims: list[int] = []

    def trim() -> int:
        trims.append(1)
        return 1

    a, b = _Gauge(), _Gauge()
    trimmer = HeapTrimmer(lambda: [a, b], min_ended=100, trim=trim)
    a.churn(50, 0)
    assert not trimmer.check()  # nothing ended
    for _ in range(20):
        a.churn(10, 10)  # steady churn: many ended, the count stays near its peak
        assert not trimmer.check()
    b.churn(300, 0)
    assert not trimmer.check()  # a burst, still open
    b.churn(0, 300)
    assert trimmer.check() and len(trims) == 1  # drained
    assert not trimmer.check()  # once per burst
    # A burst that drains after a trim in its middle is trimmed again at its end.
    b.churn(200, 0)
    b.churn(0, 150)
    assert trimmer.check()
    b.churn(80, 0)
    b.churn(0, 130)  # the 50 left open at the trim count as ended too
    assert trimmer.check() and trimmer.trims == 3
