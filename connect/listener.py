"""The listening socket every sidecar listener (L4 or HTTP, inbound or outbound) owns."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Coroutine
from typing import Any


class ListeningSocket:
    """One server socket, its background tasks, and how it starts and stops accepting.

    Subclasses say what to speak (`_protocol`) and whether to terminate TLS (`_ssl`); they
    own what happens to connections already accepted when they close.
    """

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self._port = 0

    @property
    def port(self) -> int:
        return self._port

    def _protocol(self) -> asyncio.Protocol:
        raise NotImplementedError

    def _ssl(self) -> tuple[ssl.SSLContext | None, float | None]:
        return None, None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def start(self, host: str = "127.0.0.1", port: int = 0, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        ctx, handshake_timeout = self._ssl()
        self.server = await loop.create_server(
            self._protocol,
            host,
            port,
            reuse_port=reuse_port or None,
            ssl=ctx,
            ssl_handshake_timeout=handshake_timeout,
        )
        self._port = int(self.server.sockets[0].getsockname()[1])

    async def _stop_accepting(self) -> None:
        """Close the socket to new connections and cancel the listener's own tasks."""
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks)

    async def _closed(self) -> None:
        if self.server is not None:
            await self.server.wait_closed()
