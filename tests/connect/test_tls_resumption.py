"""TLS session resumption on sidecar-to-sidecar dials, over real sockets with devstack-issued
leaves, on asyncio and on uvloop: the second dial to an endpoint resumes, both sides still see
and check the other's certificate, and a session is never offered to another endpoint, for
another expected service, or after the client's contexts changed."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime
import gc
import logging
import random
import ssl
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import pytest

from connect.balancer import BalancerConfig, Target, compile_balancer
from connect.cluster import fixed_endpoints
from connect.dial import DialFailed, Upstream, dial_target
from connect.inbound import InboundGate
from connect.l4 import InboundL4, OutboundL4
from connect.leaf import Material
from connect.resumption import ResumingClientContext, SessionCache, offering, sessions_of
from connect.seams import Peer, PeerCache, Verdict
from connect.stats import ProxyStats
from connect.tls import DynamicTLS
from devstack.server import DevServer
from tests.connect.devstack_tls import LOOPS, dev_mesh, run
from tests.connect.proxy_test_ca import CAPeerVerifier
from tests.connect.proxy_test_servers import AppStats, start_app
from tests.connect.test_peer_refusals import _client_context, _signed, _uri


@dataclass(frozen=True)
class _Allow:
    allowed: bool = True
    reason: str = "test"


@dataclass
class Mesh:
    dev: DevServer
    api: DynamicTLS
    web: DynamicTLS
    inbound: InboundL4
    app: AppStats
    peers_seen: list[str]

    def upstream(self, expected: str = "api", key: str = "n1/api-sidecar") -> Upstream:
        target = Target(key, "127.0.0.1", self.inbound.port)
        return Upstream(
            name="api",
            endpoints=fixed_endpoints(compile_balancer([target], BalancerConfig())),
            client_ssl=self.web.client,
            verify_peer=PeerCache(CAPeerVerifier(self.web.trust_domain)),
            expected_service=expected,
            rng=random.Random(1),
        )


@contextlib.asynccontextmanager
async def mesh(per_generation: bool = False) -> AsyncIterator[Mesh]:
    """web's DynamicTLS as the client; api's behind an InboundL4 (its listener context, as
    the sidecar wires it, or each generation's own context with `per_generation`) in front
    of an echo app; every admitted peer is recorded."""
    async with dev_mesh() as dev:
        api, web = await dev.tls("api"), await dev.tls("web")
        app_server, app_port, app = await start_app()
        seen: list[str] = []

        def authorize(peer: Peer) -> Verdict:
            seen.append(peer.uri)
            return _Allow()

        gate = InboundGate(
            api.listener_context(),
            PeerCache(CAPeerVerifier(api.trust_domain)),
            ProxyStats(),
            authorize=authorize,
            current_ssl=api.server if per_generation else None,
        )
        inbound = InboundL4(gate, "127.0.0.1", app_port)
        await inbound.start()
        try:
            yield Mesh(dev.dev, api, web, inbound, app, seen)
        finally:
            await inbound.close(grace=0)
            app_server.close()
            await app_server.wait_closed()


class _Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.got = bytearray()
        self.echoed = asyncio.Event()
        self.lost = asyncio.Event()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()

    def data_received(self, data: bytes) -> None:
        self.got += data
        self.echoed.set()


async def _round_trip(upstream: Upstream, target: Target) -> bool:
    """Dial (identity checked by dial_target), echo one message through the inbound sidecar,
    close; whether the TLS session was resumed."""
    transport, client = await dial_target(upstream, target, _Client)
    reused = bool(transport.get_extra_info("ssl_object").session_reused)
    transport.write(b"ping")
    await asyncio.wait_for(client.echoed.wait(), 10)
    assert bytes(client.got) == b"ping"
    transport.close()
    await asyncio.sleep(0.01)
    return reused


def _target(m: Mesh, key: str = "n1/api-sidecar") -> Target:
    return Target(key, "127.0.0.1", m.inbound.port)


@pytest.mark.parametrize("loop", LOOPS)
def test_second_dial_resumes_and_both_sides_still_check_identity(loop: str) -> None:
    async def main() -> None:
        async with mesh() as m:
            upstream = m.upstream()
            assert isinstance(m.web.client(), ResumingClientContext)
            assert await _round_trip(upstream, _target(m)) is False
            assert await _round_trip(upstream, _target(m)) is True
            assert await _round_trip(upstream, _target(m)) is True
            # The inbound gate identified and authorized web on every connection, resumed or
            # not (OpenSSL keeps the client's certificate in the session).
            web_uri = m.web.material.leaf.service_uri
            assert m.peers_seen == [web_uri] * 3
            assert m.inbound.stats.connections == 3
            assert m.app.received == b"ping" * 3

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_resumed_dials_offer_the_full_handshakes_session_again(loop: str) -> None:
    """Taking each resumed connection's new ticket costs a copy of the session through
    OpenSSL's decoders per dial: the session of the full handshake is offered again, and the
    server resumes it every time."""

    async def main() -> None:
        async with mesh() as m:
            upstream = m.upstream()
            cache = sessions_of(m.web.client())
            assert cache is not None
            assert await _round_trip(upstream, _target(m)) is False
            offered = []
            for _ in range(3):
                assert await _round_trip(upstream, _target(m)) is True
                (kept,) = cache._kept.values()
                offered.append(kept.session)
            assert offered[0] is not None
            assert all(session is offered[0] for session in offered)
            assert cache.offered == 3

    run(loop, main)


def _count_tickets(ctx: ssl.SSLContext) -> list[int]:
    """Per handshake made with client context `ctx` from now on, the TLS 1.3
    NewSessionTicket messages it received (appended as each handshake starts)."""
    counts: list[int] = []

    kinds = ssl._TLSMessageType  # type: ignore[attr-defined]
    handshake = ssl._TLSContentType.HANDSHAKE  # type: ignore[attr-defined]

    def seen(*args: object) -> None:
        _conn, direction, _version, content_type, msg_type, _data = args
        if content_type != handshake:
            return
        if direction == "write" and msg_type == kinds.CLIENT_HELLO:
            counts.append(0)
        elif direction == "read" and msg_type == kinds.NEWSESSION_TICKET:
            counts[-1] += 1

    ctx._msg_callback = seen  # type: ignore[attr-defined]
    return counts


@pytest.mark.parametrize("loop", LOOPS)
def test_a_resumed_connection_gets_no_new_ticket(loop: str) -> None:
    """A sidecar's dialer offers the full handshake's session again and never keeps a resumed
    connection's ticket, so a ticket issued on resumption was pure cost: on the server about a
    third of a resumed handshake's CPU (OpenSSL 3.0 encodes the session, decodes it again with
    the client's certificate, and encodes it once more). The server issues one ticket per full
    handshake and none on resumption, through both of the gate's contexts; resumption then
    never outlives the full handshake's ticket (no chain of renewed tickets)."""

    async def main() -> None:
        for per_generation in (False, True):
            async with mesh(per_generation) as m:
                upstream = m.upstream()
                tickets = _count_tickets(m.web.client())
                reused = [await _round_trip(upstream, _target(m)) for _ in range(4)]
                assert reused == [False, True, True, True]
                assert tickets == [1, 0, 0, 0]
                assert m.app.received == b"ping" * 4

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_sessions_stay_with_their_endpoint_and_expected_service(loop: str) -> None:
    async def main() -> None:
        async with mesh() as m:
            api = m.upstream()
            await _round_trip(api, _target(m))
            sessions = sessions_of(m.web.client())
            assert sessions is not None and len(sessions) == 1

            # The same address under another endpoint key: no offer, a full handshake.
            offered = sessions.offered
            assert await _round_trip(api, _target(m, "n2/api-sidecar")) is False
            assert sessions.offered == offered

            # The same endpoint for a caller that expects another service: never offered,
            # and the server's identity still refuses it.
            db = m.upstream(expected="db")
            with pytest.raises(DialFailed, match="not db"):
                await dial_target(db, _target(m), _Client)
            assert sessions.offered == offered
            assert await _round_trip(api, _target(m)) is True

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_new_client_generation_starts_without_sessions(loop: str) -> None:
    async def main() -> None:
        async with mesh() as m:
            upstream = m.upstream()
            await _round_trip(upstream, _target(m))
            assert await _round_trip(upstream, _target(m)) is True
            old = m.web.client()
            # A rotation (here: the same leaf as a new generation) builds new contexts.
            current = m.web.material
            m.web.update(Material(current.leaf, current.bundle, current.generation + 1))
            assert m.web.client() is not old
            assert await _round_trip(upstream, _target(m)) is False
            assert await _round_trip(upstream, _target(m)) is True

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_rotated_client_contexts_are_freed(loop: str) -> None:
    """Each generation dials once, so its kept entry still holds the connection's SSLObject
    (no later offer took the session from it). That SSLObject refers to its context from C,
    a reference the cyclic collector cannot see: a cache hanging off the context it keeps
    alive was never freed, and a sidecar with short leaves grew by every old client context
    (OpenSSL's SSL_CTX, its roots and leaf, the kept connections' SSL objects)."""

    async def main() -> None:
        async with mesh() as m:
            upstream = m.upstream()
            old: list[weakref.ref[ssl.SSLContext]] = []
            for _ in range(5):
                old.append(weakref.ref(m.web.client()))
                transport, client = await dial_target(upstream, _target(m), _Client)
                transport.write(b"ping")
                await asyncio.wait_for(client.echoed.wait(), 10)
                transport.close()
                await asyncio.wait_for(client.lost.wait(), 10)  # the loop let go of it
                del transport, client
                _rotate(m.web)
            upstream.settle()  # the last fresh connection's SSLObject, kept until a ticket
            gc.collect()
            assert [ref() for ref in old] == [None] * 5
            # The current generation still keeps and offers its sessions.
            assert await _round_trip(upstream, _target(m)) is False
            assert await _round_trip(upstream, _target(m)) is True

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_no_resumption_when_the_upstream_turns_it_off(loop: str) -> None:
    async def main() -> None:
        async with mesh() as m:
            upstream = replace(m.upstream(), resume_tls=False)
            assert await _round_trip(upstream, _target(m)) is False
            assert await _round_trip(upstream, _target(m)) is False

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_l4_pair_resumes_between_sidecars(loop: str) -> None:
    """Through OutboundL4 -> InboundL4: every app connection dials anew; from the second on,
    the sidecars resume, and the bytes still cross."""

    async def main() -> None:
        async with mesh() as m:
            outbound = OutboundL4(m.upstream())
            await outbound.start()
            try:
                for i in range(4):
                    before = set(outbound.relays)
                    reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port)
                    writer.write(b"hello %d" % i)
                    assert await asyncio.wait_for(reader.readexactly(7), 10) == b"hello %d" % i
                    # this connection's mesh leg, dialed by the outbound sidecar (earlier
                    # relays may still be closing after their client's EOF)
                    (relay,) = outbound.relays - before
                    assert relay.b.transport is not None
                    reused = relay.b.transport.get_extra_info("ssl_object").session_reused
                    assert reused is (i > 0)
                    writer.close()
                    await writer.wait_closed()
                assert len(m.peers_seen) == 4
            finally:
                await outbound.close(grace=0)

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_an_expired_session_is_not_offered(loop: str) -> None:
    async def main() -> None:
        async with mesh() as m:
            ctx = m.web.client()
            cache = ctx._meshlet_sessions = SessionCache(max_age=0.0)  # type: ignore[attr-defined]
            upstream = m.upstream()
            assert await _round_trip(upstream, _target(m)) is False
            assert await _round_trip(upstream, _target(m)) is False
            assert cache.offered == 0

    run(loop, main)


def test_only_resuming_contexts_keep_sessions() -> None:
    assert sessions_of(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)) is None
    ctx = ResumingClientContext(ssl.PROTOCOL_TLS_CLIENT)
    cache = sessions_of(ctx)
    assert cache is not None and sessions_of(ctx) is cache
    cache.keep("k", None)  # not a TLS connection: nothing kept
    assert len(cache) == 0 and cache.offer("k") is None


def _rotate(tls: DynamicTLS) -> None:
    """A new generation of contexts (same leaf and roots), as a rotation builds."""
    current = tls.material
    tls.update(Material(current.leaf, current.bundle, current.generation + 1))


@pytest.mark.parametrize("loop", LOOPS)
def test_server_rotation_ends_resumption_only_with_per_generation_contexts(loop: str) -> None:
    """The listener context keeps its ticket keys for the process's life: a session made
    before the server's rotation still resumes. With `current_ssl`, each generation has its
    own keys: the first dial after a rotation is a full handshake (and succeeds)."""

    async def main() -> None:
        for per_generation in (False, True):
            async with mesh(per_generation) as m:
                upstream = m.upstream()
                await _round_trip(upstream, _target(m))
                assert await _round_trip(upstream, _target(m)) is True
                _rotate(m.api)
                assert await _round_trip(upstream, _target(m)) is (not per_generation)
                assert await _round_trip(upstream, _target(m)) is True
                assert m.inbound.stats.connections == 4

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_resumed_session_with_an_expired_client_leaf_is_refused(
    loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    """OpenSSL does not verify a resuming client again; the gate refuses a resumed session
    whose client leaf has expired since the full handshake."""
    caplog.set_level(logging.WARNING, logger="meshlet.proxy.inbound")

    async def main() -> None:
        async with mesh() as m:
            now = datetime.datetime.now(datetime.UTC)
            issuer = m.dev.identity.ca.active.issuer
            short = datetime.timedelta(seconds=3)
            cert, key = _signed(issuer, uri_sans=[_uri(m.dev)], ttl=short, now=now)
            ctx = _client_context(m.web.material, cert, key)
            loop_ = asyncio.get_running_loop()
            transport, client = await loop_.create_connection(
                _Client, "127.0.0.1", m.inbound.port, ssl=ctx, server_hostname=""
            )
            transport.write(b"ping")
            await asyncio.wait_for(client.echoed.wait(), 10)
            session = transport.get_extra_info("ssl_object").session
            assert session is not None and session.has_ticket
            transport.close()
            await asyncio.sleep((cert.not_valid_after_utc - now).total_seconds() + 1.5)
            with offering(ctx, session):
                transport, client = await loop_.create_connection(
                    _Client, "127.0.0.1", m.inbound.port, ssl=ctx, server_hostname=""
                )
            assert transport.get_extra_info("ssl_object").session_reused
            transport.write(b"late")
            for _ in range(500):
                if transport.is_closing() or m.inbound.stats.peers_refused:
                    break
                await asyncio.sleep(0.01)
            assert m.inbound.stats.peers_refused == 1
            assert m.inbound.stats.connections == 1
            assert m.app.received == b"ping"
            transport.close()

    run(loop, main)
    assert any("resumed TLS session" in r.getMessage() for r in caplog.records)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _malloc_in_use() -> Callable[[], int] | None:
    """glibc's bytes handed out by malloc and not yet freed (mallinfo2's uordblks): live C
    heap, whatever fragmentation does to the RSS. None without glibc 2.33's mallinfo2."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return lambda: int(fn().uordblks)


@pytest.mark.skipif(_malloc_in_use() is None, reason="needs glibc's mallinfo2")
@pytest.mark.parametrize("loop", LOOPS)
def test_keeping_sessions_does_not_grow_the_c_heap(loop: str) -> None:
    """A kept entry's session is read out of its full handshake's connection once, to be
    offered again. ssl's `session` getter leaks a copy of the session (the server's
    certificate with it) on every read in CPython 3.10 to 3.12 and 3.13.0 (gh-116810), ~6.5
    kB each: in the soak, web made a full handshake per endpoint at every leaf rotation and
    grew ~265 kB a minute, for good. Here, generation after generation dials fully, resumes,
    and is rotated away: the C heap must stay where it was."""
    in_use = _malloc_in_use()
    assert in_use is not None
    cycles = 300
    grown: list[int] = []

    async def main() -> None:
        async with mesh() as m:
            upstream = m.upstream()

            async def generation() -> None:
                assert await _round_trip(upstream, _target(m)) is False
                assert await _round_trip(upstream, _target(m)) is True
                _rotate(m.web)

            for _ in range(20):  # the allocator's and OpenSSL's first-use state settles
                await generation()
            gc.collect()
            before = in_use()
            for _ in range(cycles):
                await generation()
            upstream.settle()
            gc.collect()
            grown.append(in_use() - before)

    run(loop, main)
    # Before: +1.9 MB for 300 generations (one leaked session each). Noise is a few kB.
    assert grown[0] < cycles * 1024, f"C heap grew {grown[0]} bytes in {cycles} generations"
