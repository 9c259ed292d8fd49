"""What a peer that is not quite Consul answers is a ConsulBadResponse naming the request,
never another exception escaping the client (a watch or the sidecar's start would crash on
it). Found while fuzzing the Consul answer decoders (tests/fuzz): JSON nested past Python's
decoder depth raised RecursionError out of `Response.json`. The peer is a raw socket server
writing the answer by hand."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from agent.consul import ConsulClient
from agent.consul_config import ConsulConfig
from agent.consul_errors import ConsulBadResponse


@pytest.fixture
async def hostile() -> AsyncIterator[tuple[str, list[bytes]]]:
    """127.0.0.1:<port> answering every request with the next body of the list, as JSON."""
    bodies: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = bodies.pop(0)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: 1\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"127.0.0.1:{port}", bodies
    server.close()
    await server.wait_closed()


async def test_an_answer_nested_too_deeply_is_a_bad_response(
    hostile: tuple[str, list[bytes]],
) -> None:
    address, bodies = hostile
    bodies.append(b"[" * 100_000 + b"]" * 100_000)
    async with ConsulClient(ConsulConfig(address=address, timeout=5.0)) as client:
        with pytest.raises(ConsulBadResponse) as info:
            await client.agent.self()
    assert str(info.value) == "GET /v1/agent/self: response is nested too deeply to decode"


async def test_a_kv_value_that_is_not_ascii_base64_is_a_bad_response(
    hostile: tuple[str, list[bytes]],
) -> None:
    """Found by atheris on the consul_results target: base64 of a non-ASCII string raises a
    bare ValueError (not binascii.Error), which escaped the decoder's ShapeError contract."""
    address, bodies = hostile
    bodies.append('[{"Key": "k", "Value": "µȨOº"}]'.encode())
    async with ConsulClient(ConsulConfig(address=address, timeout=5.0)) as client:
        with pytest.raises(ConsulBadResponse) as info:
            await client.kv.get("k")
    assert str(info.value).startswith("GET /v1/kv/k: unexpected response shape: Value: not base64")
