"""Upstream connections: one protocol per connection, parsing responses with httptools and
handing them to the downstream connection it serves (`owner`); idle ones wait in a `Pool`
per endpoint key between exchanges."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

import httptools

from connect.balancer import Target
from connect.cluster import Cluster

if TYPE_CHECKING:
    from connect.http1.downstream import Downstream

__all__ = ["Pool", "UpConn"]


class UpConn(asyncio.Protocol):
    """One upstream connection; `owner` is the downstream it currently serves."""

    __slots__ = (
        "cluster",
        "headers",
        "interim",
        "key",
        "owner",
        "parser",
        "pool",
        "skip_body",
        "target",
        "transport",
        "tunnel",
        "upgrading",
    )

    def __init__(self, pool: Pool, key: str, target: Target | None) -> None:
        self.pool = pool
        self.key = key
        self.target = target
        """The mesh endpoint, while its cluster counts this connection's request in flight."""
        self.cluster: Cluster | None = None
        """The mesh cluster `target` belongs to, once the dial has succeeded (it counts this
        connection among its open ones until it is lost)."""
        self.transport: asyncio.Transport | None = None
        self.owner: Downstream | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.interim = False
        self.skip_body = False
        self.tunnel = False
        self.upgrading = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast("asyncio.Transport", transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=self.pool.high_water)

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:
            # An idle pooled connection must say nothing; if it does, it is not reusable.
            assert self.transport is not None
            self.transport.abort()
            return
        owner.active = True
        if self.tunnel:
            assert owner.transport is not None
            owner.transport.write(data)
            return
        # Everything one read produces for the client (status line, headers, body, last
        # chunk) goes out as one write: one TLS record and one syscall instead of several.
        owner.out = []
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            owner.flush()
            owner.tunnel_open(self, data[upgrade.args[0] :])
            return
        except httptools.HttpParserError as err:
            owner.flush()
            owner.upstream_broken(self, f"bad response: {err}")
            return
        owner.flush()
        if self.skip_body:
            # llhttp cannot be told a response answers HEAD; its parser now expects a body
            # that will never come, so take a fresh one for the next exchange.
            self.skip_body = False
            self.parser = httptools.HttpResponseParser(self)
            owner.response_done(self, reusable=True)

    # httptools callbacks (only those defined are called: no on_message_begin, the
    # headers list is handed over and replaced when the head is complete)
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        owner = self.owner
        assert owner is not None
        headers, self.headers = self.headers, []
        if 100 <= status < 200 and status != 101:
            self.interim = True
            owner.interim_response(status, headers)
            return
        self.upgrading = status == 101
        owner.response_head(status, headers)
        if owner.current_is_head() and status not in (204, 304):
            self.skip_body = True

    def on_body(self, body: bytes) -> None:
        owner = self.owner
        if owner is not None and not self.skip_body:
            owner.response_body(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.skip_body or self.upgrading:
            return  # HEAD: finished after feed_data; 101: HttpParserUpgrade follows
        owner = self.owner
        if owner is not None:
            owner.response_done(self, reusable=self.parser.should_keep_alive())

    def pause_writing(self) -> None:
        owner = self.owner
        if owner is not None and owner.transport is not None:
            owner.transport.pause_reading()

    def resume_writing(self) -> None:
        owner = self.owner
        if owner is not None and owner.transport is not None:
            owner.transport.resume_reading()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pool.forget(self)
        if self.cluster is not None:
            self.cluster.connections -= 1
        owner = self.owner
        if owner is not None:
            owner.upstream_lost(self)


class Pool:
    """Idle keep-alive connections per endpoint key, newest first (warm TLS sessions)."""

    def __init__(self, high_water: int, max_idle: int) -> None:
        self.high_water = high_water
        self.max_idle = max_idle
        self.idle: dict[str, list[UpConn]] = {}

    def take(self, key: str) -> UpConn | None:
        conns = self.idle.get(key)
        while conns:
            conn = conns.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    def put(self, conn: UpConn) -> None:
        conn.owner = None
        transport = conn.transport
        if transport is None or transport.is_closing():
            return
        conns = self.idle.setdefault(conn.key, [])
        if len(conns) >= self.max_idle:
            transport.close()
            return
        conns.append(conn)

    def forget(self, conn: UpConn) -> None:
        conns = self.idle.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)

    def close(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                if conn.transport is not None:
                    conn.transport.close()
        self.idle.clear()
