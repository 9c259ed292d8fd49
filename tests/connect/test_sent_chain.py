"""What a sidecar's certificate message carries on the wire: its leaf chain as the leaf source
gave it (the leaf, then any intermediates), never the root from the trust bundle.

OpenSSL builds the chain it sends from the context's trust store when the leaf comes without
intermediates ("auto chain"), which puts the root on the wire: each handshake then pays one
more chain build on the sender and one more certificate to decode and check on the receiver,
for nothing (the receiver trusts that root already, or refuses the leaf anyway).

The test reads the Certificate messages of a TLS 1.2 handshake (sent in the clear, unlike
TLS 1.3's) over a real loopback socket: a raw peer that records what our side sends."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from connect.tls import DynamicTLS
from tests.connect.devstack_tls import dev_mesh, run

_HANDSHAKE, _CHANGE_CIPHER_SPEC = 22, 20
_CERTIFICATE = 11


def _certificates_sent(wire: bytes) -> list[bytes]:
    """The DER certificates of the first Certificate message in `wire` (TLS records as one
    side sent them, up to its ChangeCipherSpec)."""
    messages = b""
    pos = 0
    while pos + 5 <= len(wire):
        kind, length = wire[pos], int.from_bytes(wire[pos + 3 : pos + 5], "big")
        if kind == _CHANGE_CIPHER_SPEC:
            break
        if kind == _HANDSHAKE:
            messages += wire[pos + 5 : pos + 5 + length]
        pos += 5 + length
    pos = 0
    while pos + 4 <= len(messages):
        kind, length = messages[pos], int.from_bytes(messages[pos + 1 : pos + 4], "big")
        body = messages[pos + 4 : pos + 4 + length]
        if kind == _CERTIFICATE:
            certs, at = [], 3
            while at < len(body):
                n = int.from_bytes(body[at : at + 3], "big")
                certs.append(body[at + 3 : at + 3 + n])
                at += 3 + n
            return certs
        pos += 4 + length
    raise AssertionError("no Certificate message in what the peer sent")


def _tls12(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _raw_handshake(sock: socket.socket, ssl_object: ssl.SSLObject, bios: _Bios) -> bytes:
    """Drive `ssl_object` over `sock` to the end of its handshake (or its failure); return
    every byte the peer sent meanwhile."""
    incoming, outgoing = bios
    received = b""
    sock.settimeout(10)
    while True:
        try:
            ssl_object.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        except ssl.SSLError:
            done = True  # only the peer's certificate message matters here
        out = outgoing.read()
        if out:
            sock.sendall(out)
        if done:
            return received
        data = sock.recv(65536)
        if not data:
            return received
        received += data
        incoming.write(data)


_Bios = tuple[ssl.MemoryBIO, ssl.MemoryBIO]


def _ders(pems: tuple[str, ...]) -> list[bytes]:
    return [x509.load_pem_x509_certificate(p.encode()).public_bytes(Encoding.DER) for p in pems]


async def _meshes() -> tuple[DynamicTLS, DynamicTLS]:
    async with dev_mesh() as mesh:
        return await mesh.tls("api"), await mesh.tls("web")


def _serve_once(
    listener: socket.socket, handle: Callable[[socket.socket], None]
) -> threading.Thread:
    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            handle(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def mesh_tls() -> tuple[DynamicTLS, DynamicTLS]:
    result: list[tuple[DynamicTLS, DynamicTLS]] = []

    async def main() -> None:
        result.append(await _meshes())

    run("asyncio", main)
    return result[0]


def test_server_sends_its_leaf_chain_without_the_root(
    mesh_tls: tuple[DynamicTLS, DynamicTLS],
) -> None:
    api, _ = mesh_tls

    def handle(conn: socket.socket) -> None:
        with (
            contextlib.suppress(ssl.SSLError, OSError),
            api.server().wrap_socket(conn, server_side=True) as tls_conn,
        ):
            tls_conn.recv(1)

    with socket.create_server(("127.0.0.1", 0)) as listener:
        thread = _serve_once(listener, handle)
        probe = _tls12(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
        probe.check_hostname = False
        probe.verify_mode = ssl.CERT_NONE
        bios = (ssl.MemoryBIO(), ssl.MemoryBIO())
        with socket.create_connection(listener.getsockname()) as sock:
            wire = _raw_handshake(sock, probe.wrap_bio(*bios), bios)
        thread.join(10)
    sent = _certificates_sent(wire)
    assert sent == _ders(api.material.leaf.chain_pem)
    assert not set(sent) & set(_ders(api.material.bundle.roots_pem))


def test_client_sends_its_leaf_chain_without_the_root(
    mesh_tls: tuple[DynamicTLS, DynamicTLS], tmp_path: Path
) -> None:
    api, web = mesh_tls
    probe = _tls12(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    probe.verify_mode = ssl.CERT_REQUIRED
    probe.load_verify_locations(cadata=api.material.bundle.pem)
    (tmp_path / "cert.pem").write_text(api.material.leaf.cert_pem)
    (tmp_path / "key.pem").write_text(api.material.leaf.key_pem)
    probe.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    captured: list[bytes] = []

    def handle(conn: socket.socket) -> None:
        bios = (ssl.MemoryBIO(), ssl.MemoryBIO())
        captured.append(_raw_handshake(conn, probe.wrap_bio(*bios, server_side=True), bios))

    with socket.create_server(("127.0.0.1", 0)) as listener:
        thread = _serve_once(listener, handle)
        with (
            socket.create_connection(listener.getsockname()) as sock,
            contextlib.suppress(ssl.SSLError, OSError),
            web.client().wrap_socket(sock) as tls_conn,
        ):
            tls_conn.settimeout(5)
            tls_conn.sendall(b"x")
        thread.join(10)
    sent = _certificates_sent(captured[0])
    assert sent == _ders(web.material.leaf.chain_pem)
    assert not set(sent) & set(_ders(web.material.bundle.roots_pem))
