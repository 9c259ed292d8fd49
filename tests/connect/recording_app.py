"""An HTTP/1.1 app on 127.0.0.1 that records every request head exactly as its bytes arrived
(request line and header lines, no parsing library in between) and answers `200 ok`. For tests
that must assert what the app behind a sidecar really received."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import cast


@dataclass(frozen=True)
class Received:
    method: bytes
    target: bytes
    version: bytes
    headers: tuple[tuple[bytes, bytes], ...]

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name]


@dataclass
class RecordingApp:
    server: asyncio.Server
    port: int
    received: list[Received] = field(default_factory=list)

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


class _Recorder(asyncio.Protocol):
    def __init__(self, app: RecordingApp) -> None:
        self.app = app
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            line, *fields = head.split(b"\r\n")
            method, target, version = line.split(b" ", 2)
            headers = tuple(
                (name.strip(), value.strip())
                for name, _, value in (f.partition(b":") for f in fields)
            )
            self.app.received.append(Received(method, target, version, headers))
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")


async def start_recording_app() -> RecordingApp:
    """Requests without bodies only (what the path tests send)."""
    holder: list[RecordingApp] = []
    server = await asyncio.get_running_loop().create_server(
        lambda: _Recorder(holder[0]), "127.0.0.1", 0
    )
    app = RecordingApp(server, server.sockets[0].getsockname()[1])
    holder.append(app)
    return app
