"""Shared fixtures: a real devstack on 127.0.0.1:0 and a plain HTTP client for it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from devstack.config import DevConfig
from devstack.server import DevServer


class Http:
    """A thin raw-HTTP helper so devstack tests see exactly what Consul's clients see."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | str | None = None,
        params: dict[str, str] | list[tuple[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
        async with self.session.request(
            method, self.base + path, json=json, data=data, params=params, headers=headers
        ) as resp:
            raw = await resp.read()
            body: Any = raw.decode()
            if resp.content_type == "application/json" and raw:
                body = await resp.json()
            return resp.status, body, resp.headers

    async def get(self, path: str, **kw: Any) -> tuple[int, Any, Any]:
        return await self.call("GET", path, **kw)

    async def put(self, path: str, **kw: Any) -> tuple[int, Any, Any]:
        return await self.call("PUT", path, **kw)


@pytest.fixture
def dev_config() -> DevConfig:
    return DevConfig()


@pytest.fixture
async def dev(dev_config: DevConfig) -> AsyncIterator[DevServer]:
    async with DevServer(dev_config) as server:
        yield server


@pytest.fixture
async def http(dev: DevServer) -> AsyncIterator[Http]:
    async with aiohttp.ClientSession() as session:
        yield Http(session, dev.http_url)
