"""connect.sidecar: the listener plan between two specs (pure), and `Sidecar.apply` on real
sockets with real mesh TLS from devstack: web's upstream listeners added, removed and
replaced in front of api's inbound L4 listener and an echo app, with a held connection."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from agent.consul import ConsulClient, Indexed
from agent.watches import BlockingWatch, WatchSettings
from connect.authz import allow_all
from connect.balancer import Target
from connect.latest import Latest
from connect.sidecar import InboundSpec, Sidecar, SidecarSpec, UpstreamSpec, plan
from tests.connect.devstack_tls import dev_mesh
from tests.connect.proxy_test_servers import AppStats, start_app

DEADLINE = 10.0

INBOUND = InboundSpec("http", "127.0.0.1", 21000, "127.0.0.1", 8080, "spiffe://td/svc/web")
A_TCP = UpstreamSpec("a", "tcp", "127.0.0.1", 9191)
A_HTTP = UpstreamSpec("a", "http", "127.0.0.1", 9191)
B_TCP = UpstreamSpec("b", "tcp", "127.0.0.1", 9192)


def test_plan_touches_only_what_changed() -> None:
    old = SidecarSpec(INBOUND, (A_TCP,))
    assert plan(old, old).empty
    assert plan(old, SidecarSpec(INBOUND, (A_TCP,), drain_grace=1.0)).empty

    added = plan(old, SidecarSpec(INBOUND, (A_TCP, B_TCP)))
    assert (added.start, added.stop, added.replace) == ((B_TCP,), (), ())
    assert added.keep == (INBOUND, A_TCP)

    removed = plan(SidecarSpec(INBOUND, (A_TCP, B_TCP)), old)
    assert (removed.start, removed.stop, removed.replace) == ((), (B_TCP,), ())

    protocol = plan(old, SidecarSpec(INBOUND, (A_HTTP,)))
    assert protocol.replace == ((A_TCP, A_HTTP),)
    assert protocol.describe() == (
        "replace upstream a 127.0.0.1:9191 (tcp) with upstream a 127.0.0.1:9191 (http)"
    )

    # Another destination on the same port, or the same upstream on another port.
    other = UpstreamSpec("c", "tcp", "127.0.0.1", 9191)
    assert plan(old, SidecarSpec(INBOUND, (other,))).replace == ((A_TCP, other),)
    moved = UpstreamSpec("a", "tcp", "127.0.0.1", 9193)
    got = plan(old, SidecarSpec(INBOUND, (moved,)))
    assert (got.start, got.stop) == ((moved,), (A_TCP,))

    inbound_http = plan(old, SidecarSpec(InboundSpec("tcp", *_inbound_rest()), (A_TCP,)))
    assert [o.protocol for o, _ in inbound_http.replace] == ["http"]


def _inbound_rest() -> tuple[str, int, str, int, str]:
    return ("127.0.0.1", 21000, "127.0.0.1", 8080, "spiffe://td/svc/web")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Mesh:
    web: Sidecar[tuple[Target, ...]]
    app: AppStats
    clients: list[asyncio.StreamWriter]
    consul: ConsulClient

    async def connect(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), DEADLINE
        )
        self.clients.append(writer)
        return reader, writer


@contextlib.asynccontextmanager
async def mesh() -> AsyncIterator[Mesh]:
    """api's sidecar (inbound tcp, allow all) in front of an echo app; web's sidecar with no
    listeners yet, whose upstreams all reach api's sidecar."""
    async with dev_mesh() as dm:
        server, app_port, stats = await start_app()
        api = Sidecar[tuple[Target, ...]](
            await dm.tls("api"), allow_all(), endpoints=lambda up: None, targets=lambda t: t
        )
        api_port = _free_port()
        uri = "spiffe://x/ns/default/dc/dc1/svc/api"
        await api.apply(
            SidecarSpec(InboundSpec("tcp", "127.0.0.1", api_port, "127.0.0.1", app_port, uri))
        )
        endpoints: Latest[tuple[Target, ...]] = Latest((Target("n1/api", "127.0.0.1", api_port),))
        web = Sidecar[tuple[Target, ...]](
            await dm.tls("web"),
            allow_all(),
            endpoints=lambda up: endpoints,
            targets=lambda t: t,
        )
        m = Mesh(web, stats, [], dm.consul)
        try:
            yield m
        finally:
            for writer in m.clients:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            await web.close(grace=0)
            await api.close(grace=0)
            server.close()
            await server.wait_closed()


async def _echo(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], data: bytes) -> bytes:
    reader, writer = conn
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), DEADLINE)


def _refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


async def test_apply_adds_removes_and_drains_without_touching_the_rest() -> None:
    async with mesh() as m:
        a = UpstreamSpec("api", "tcp", "127.0.0.1", _free_port())
        b = UpstreamSpec("api", "tcp", "127.0.0.1", _free_port(), filter="Service.Meta.v == 2")
        await m.web.apply(SidecarSpec(upstreams=(a,), drain_grace=30.0))
        held = await m.connect(a.port)
        assert await _echo(held, b"one") == b"one"
        listener_a = m.web.running[a.bind].listener

        added = await m.web.apply(SidecarSpec(upstreams=(a, b), drain_grace=30.0))
        assert added.start == (b,) and added.keep == (a,)
        assert m.web.running[a.bind].listener is listener_a
        assert await _echo(held, b"two") == b"two"
        other = await m.connect(b.port)
        assert await _echo(other, b"bee") == b"bee"
        assert m.app.accepted == 2  # the held connection was never re-established

        removed = await m.web.apply(SidecarSpec(upstreams=(b,), drain_grace=30.0))
        assert removed.stop == (a,)
        assert _refused(a.port)
        assert m.web.listener(a) is None
        # In flight on the removed listener: still served during its drain.
        assert await _echo(held, b"three") == b"three"

        # Removed with a short drain: the open connection is cut once it is over.
        await m.web.apply(SidecarSpec(drain_grace=0.05))
        assert _refused(b.port)
        assert await asyncio.wait_for(other[0].read(), DEADLINE) == b""

        # Closing the sidecar cuts the drain still running for the held connection.
        assert len(m.web._draining) == 1
        await m.web.close(grace=0)
        assert await asyncio.wait_for(held[0].read(), DEADLINE) == b""
        assert not m.web._draining


async def test_a_protocol_change_replaces_the_listener_on_the_same_port() -> None:
    async with mesh() as m:
        port = _free_port()
        tcp = UpstreamSpec("api", "tcp", "127.0.0.1", port)
        await m.web.apply(SidecarSpec(upstreams=(tcp,)))
        assert await _echo(await m.connect(port), b"raw") == b"raw"
        http = UpstreamSpec("api", "http", "127.0.0.1", port)
        changed = await m.web.apply(SidecarSpec(upstreams=(http,)))
        assert changed.replace == ((tcp, http),)
        # Now an HTTP listener: a request line gets parsed, forwarded, and answered (the echo
        # app sends the request back, which the sidecar cannot read as a response: 502).
        reader, writer = await m.connect(port)
        writer.write(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), DEADLINE)
        assert status_line.startswith(b"HTTP/1.1 502"), status_line
        assert m.web.stats.requests == 1


async def test_a_port_that_cannot_be_bound_fails_alone_and_is_retried() -> None:
    async with mesh() as m:
        ok = UpstreamSpec("api", "tcp", "127.0.0.1", _free_port())
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = UpstreamSpec("api", "tcp", "127.0.0.1", taken.getsockname()[1], peer="p")
            with pytest.raises(OSError):
                await m.web.apply(SidecarSpec(upstreams=(ok, busy)))
            assert m.web.listener(ok) is not None
            assert m.web.listener(busy) is None
        # The port is free now: the next apply of the same spec starts only what is missing.
        again = await m.web.apply(SidecarSpec(upstreams=(ok, busy)))
        assert again.start == (busy,) and again.keep == (ok,)
        assert await _echo(await m.connect(busy.port), b"x") == b"x"


async def test_listeners_follow_consul_without_a_reload() -> None:
    """Ready for "when Consul says so": a `BlockingWatch` of api's service-defaults publishes
    its protocol and a follower applies the spec it implies; no file, no SIGHUP."""
    async with mesh() as m:
        defaults = {"Kind": "service-defaults", "Name": "api", "Protocol": "tcp"}
        assert await m.consul.config_entries.put(defaults)

        async def fetch(index: int, wait: float) -> Indexed[Mapping[str, Any]]:
            return await m.consul.config_entries.get(
                "service-defaults", "api", index=index, wait=wait
            )

        watch: BlockingWatch[Mapping[str, Any], str] = BlockingWatch(
            "service-defaults api",
            fetch,
            lambda entry, index: str(entry.get("Protocol") or "tcp"),
            "tcp",
            lambda: WatchSettings(wait=5.0, retry_initial=0.01, retry_max=0.05),
        )
        port = _free_port()
        applied: asyncio.Queue[UpstreamSpec] = asyncio.Queue()

        async def follow() -> None:
            version = 0
            while True:
                version, protocol = await watch.latest.changed(version)
                spec = UpstreamSpec("api", protocol, "127.0.0.1", port)
                await m.web.apply(SidecarSpec(upstreams=(spec,), drain_grace=30.0))
                applied.put_nowait(spec)

        tasks = [asyncio.ensure_future(watch.run()), asyncio.ensure_future(follow())]
        try:
            first = await asyncio.wait_for(applied.get(), DEADLINE)
            assert first.protocol == "tcp"
            held = await m.connect(port)
            assert await _echo(held, b"tcp") == b"tcp"

            assert await m.consul.config_entries.put({**defaults, "Protocol": "http"})
            second = await asyncio.wait_for(applied.get(), DEADLINE)
            assert second.protocol == "http"
            assert m.web.listener(second) is not None
            reader, writer = await m.connect(port)
            writer.write(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
            status_line = await asyncio.wait_for(reader.readline(), DEADLINE)
            assert status_line.startswith(b"HTTP/1.1 502"), status_line  # parsed as HTTP
            # The tcp connection opened before the change is draining, still served.
            assert await _echo(held, b"still") == b"still"
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
