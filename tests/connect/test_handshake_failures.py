"""Failed inbound TLS handshakes over real sockets, on asyncio and on uvloop: each bad client
(no certificate, a certificate from another CA, an expired one, plaintext) is refused before
the app is dialed, counted under its reason, and logged once per peer with that reason.

The server's leaf comes from devstack's Connect CA through the Consul leaf API; the expired
client leaf is signed by the same CA, the foreign one by another root. Each scenario starts
its own devstack inside the loop it runs on (pytest-asyncio runs only the stdlib loop here).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any

import pytest

from connect.authz import allow_all
from connect.http1 import InboundHTTP
from connect.inbound import InboundGate
from connect.l4 import InboundL4
from connect.listener import ListeningSocket
from connect.seams import PeerCache
from connect.stats import ProxyStats
from connect.tls import DynamicTLS
from devstack.issuer import new_root
from devstack.server import DevServer
from tests.connect.devstack_tls import LOOPS, dev_mesh, run
from tests.connect.proxy_test_ca import CAPeerVerifier
from tests.connect.proxy_test_servers import AppStats, start_app
from tests.connect.test_peer_refusals import _client_context, _signed, _uri, bad_certificate

NOW = datetime.datetime.now(datetime.UTC)
HOUR = datetime.timedelta(hours=1)
LOGGER = "meshlet.proxy.inbound"


@dataclass
class Site:
    tls: DynamicTLS
    dev: DevServer
    gate: InboundGate
    listener: ListeningSocket
    app: AppStats

    @property
    def stats(self) -> ProxyStats:
        return self.gate.stats


@contextlib.asynccontextmanager
async def inbound_site(kind: str, handshake_timeout: float = 10.0) -> AsyncIterator[Site]:
    """devstack, api's leaf from its Consul leaf API, and an inbound listener (L4 or HTTP)
    in front of an echo app."""
    async with dev_mesh() as mesh:
        dev = mesh.dev
        app_server, app_port, app = await start_app()
        try:
            tls = await mesh.tls("api")
            gate = InboundGate(
                tls.listener_context(),
                PeerCache(CAPeerVerifier(tls.trust_domain)),
                ProxyStats(),
                authorize=allow_all()[0] if kind == "l4" else None,
                handshake_timeout=handshake_timeout,
            )
            listener: InboundL4 | InboundHTTP
            if kind == "l4":
                listener = InboundL4(gate, "127.0.0.1", app_port)
            else:
                listener = InboundHTTP(
                    gate,
                    "127.0.0.1",
                    app_port,
                    authorize=allow_all()[1],
                    local_uri=tls.material.leaf.service_uri,
                )
            await listener.start()
            try:
                yield Site(tls, dev, gate, listener, app)
            finally:
                await listener.close(grace=0)
        finally:
            app_server.close()
            await app_server.wait_closed()


def _no_certificate(site: Site) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=site.tls.material.bundle.pem)
    return ctx


def _other_ca(site: Site) -> ssl.SSLContext:
    # A leaf naming our trust domain, from a root we do not trust (the client trusts ours).
    foreign = new_root("other-mesh", ttl=HOUR, now=NOW)
    cert, key = _signed(foreign, uri_sans=[_uri(site.dev)], ttl=HOUR, now=NOW)
    return _client_context(site.tls.material, cert, key)


def _expired(site: Site) -> ssl.SSLContext:
    cert, key = bad_certificate("expired", site.dev)  # signed by the mesh's own CA
    return _client_context(site.tls.material, cert, key)


CLIENTS: dict[str, tuple[Callable[[Site], ssl.SSLContext] | None, str]] = {
    "no_certificate": (_no_certificate, "no client certificate"),
    "unknown_ca": (_other_ca, "unable to get local issuer certificate"),
    "expired": (_expired, "certificate has expired"),
    "plaintext": (None, "not TLS (http request)"),
}


async def _attempt(port: int, ctx: ssl.SSLContext | None) -> bytes:
    """Connect (TLS with `ctx`, or plaintext HTTP) and send a request; what came back."""
    request = b"GET / HTTP/1.1\r\nHost: api\r\n\r\n"
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="" if ctx else None
        )
    except (ssl.SSLError, ConnectionError):
        return b""  # refused during the client's side of the handshake
    try:
        # TLS 1.3: the client may finish before the server has checked its certificate;
        # the refusal is then the connection closing (or an alert) on the first read.
        writer.write(request)
        return await asyncio.wait_for(reader.read(), 10)
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, OSError):
            await writer.wait_closed()


async def _until(check: Callable[[], bool], what: str) -> None:
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _lines(caplog: pytest.LogCaptureFixture, kind: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and "handshake" in r.getMessage() and f"({kind})" in r.getMessage()
    ]


async def _refused_counted_logged_once(
    site: Site, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    make_ctx, detail = CLIENTS[kind]
    counts = site.stats.handshake_failures
    for n in (1, 2):
        ctx = make_ctx(site) if make_ctx is not None else None
        assert await _attempt(site.listener.port, ctx) == b""
        await _until(lambda n=n: getattr(counts, kind) == n, f"{kind} counted {n}")  # type: ignore[misc]
        assert site.stats.handshakes_failed == n
    other = {k: v for k, v in asdict(counts).items() if k != kind}
    assert set(other.values()) == {0}, other
    assert site.app.accepted == 0 and site.stats.connections == 0
    lines = _lines(caplog, kind)
    assert len(lines) == 1, lines  # once per peer and reason, not per connection
    assert "from 127.0.0.1:" in lines[0] and detail in lines[0], lines[0]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("listener", ["l4", "http"])
@pytest.mark.parametrize("kind", sorted(CLIENTS))
def test_bad_client_refused_counted_logged_once(
    kind: str, listener: str, loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)

    async def main() -> None:
        async with inbound_site(listener) as site:
            await _refused_counted_logged_once(site, kind, caplog)

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_mesh_client_passes_and_bytes_behind_its_finished_arrive(
    loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A mesh leaf still gets in (its identity read from the TLS transport handed over after
    the handshake), and bytes the client writes at once reach the app."""
    caplog.set_level(logging.WARNING, logger=LOGGER)

    async def main() -> None:
        async with inbound_site("l4") as site:
            # The server's own leaf is a valid mesh client certificate here (same CA and
            # trust domain, a service identity; the gate allows everyone).
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", site.listener.port, ssl=site.tls.client(), server_hostname=""
            )
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
            writer.close()
            assert site.stats.connections == 1 and site.stats.handshakes_failed == 0
            assert site.app.accepted == 1

    run(loop, main)
    assert not [r for r in caplog.records if r.name == LOGGER]


@pytest.mark.parametrize("loop", LOOPS)
def test_stalled_handshake_times_out_and_close_ends_pending_ones(
    loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)

    async def main() -> None:
        async with inbound_site("l4", handshake_timeout=0.2) as site:
            reader, writer = await asyncio.open_connection("127.0.0.1", site.listener.port)
            assert await asyncio.wait_for(reader.read(), 10) == b""  # silent: cut at 0.2 s
            writer.close()
            await _until(lambda: site.stats.handshake_failures.timeout == 1, "the timeout")
            assert len(_lines(caplog, "timeout")) == 1

            # A handshake in progress when the listener closes ends with it, uncounted.
            reader, writer = await asyncio.open_connection("127.0.0.1", site.listener.port)
            await _until(lambda: bool(site.listener._handshaking), "the handshake to start")
            await site.listener.close(grace=0)  # type: ignore[attr-defined]
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            await asyncio.sleep(0.05)
            assert site.stats.handshakes_failed == 1

    run(loop, main)


def test_stats_serialize_with_reasons() -> None:
    stats = ProxyStats()
    stats.handshake_failures.unknown_ca += 1
    out: dict[str, Any] = asdict(stats)
    assert out["handshake_failures"]["unknown_ca"] == 1
    assert out["handshakes_failed"] == 0


class _GoneTransport(asyncio.Transport):
    """What the listener hands over when the client closed right after its handshake: the
    transport is closing and has no TLS object any more."""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return True


def test_a_client_gone_before_admission_is_not_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)

    def never(der: bytes, /) -> Any:
        raise AssertionError("no certificate to verify")

    stats = ProxyStats()
    gate = InboundGate(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), PeerCache(never), stats)
    assert gate.admit(_GoneTransport()) is None
    assert stats.peers_refused == 0 and stats.connections == 0
    assert not caplog.records
