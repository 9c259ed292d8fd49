"""What a dial costs beyond its handshake: the refusal check (`Upstream.settle`, run before
every dial) reads a connection's TLS session at most once, when that connection closes.

Reading `SSLObject.session` copies the whole session (with the server's certificate chain):
~0.15 ms each. Counted here on the real L4 pair (uvloop, real mTLS), through the stdlib
property the dial path reads; a count, not a time."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
import uvloop

from tests.connect import test_l4_relay as scenarios
from tests.connect.proxy_test_ca import ProxyTestCA


def test_session_is_read_at_most_once_per_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = [0]
    session: property = vars(ssl.SSLObject)["session"]
    assert session.fget is not None

    def counted(self: ssl.SSLObject) -> ssl.SSLSession | None:
        reads[0] += 1
        assert session.fget is not None
        got: ssl.SSLSession | None = session.fget(self)
        return got

    monkeypatch.setattr(ssl.SSLObject, "session", property(counted, session.fset))

    async def main() -> int:
        pair, servers = await scenarios.build_pair(ProxyTestCA(tmp_path))
        try:

            async def one() -> None:
                reader, writer = await pair.connect()
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                writer.close()

            n = 0
            for _ in range(4):  # bursts, as a load generator's connections arrive
                await asyncio.gather(*(one() for _ in range(16)))
                n += 16
            assert pair.outbound.upstream.refusal_counts() == {}
            return n
        finally:
            await scenarios.close_all(pair, servers)

    connections = uvloop.run(main())
    # Before: every dial read the session of every connection still unconfirmed (4.06 reads
    # per connection in 10 such bursts).
    assert reads[0] <= connections
