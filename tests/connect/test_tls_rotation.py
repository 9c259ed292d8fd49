"""mTLS over real sockets with devstack's leaves, from Consul or Vault: the handshake, leaves
renewed every few seconds under load, and a root rotation mid-stream, with zero failed requests."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import pytest
from cryptography import x509

from connect.identity import ServiceIdentity
from connect.renewal import Health
from devstack.server import DevServer
from tests.conftest import Http
from tests.connect.identity_support import Conn, EchoService, Running, Start

SOURCES = ["consul", "vault"]


def _issuer_of_peer(conn: Conn) -> str:
    der = conn.ssl_object().getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).issuer.rfc4514_string()


@pytest.mark.parametrize("kind", SOURCES)
async def test_tls13_between_devstack_leaves(start_rotator: Start, kind: str) -> None:
    server, client = await start_rotator(kind, "api"), await start_rotator(kind, "web")
    assert server.tls.material.leaf.source == kind
    async with EchoService(server.tls) as svc:
        conn = await Conn.open(svc.port, client.tls.client())
        try:
            assert conn.ssl_object().version() == "TLSv1.3"
            await conn.request()
            ident = client.tls.peer(conn.ssl_object())
            assert isinstance(ident, ServiceIdentity) and ident.service == "api"
            assert ident.trust_domain == client.tls.trust_domain
        finally:
            await conn.close()
    assert [p.uri for p in svc.peers] == [client.tls.material.leaf.service_uri]
    assert isinstance(svc.peers[0], ServiceIdentity) and svc.peers[0].service == "web"


async def _pump(conn: Conn, stop: asyncio.Event, tally: dict[str, int]) -> None:
    while not stop.is_set():
        try:
            await conn.request()
            tally["ok"] += 1
        except (OSError, ConnectionError, asyncio.IncompleteReadError) as err:
            tally["failed"] += 1
            tally.setdefault("errors", []).append(repr(err))  # type: ignore[attr-defined]
            return


async def _until_renewed(run: Running, times: int) -> None:
    while run.rotator.renewals < times:
        await run.rotator.changed(run.rotator.current.generation)  # type: ignore[union-attr]


async def _stream(
    server: Running,
    client: Running,
    svc: EchoService,
    until: asyncio.Future[None],
    handshakes: list[tuple[str, str]],
) -> dict[str, int]:
    """Kept-alive connections pump requests while, at every new client generation, a fresh
    connection is made; returns the tally once `until` completes."""
    stop = asyncio.Event()
    tally = {"ok": 0, "failed": 0}
    conns = [await Conn.open(svc.port, client.tls.client()) for _ in range(4)]
    pumps = [asyncio.create_task(_pump(c, stop, tally)) for c in conns]

    async def fresh_handshakes() -> None:
        gen = client.tls.material.generation
        while True:
            material = await client.rotator.changed(gen)
            gen = material.generation
            conn = await Conn.open(svc.port, client.tls.client())
            try:
                serial = (await conn.request()).decode()
                handshakes.append((serial, _issuer_of_peer(conn)))
                tally["ok"] += 1
            except (OSError, ConnectionError) as err:
                tally["failed"] += 1
                tally.setdefault("errors", []).append(repr(err))  # type: ignore[attr-defined]
            finally:
                await conn.close()

    fresh = asyncio.create_task(fresh_handshakes())
    try:
        await asyncio.wait_for(until, 45)
    finally:
        stop.set()
        fresh.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await fresh
        await asyncio.gather(*pumps)
        for c in conns:
            await c.close()
    return tally


@pytest.mark.parametrize("kind", SOURCES)
async def test_five_second_leaves_renew_under_load_with_zero_failures(
    start_rotator: Start, kind: str
) -> None:
    server, client = await start_rotator(kind, "api"), await start_rotator(kind, "web")
    first_server_serial = server.tls.material.leaf.serial
    handshakes: list[tuple[str, str]] = []
    async with EchoService(server.tls) as svc:
        until = asyncio.ensure_future(
            asyncio.gather(_until_renewed(server, 3), _until_renewed(client, 3))
        )
        tally = await _stream(server, client, svc, until, handshakes)  # type: ignore[arg-type]
    assert tally["failed"] == 0, tally
    assert tally["ok"] > 0
    # Every leaf was replaced before it expired, and new handshakes saw newer server leaves.
    for run in (server, client):
        leaves = [m.leaf for m in run.generations]
        assert len({leaf.serial for leaf in leaves}) >= 4
        for older, newer in itertools.pairwise(leaves):
            if older.serial != newer.serial:
                assert newer.valid_after < older.valid_before
        assert run.rotator.health() is Health.HEALTHY
    assert any(serial != first_server_serial for serial, _ in handshakes)


@pytest.mark.parametrize("kind", SOURCES)
async def test_root_rotation_mid_stream_with_zero_failures(
    start_rotator: Start, ca_dev: DevServer, ca_http: Http, kind: str
) -> None:
    server, client = await start_rotator(kind, "api"), await start_rotator(kind, "web")
    old_root = ca_dev.identity.ca.active.issuer.cert.subject.rfc4514_string()
    handshakes: list[tuple[str, str]] = []

    async def rotate_then_settle() -> None:
        # Mid-stream: the pumps are running once the client has made a request or two.
        await asyncio.sleep(0)
        status, body, _ = await ca_http.put(
            "/v1/connect/ca/configuration",
            json={"Provider": kind, "Config": {"LeafCertTTL": "5s", "PrivateKeyBits": 384}},
        )
        assert status == 200, body
        new_root = ca_dev.identity.ca.active.issuer.cert.subject.rfc4514_string()
        assert new_root != old_root
        for run in (server, client):
            while not (
                run.rotator.current is not None
                and run.rotator.current.leaf.issuer == new_root
                and run.rotator.current.bundle.active_subject == new_root
            ):
                await run.rotator.changed(run.rotator.current.generation)  # type: ignore[union-attr]
        # One more client generation, so a fresh handshake runs entirely on the new chain.
        await client.rotator.changed(client.rotator.current.generation)  # type: ignore[union-attr]

    async with EchoService(server.tls) as svc:
        until = asyncio.ensure_future(rotate_then_settle())
        tally = await _stream(server, client, svc, until, handshakes)
        # A new handshake now runs on the new chain end to end.
        conn = await Conn.open(svc.port, client.tls.client())
        try:
            serial = (await conn.request()).decode()
            issuer = _issuer_of_peer(conn)
        finally:
            await conn.close()
    assert tally["failed"] == 0, tally
    new_root = ca_dev.identity.ca.active.issuer.cert.subject.rfc4514_string()
    assert issuer == new_root
    # The server may renew its 5-second leaf again between that handshake and this line, so
    # the served leaf is one of its new-chain generations, not necessarily the latest.
    assert serial in {m.leaf.serial for m in server.generations if m.leaf.issuer == new_root}
    assert svc.peers[-1].uri == client.tls.material.leaf.service_uri
    roots = ca_dev.identity.ca.roots_json()["Roots"]
    assert [r["Active"] for r in roots] == [False, True]
