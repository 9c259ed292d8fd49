"""Real servers for the proxy tests: a raw TCP app that records what reached it, and a
streaming sink/source with its own flow control, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast


@dataclass
class AppStats:
    accepted: int = 0
    received: bytearray = field(default_factory=bytearray)
    eof_seen: asyncio.Event = field(default_factory=asyncio.Event)
    connected: asyncio.Event = field(default_factory=asyncio.Event)


class EchoApp(asyncio.Protocol):
    """Echoes every byte; on EOF answers `bye` and closes (so half-close can be observed)."""

    def __init__(self, stats: AppStats) -> None:
        self.stats = stats
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast("asyncio.Transport", transport)
        self.transport = transport
        self.stats.accepted += 1
        self.stats.connected.set()

    def data_received(self, data: bytes) -> None:
        self.stats.received += data
        assert self.transport is not None
        self.transport.write(data)

    def eof_received(self) -> bool:
        self.stats.eof_seen.set()
        assert self.transport is not None
        self.transport.write(b"bye")
        self.transport.close()
        return True


async def start_app(
    factory: Callable[[AppStats], asyncio.Protocol] = EchoApp,
) -> tuple[asyncio.Server, int, AppStats]:
    stats = AppStats()
    server = await asyncio.get_running_loop().create_server(lambda: factory(stats), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], stats


class Source(asyncio.Protocol):
    """On connect, writes `total` bytes in 64 KiB chunks, respecting its own pause_writing;
    `paused` is set whenever the source is blocked by the network (backpressure reached it)."""

    chunk = b"x" * 65536

    def __init__(self, total: int) -> None:
        self.total = total
        self.sent = 0
        self.paused = asyncio.Event()
        self.transport: asyncio.Transport | None = None
        self._can_write = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast("asyncio.Transport", transport)
        self.transport = transport
        self._pump()

    def _pump(self) -> None:
        assert self.transport is not None
        while self._can_write and self.sent < self.total:
            n = min(len(self.chunk), self.total - self.sent)
            self.transport.write(self.chunk[:n] if n < len(self.chunk) else self.chunk)
            self.sent += n
        if self.sent >= self.total and self._can_write:
            self.transport.close()

    def pause_writing(self) -> None:
        self._can_write = False
        self.paused.set()

    def resume_writing(self) -> None:
        self._can_write = True
        self.paused.clear()
        self._pump()
