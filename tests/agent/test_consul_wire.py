"""The Consul client's own HTTP/1.1 transport (agent/consul_wire.py), attacked on real sockets:
an answer is only ever taken for the request it answers, a request never carries bytes that
split it, and a parked blocking query holds one connection and nothing else of the pool."""

from __future__ import annotations

import asyncio

import pytest

from agent.consul import ConsulClient
from agent.consul_config import ConsulConfig
from agent.consul_errors import ConsulBadResponse, ConsulConfigError
from devstack.server import DevServer
from tests.agent.conftest import SocketServer, read_request_head, relay_to


def _answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


async def test_a_second_answer_to_one_request_is_never_taken_for_the_next() -> None:
    # A peer (or something in between) answers the first request twice on a keep-alive
    # connection: the extra answer must not become the answer to the next request.
    requests: list[bytes] = []

    async def two_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = len(requests) == 0
        while True:
            requests.append(await read_request_head(reader))
            if first:
                writer.write(_answer(b'"leader-A"') + _answer(b'"leader-B"'))
                first = False
            else:
                writer.write(_answer(b'"leader-C"'))
            await writer.drain()

    async with (
        SocketServer(two_answers) as server,
        ConsulClient(ConsulConfig(address=server.address, timeout=5.0)) as consul,
    ):
        assert await consul.status.leader() == "leader-A"
        assert await consul.status.leader() == "leader-C"
        assert await consul.status.leader() == "leader-C"
    assert len(requests) == 3


async def test_extra_bytes_arriving_after_an_answer_retire_the_connection() -> None:
    # The same, with the extra answer arriving after the first was read.
    async def late_extra(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(_answer(b'"leader-A"'))
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(_answer(b'"leader-B"'))
        await writer.drain()
        while True:
            await read_request_head(reader)
            writer.write(_answer(b'"leader-B2"'))
            await writer.drain()

    async with SocketServer(late_extra) as server:
        async with ConsulClient(ConsulConfig(address=server.address, timeout=5.0)) as consul:
            assert await consul.status.leader() == "leader-A"
            await asyncio.sleep(0.5)  # the extra answer has arrived on the idle connection
            assert await consul.status.leader() == "leader-A"
        assert server.connections == 2


@pytest.mark.parametrize(
    "token", ["abc\r\nX-Consul-Token: other", "abc\ndef", "abc\x00", " abc", "tökén"]
)
def test_a_token_that_would_split_the_request_is_refused_when_the_client_is_built(
    token: str,
) -> None:
    with pytest.raises(ConsulConfigError, match="token"):
        ConsulClient(ConsulConfig(address="127.0.0.1:8500", token=token))


async def test_parked_blocking_queries_hold_one_connection_each_and_reuse_them(
    dev: DevServer,
) -> None:
    async with (
        SocketServer(relay_to(dev.http_addr)) as relay,
        ConsulClient(ConsulConfig(address=relay.address, timeout=5.0)) as consul,
    ):
        first = await consul.health.service("web")
        parked = [
            asyncio.create_task(consul.health.service("web", index=first.index, wait="30s"))
            for _ in range(20)
        ]
        await asyncio.sleep(0.5)
        assert relay.connections == 20  # the first read's connection is reused by one
        await consul.catalog.register(
            {"Node": "n1", "Address": "10.0.0.1", "Service": {"Service": "web", "Port": 80}}
        )
        woken = await asyncio.gather(*parked)
        assert {w.index for w in woken} == {woken[0].index} and woken[0].index > first.index
        assert len(woken[0].value) == 1
        # Answered connections went back to the pool: the next reads open none.
        for _ in range(5):
            await consul.status.leader()
        assert relay.connections <= 21


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        # Two framings at once: which one ends the body is what request smuggling plays on.
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"
            b"X-Consul-Index: 3\r\n\r\n0\r\n\r\n",
            "not an HTTP answer",
        ),
        # Two indexes: the watch cannot know which state the answer is.
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Consul-Index: 3\r\n"
            b"X-Consul-Index: 9\r\n\r\n[]",
            "X-Consul-Index '3, 9' is not",
        ),
    ],
)
async def test_an_ambiguous_answer_is_a_bad_response(reply: bytes, error: str) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(reply)
        await writer.drain()

    async with (
        SocketServer(answer) as server,
        ConsulClient(ConsulConfig(address=server.address, timeout=5.0)) as consul,
    ):
        with pytest.raises(ConsulBadResponse, match=error):
            await consul.health.service("web")


async def test_no_more_connections_than_max_connections_the_rest_wait(dev: DevServer) -> None:
    async with (
        SocketServer(relay_to(dev.http_addr)) as relay,
        ConsulClient(ConsulConfig(address=relay.address, timeout=5.0, max_connections=2)) as c,
    ):
        first = await c.health.service("web")
        parked = [
            asyncio.create_task(c.health.service("web", index=first.index, wait="30s"))
            for _ in range(3)
        ]
        await asyncio.sleep(0.5)
        assert relay.connections == 2 and not any(p.done() for p in parked)
        # Through another client: this one's two connections are both parked.
        async with ConsulClient(ConsulConfig(address=dev.http_addr)) as other:
            await other.catalog.register(
                {"Node": "n1", "Address": "10.0.0.1", "Service": {"Service": "web", "Port": 80}}
            )
        # Two wake on the change; the third then gets a connection and answers at once.
        woken = await asyncio.wait_for(asyncio.gather(*parked), 20)
        assert all(len(w.value) == 1 for w in woken)
        assert relay.connections == 2


async def test_a_connection_the_server_closed_while_idle_is_not_used_again() -> None:
    async def once_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(_answer(b'"leader-A"'))  # keep-alive: nothing says it will close
        await writer.drain()
        await asyncio.sleep(0.1)

    async with (
        SocketServer(once_then_hang_up) as server,
        ConsulClient(ConsulConfig(address=server.address, timeout=5.0)) as consul,
    ):
        assert await consul.status.leader() == "leader-A"
        await asyncio.sleep(0.5)  # the server has closed the idle connection
        assert await consul.status.leader() == "leader-A"
        assert server.connections == 2
