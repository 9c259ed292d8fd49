"""Helpers for identity tests: a real mTLS echo service and kept-alive client connections."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from connect.identity import Identity, PeerRefused
from connect.leaf import Material
from connect.leaf_rotation import LeafRotator
from connect.tls import DynamicTLS, HandshakeRefused, accept_tls


@dataclass
class Running:
    rotator: LeafRotator
    tls: DynamicTLS
    task: asyncio.Task[None]
    follower: asyncio.Task[None]
    generations: list[Material] = field(default_factory=list)


Start = Callable[[str, str], Awaitable[Running]]


class EchoService:
    """A real mTLS service: checks each client's SPIFFE ID, then echoes lines prefixed with the
    serial of the leaf it presented; records every refusal with its reason."""

    def __init__(self, tls: DynamicTLS) -> None:
        self.tls = tls
        self.peers: list[Identity] = []
        self.refusals: list[str] = []
        self.refused = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        serial = self.tls.material.leaf.serial
        try:
            try:
                self.peers.append(await accept_tls(writer, self.tls))
            except (HandshakeRefused, PeerRefused) as err:
                self.refusals.append(str(err))
                self.refused.set()
                return
            while line := await reader.readline():
                writer.write(serial.encode() + b" " + line)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> EchoService:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._server.wait_closed()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])


class Conn:
    """One kept-alive client connection: a request is a line, the answer its echo."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, ctx: ssl.SSLContext) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        return cls(reader, writer)

    def ssl_object(self) -> ssl.SSLObject:
        obj = self.writer.get_extra_info("ssl_object")
        assert isinstance(obj, ssl.SSLObject)
        return obj

    async def request(self, payload: bytes = b"ping") -> bytes:
        self.writer.write(payload + b"\n")
        await self.writer.drain()
        answer = await self.reader.readline()
        if not answer.endswith(b" " + payload + b"\n"):
            raise ConnectionError(f"bad answer {answer!r}")
        return answer.split(b" ", 1)[0]

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.writer.wait_closed()
