"""Malformed and huge Consul answers against the upstream watch, over real HTTP.

A scripted HTTP server on 127.0.0.1 plays Consul's `/v1/health/connect/api`: a good answer,
then a hostile one. Each hostile answer must be refused whole with an error saying what was
wrong, the last good snapshot must stay published, and the watch must go on (it asks again).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from agent.catalog import WatchKey
from agent.connectivity import Connectivity
from agent.consul import ConsulClient
from agent.consul_config import DEFAULT_MAX_RESPONSE_BYTES, ConsulConfig
from agent.consul_errors import ConsulConfigError
from agent.watch import UpstreamWatcher, WatchSettings

KEY = WatchKey("api")
HEADERS = {"X-Consul-Index": "", "X-Consul-KnownLeader": "true", "Content-Type": "application/json"}

RELEASE = web.AppKey("release", asyncio.Event)
"""Set when the test ends: a parked answer returns."""

Answer = Callable[[web.Request, dict[str, str]], Awaitable[web.StreamResponse]]


def entry(sid: str, port: object, **extra_node: Any) -> dict[str, Any]:
    return {
        "Node": {"Node": "n1", "Address": "10.0.0.1", "ModifyIndex": 3, **extra_node},
        "Service": {
            "ID": sid,
            "Service": "api-sidecar-proxy",
            "Kind": "connect-proxy",
            "Port": port,
            "Proxy": {"DestinationServiceName": "api"},
            "ModifyIndex": 4,
        },
        "Checks": [{"CheckID": "serfHealth", "Status": "passing", "ModifyIndex": 2}],
    }


def body(raw: bytes) -> Answer:
    async def answer(request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
        return web.Response(body=raw, headers=headers)

    return answer


class ScriptedConsul:
    """Answers the health endpoint from a script of (index, answer), then parks every request
    until the test ends and says so (`done`)."""

    def __init__(self, script: list[tuple[int, Answer]]) -> None:
        self.script = script
        self.asked = 0
        self.done = asyncio.Event()
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.address = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.asked += 1
        if self.asked > len(self.script):
            self.done.set()
            await self._release.wait()
            return web.Response(status=503, text="going away")
        index, answer = self.script[self.asked - 1]
        return await answer(request, {**HEADERS, "X-Consul-Index": str(index)})

    async def __aenter__(self) -> ScriptedConsul:
        app = web.Application()
        app[RELEASE] = self._release
        app.router.add_get("/v1/health/connect/{name}", self.handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.address = f"127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        self._release.set()
        await self._runner.cleanup()


async def watch_through(
    hostile: Answer, max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
) -> UpstreamWatcher:
    """Runs a watcher over [good answer, `hostile`] until it asks again after the hostile one;
    returns it (stopped) for the test to inspect."""
    good = body(json.dumps([entry("a", 21000)]).encode())
    config = ConsulConfig(timeout=5, max_response_bytes=max_response_bytes)
    async with (
        ScriptedConsul([(10, good), (11, hostile)]) as fake,
        ConsulClient(dataclasses.replace(config, address=fake.address)) as client,
    ):
        watcher = UpstreamWatcher(
            client,
            KEY,
            lambda: WatchSettings(wait=30.0, retry_initial=0.01, retry_max=0.05),
            Connectivity(time.time),
        )
        task = asyncio.ensure_future(watcher.run())
        try:
            async with asyncio.timeout(20):  # a deadline for a hung watch, not a measurement
                done = asyncio.ensure_future(fake.done.wait())
                await asyncio.wait([done, task], return_when=asyncio.FIRST_COMPLETED)
                done.cancel()
            assert not task.done(), f"the watch died: {task.exception()!r}"
            assert fake.asked == 3
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return watcher


def assert_kept_last_good(watcher: UpstreamWatcher, error: str) -> None:
    snap = watcher.latest.get()
    assert snap is not None and [(e.service_id, e.port) for e in snap.endpoints] == [("a", 21000)]
    assert watcher.state.failures == 1
    assert error in watcher.state.last_error, watcher.state.last_error


async def test_deeply_nested_json_in_a_skipped_field_is_refused_and_the_watch_lives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 100,000 nested arrays inside node meta, a field the agent never reads: more than the
    # interpreter's recursion limit for any recursive JSON parser.
    depth = 100_000
    bomb = json.dumps([entry("a", 21001, Meta={"x": "HOLE"})]).encode()
    bomb = bomb.replace(b'"HOLE"', b"[" * depth + b"]" * depth)
    caplog.set_level(logging.ERROR, "meshlet.agent.watch")
    watcher = await watch_through(body(bomb))
    assert_kept_last_good(watcher, "nested too deeply")
    assert "GET /v1/health/connect/api" in watcher.state.last_error


@pytest.mark.parametrize(
    ("port", "where"),
    [("21001", "$[0].Service.Port"), (True, "$[0].Service.Port"), (None, "port 0")],
)
async def test_a_wrongly_typed_field_rejects_the_whole_answer(port: object, where: str) -> None:
    # The malformed entry carries the same ModifyIndexes as the good one before it: reuse of
    # the previous answer's endpoint must never skip its checks (before msgspec, the
    # fingerprint memo reused a's old endpoint and published b next to it).
    answer = [entry("b", 21002), entry("a", port)]
    fixed = where.replace("$[0]", "$[1]")
    watcher = await watch_through(body(json.dumps(answer).encode()))
    assert_kept_last_good(watcher, fixed)


async def test_an_answer_larger_than_the_limit_is_refused_while_streaming() -> None:
    # Chunked, no Content-Length: valid JSON (whitespace, then an empty list) that would
    # replace every endpoint with none once read, and holds the limit in memory meanwhile.
    async def flood(request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
        resp = web.StreamResponse(headers=headers)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        chunk = b" " * (1 << 20)
        with contextlib.suppress(ConnectionError):
            for _ in range(DEFAULT_MAX_RESPONSE_BYTES // len(chunk) + 2):
                await resp.write(chunk)
            await resp.write(b"[]")
            await resp.write_eof()
        return resp

    watcher = await watch_through(flood)
    assert_kept_last_good(watcher, "larger than the 67108864-byte limit")


async def test_a_declared_huge_answer_is_refused_before_its_body() -> None:
    # Content-Length of 8 GiB and then nothing: the body is never waited for.
    async def huge(request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={**headers, "Content-Length": str(8 << 30)})
        await resp.prepare(request)
        await resp.write(b"[")
        await request.app[RELEASE].wait()
        return resp

    watcher = await watch_through(huge)
    assert_kept_last_good(watcher, f"answer of {8 << 30} bytes is larger than")


def _answer_of(size: int) -> bytes:
    """An answer of exactly `size` bytes: one endpoint b on port 21003 (padded in node meta)."""
    bare = json.dumps([entry("b", 21003, Meta={"pad": ""})]).encode()
    return bare.replace(b'"pad": ""', b'"pad": "' + b"p" * (size - len(bare)) + b'"')


def chunked(raw: bytes) -> Answer:
    """`raw` streamed in chunks, no Content-Length: the limit is found while reading."""

    async def answer(request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
        resp = web.StreamResponse(headers=headers)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            for i in range(0, len(raw), 1000):
                await resp.write(raw[i : i + 1000])
            await resp.write_eof()
        return resp

    return answer


LIMIT = 20_000


@pytest.mark.parametrize("framing", [body, chunked])
async def test_an_answer_exactly_at_the_limit_is_applied(
    framing: Callable[[bytes], Answer],
) -> None:
    raw = _answer_of(LIMIT)
    assert len(raw) == LIMIT
    watcher = await watch_through(framing(raw), max_response_bytes=LIMIT)
    snap = watcher.latest.get()
    assert snap is not None and [(e.service_id, e.port) for e in snap.endpoints] == [("b", 21003)]
    assert watcher.state.failures == 0


@pytest.mark.parametrize("framing", [body, chunked])
async def test_an_answer_one_byte_past_the_limit_is_refused_and_counted(
    framing: Callable[[bytes], Answer],
) -> None:
    """Refused unread, counted in the watch's failures (meshlet_consul_watch_errors), the
    last good snapshot kept, and the watch asks again (its next answer would be applied)."""
    watcher = await watch_through(framing(_answer_of(LIMIT + 1)), max_response_bytes=LIMIT)
    assert_kept_last_good(watcher, f"larger than the {LIMIT}-byte limit")


def test_the_answer_limit_must_be_positive() -> None:
    with pytest.raises(ConsulConfigError, match="max_response_bytes must be at least 1, got 0"):
        ConsulConfig(max_response_bytes=0)


def _named_twice(first: dict[str, Any], second: dict[str, Any]) -> bytes:
    """One entry whose object names `Service` twice (Consul never does; JSON allows it)."""
    e = entry("b", 21002)
    return (
        f'[{{"Node": {json.dumps(e["Node"])}, "Service": {json.dumps(first)}, '
        f'"Service": {json.dumps(second)}, "Checks": {json.dumps(e["Checks"])}}}]'
    ).encode()


async def test_a_field_named_twice_has_every_value_checked_and_the_last_one_read() -> None:
    # Found by the catalog fuzz target: json.loads (the full decode) keeps the last value and
    # never reads the first; the watch's decode checks both, so a malformed first one refuses
    # the answer (the closed side) and names where.
    second = entry("b", 21002)["Service"]
    watcher = await watch_through(body(_named_twice({"ID": "1"}, second)))
    assert_kept_last_good(watcher, "missing required field `Service` - at `$[0].Service`")
    # Both well formed: the last one is read, as json.loads reads it.
    first = {**second, "ID": "c", "Port": 21003}
    watcher = await watch_through(body(_named_twice(first, second)))
    snap = watcher.latest.get()
    assert snap is not None and [(e.service_id, e.port) for e in snap.endpoints] == [("b", 21002)]
    assert watcher.state.failures == 0
