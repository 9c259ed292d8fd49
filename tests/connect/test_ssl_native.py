"""connect.ssl_native's session offer over real sockets: a session offered without ssl's copy
resumes, the server still sees the client's certificate, and anything that cannot be confirmed
(a session of another context, a server-side object, a handshake under way) is refused and
left to ssl's own checks."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from pathlib import Path

import pytest

from connect.ssl_native import NativeSession, has_ticket, offer_session, session_of
from tests.connect.proxy_test_ca import ProxyTestCA


def _handshake(client: ssl.SSLObject, sock: socket.socket, bios: tuple[ssl.MemoryBIO, ...]) -> None:
    incoming, outgoing = bios
    sock.settimeout(10)
    while True:
        try:
            client.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        if out := outgoing.read():
            sock.sendall(out)
        if done:
            break
        incoming.write(sock.recv(65536))
    # the server's ticket comes after the handshake: read until it is there
    while True:
        session = client.session
        if session is not None and session.has_ticket:
            return
        incoming.write(sock.recv(65536))
        with contextlib.suppress(ssl.SSLWantReadError):
            client.read(1)


class _Server:
    """A TLS 1.3 server on 127.0.0.1 (client certificate required) that records, per
    connection, whether it resumed and the client certificate it saw."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.seen: list[tuple[bool, bytes | None]] = []
        self.closed = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.1)  # a blocked accept() would not see close()
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            seen: tuple[bool, bytes | None] = (False, None)
            with (
                conn,
                contextlib.suppress(ssl.SSLError, OSError),
                self.ctx.wrap_socket(conn, server_side=True) as tls,
            ):
                seen = (bool(tls.session_reused), tls.getpeercert(True))
                tls.sendall(b"x")  # with the ticket: the client reads both
                tls.recv(1)  # until the client is gone
            self.seen.append(seen)

    def dial(
        self, client: ssl.SSLContext, session: ssl.SSLSession | NativeSession | None
    ) -> ssl.SSLObject:
        bios = (ssl.MemoryBIO(), ssl.MemoryBIO())
        obj = client.wrap_bio(*bios)
        if session is not None:
            assert offer_session(obj, session)
        with socket.create_connection(self.listener.getsockname()) as sock:
            _handshake(obj, sock, bios)
        return obj

    def close(self) -> None:
        self.closed = True
        self.thread.join(10)
        self.listener.close()


@pytest.fixture
def ca(tmp_path: Path) -> ProxyTestCA:
    return ProxyTestCA(tmp_path)


def test_a_session_offered_without_a_copy_resumes_and_the_client_is_still_known(
    ca: ProxyTestCA,
) -> None:
    web = ca.leaf("web")
    server = _Server(ca.server_context(ca.leaf("api")))
    client = ca.client_context(web)
    try:
        assert has_ticket(client.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO())) is False
        first = server.dial(client, None)
        session = first.session
        assert session is not None and not first.session_reused
        assert has_ticket(first) is True  # read without ssl's copy of the session
        for _ in range(3):  # the same session object, offered again and again
            assert server.dial(client, session).session_reused
    finally:
        server.close()
    assert len(server.seen) == 4
    assert [reused for reused, _ in server.seen] == [False, True, True, True]
    assert all(der == web.der for _, der in server.seen)


def test_a_session_read_natively_resumes_and_stays_with_its_context(ca: ProxyTestCA) -> None:
    """`session_of` reads the session with SSL_get1_session (ssl's getter leaks a copy per
    read on CPython 3.11): it has its ticket, resumes, and is offered to no other context's
    connection, even once its own context is gone."""
    web = ca.leaf("web")
    server = _Server(ca.server_context(ca.leaf("api")))
    client = ca.client_context(web)
    try:
        assert session_of(client.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO())) is None
        first = server.dial(client, None)
        session = session_of(first)
        assert isinstance(session, NativeSession) and session.has_ticket
        assert session.timeout > 0 and session.time > 0
        del first  # the session outlives its connection: it holds its own reference
        for _ in range(2):
            assert server.dial(client, session).session_reused
        other = ca.client_context(web)
        assert not offer_session(other.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO()), session)
        del client
        assert not offer_session(other.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO()), session)
    finally:
        server.close()
    assert [reused for reused, _ in server.seen] == [False, True, True]
    assert all(der == web.der for _, der in server.seen)


def test_what_cannot_be_confirmed_is_not_offered(ca: ProxyTestCA) -> None:
    server = _Server(ca.server_context(ca.leaf("api")))
    client = ca.client_context(ca.leaf("web"))
    try:
        session = server.dial(client, None).session
        assert session is not None
        # a session read from another context's connection
        other = ca.client_context(ca.leaf("web"))
        assert not offer_session(other.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO()), session)
        # a server-side object
        server_side = ca.server_context(ca.leaf("api")).wrap_bio(
            ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True
        )
        assert not offer_session(server_side, session)
        # a handshake already under way
        started = client.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO())
        with pytest.raises(ssl.SSLWantReadError):
            started.do_handshake()
        assert not offer_session(started, session)
        # a session already set
        twice = client.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO())
        assert offer_session(twice, session)
        assert not offer_session(twice, session)
    finally:
        server.close()


def test_the_operator_can_turn_the_native_calls_off() -> None:
    """MESHLET_SSL_NATIVE=0: every call reports it did nothing, so ssl's own path is taken."""
    import subprocess
    import sys

    probe = (
        "import ssl; from connect import ssl_native as n; "
        "ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); "
        "print(n._libssl() is None, n.send_loaded_chain_only(ctx), "
        "n.no_ticket_on_resumption(ctx))"
    )
    for value, expected in (("0", "True False False"), ("1", "False True True")):
        out = subprocess.run(
            [sys.executable, "-c", probe],
            env={"MESHLET_SSL_NATIVE": value, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.split() == expected.split(), (value, out.stdout, out.stderr)
