"""Mutual-TLS contexts from mesh `Material`, swapped whole when the leaf or the roots change.

Both sides: TLS 1.2 minimum (OpenSSL negotiates 1.3 when both ends can), a certificate
required from the peer and verified against the current bundle only (never the system store),
no hostname check: a mesh peer is named by its SPIFFE ID, which the caller checks with
`peer_identity` after the handshake.

`DynamicTLS` holds the contexts of the current generation. A new generation affects only
handshakes that start after it; an open connection keeps the context it was made with, so a
rotation disturbs nothing in flight. `listener_context()` is one context to give a listening
server: its SNI callback moves every incoming handshake onto the current server context.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from connect.identity import Identity, PeerRefused, Refusal, peer_identity
from connect.resumption import ResumingClientContext, end_sessions
from connect.ssl_native import no_ticket_on_resumption, send_loaded_chain_only

log = logging.getLogger("meshlet.connect.tls")


class _LeafPEM(Protocol):
    @property
    def cert_pem(self) -> str: ...

    @property
    def key_pem(self) -> str: ...


class _RootsPEM(Protocol):
    @property
    def pem(self) -> str: ...

    @property
    def trust_domain(self) -> str: ...

    @property
    def grace_domains(self) -> tuple[str, ...]: ...


class Material(Protocol):
    """What one generation of contexts is built from: connect.leaf.Material in the agent, the
    pushed leaf in a data-plane process (which never loads the X.509 library that parses
    the former)."""

    @property
    def leaf(self) -> _LeafPEM: ...

    @property
    def bundle(self) -> _RootsPEM: ...

    @property
    def generation(self) -> int: ...


M = TypeVar("M", bound=Material)


def _load_leaf(ctx: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    # ssl only loads keys from paths. On Linux: anonymous memory files (memfd) named by
    # their /proc/self/fd path, so the key never touches a filesystem; elsewhere (or without
    # /proc) a private directory with 0600 files, gone at once.
    if hasattr(os, "memfd_create"):
        fds: list[int] = []
        try:
            for text in (cert_pem, key_pem):
                fds.append(os.memfd_create("meshlet-leaf", os.MFD_CLOEXEC))
                data = memoryview(text.encode())
                while data:
                    data = data[os.write(fds[-1], data) :]
            ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
            return
        except FileNotFoundError:
            pass  # no /proc mounted: the files below
        finally:
            for fd in fds:
                os.close(fd)
    import tempfile  # (and the shutil it loads): only where memfd cannot serve

    with tempfile.TemporaryDirectory(prefix="meshlet-tls-") as tmp:
        cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        for path, text in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        ctx.load_cert_chain(cert_path, key_path)


def _context(purpose: ssl.Purpose, material: Material) -> ssl.SSLContext:
    protocol = (
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    # Client contexts can offer a kept session to the same endpoint (connect.resumption);
    # a new generation's context starts without any.
    ctx = (ResumingClientContext if purpose is ssl.Purpose.SERVER_AUTH else ssl.SSLContext)(
        protocol
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=material.bundle.pem)
    _load_leaf(ctx, material.leaf.cert_pem, material.leaf.key_pem)
    # Send the leaf's chain as given, without the root OpenSSL would add (connect.ssl_native).
    send_loaded_chain_only(ctx)
    return ctx


# TLS 1.3 session tickets a server sends after each full handshake. One is all a sidecar's
# dialer keeps (connect.resumption offers the newest), and each costs the server about
# 0.3 ms of CPU: OpenSSL 3.0 builds a stateless ticket by encoding the session, decoding it
# again (the client's certificate with it, through the slow 3.0 decoders) and re-encoding.
# Measured in-process (MemoryBIO handshakes, P-256 mTLS): server CPU per handshake 1.65-1.78
# ms with Python's default of 2 tickets, 1.37-1.43 ms with 1, 1.10-1.36 ms with none.
SESSION_TICKETS = 1


def server_context(material: Material) -> ssl.SSLContext:
    """Accepts only clients with a certificate that chains to the bundle."""
    ctx = _context(ssl.Purpose.CLIENT_AUTH, material)
    ctx.num_tickets = SESSION_TICKETS
    # ... and none on a resumed connection: our dialers offer the full handshake's session
    # again and never take a resumed connection's ticket (connect.ssl_native).
    no_ticket_on_resumption(ctx)
    return ctx


def client_context(material: Material) -> ssl.SSLContext:
    """Presents the leaf and accepts only servers that chain to the bundle."""
    return _context(ssl.Purpose.SERVER_AUTH, material)


@dataclass(frozen=True)
class Contexts(Generic[M]):
    material: M
    server: ssl.SSLContext
    client: ssl.SSLContext


class DynamicTLS(Generic[M]):
    def __init__(self, material: M) -> None:
        self._current = self._build(material)
        self._listener: ssl.SSLContext | None = None

    @staticmethod
    def _build(material: M) -> Contexts[M]:
        return Contexts(material, server_context(material), client_context(material))

    def update(self, material: M) -> None:
        """Build the new generation's contexts first, then swap: a bad leaf leaves the old
        contexts in place (the exception reaches the caller)."""
        if material.generation <= self._current.material.generation:
            return
        old, self._current = self._current, self._build(material)
        end_sessions(old.client)

    @property
    def material(self) -> M:
        return self._current.material

    @property
    def trust_domain(self) -> str:
        return self._current.material.bundle.trust_domain

    @property
    def grace_domains(self) -> tuple[str, ...]:
        """A replaced CA's trust domains, still accepted for its grace (connect.ca_switch)."""
        return self._current.material.bundle.grace_domains

    def server(self) -> ssl.SSLContext:
        return self._current.server

    def client(self) -> ssl.SSLContext:
        return self._current.client

    def listener_context(self) -> ssl.SSLContext:
        """A context for `asyncio.start_server(ssl=...)` that always serves the current leaf."""
        if self._listener is None:
            base = server_context(self._current.material)

            def pick(sock: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
                sock.context = self._current.server

            base.sni_callback = pick
            self._listener = base
        return self._listener

    def peer(self, ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> Identity:
        """The verified peer's SPIFFE identity, or `PeerRefused` (logged, naming the check)."""
        return verified_peer(ssl_object, self.trust_domain, also=self.grace_domains)


def verified_peer(
    ssl_object: ssl.SSLObject | ssl.SSLSocket | None,
    trust_domain: str,
    now: datetime.datetime | None = None,
    also: tuple[str, ...] = (),
) -> Identity:
    if ssl_object is None:
        raise _refused(PeerRefused(Refusal.NO_SPIFFE_SAN, "not a TLS connection"))
    der = ssl_object.getpeercert(binary_form=True)
    if der is None:
        raise _refused(PeerRefused(Refusal.UNPARSABLE, "the peer sent no certificate"))
    try:
        return peer_identity(
            der,
            trust_domain=trust_domain,
            now=now or datetime.datetime.now(datetime.UTC),
            also=also,
        )
    except PeerRefused as err:
        raise _refused(err) from None


def _refused(err: PeerRefused) -> PeerRefused:
    log.warning("peer refused: %s", err)
    return err


def handshake_refusal(exc: BaseException) -> str:
    """What a failed handshake says about the peer's certificate, for a log line."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    return f"connection failed: {exc}"


class HandshakeRefused(Exception):
    """The TLS handshake with a peer failed; str() says why (OpenSSL's verify message)."""


async def accept_tls(
    writer: asyncio.StreamWriter, tls: DynamicTLS[M], *, timeout: float = 10.0
) -> Identity:
    """Upgrade an accepted TCP connection with the current server context and return the
    peer's identity. Refusals are logged with their reason and raised (the caller closes)."""
    try:
        async with asyncio.timeout(timeout):
            await writer.start_tls(tls.server())
    except (ssl.SSLError, OSError, TimeoutError) as exc:
        reason = handshake_refusal(exc)
        log.warning("inbound handshake refused: %s", reason)
        raise HandshakeRefused(reason) from exc
    return tls.peer(writer.get_extra_info("ssl_object"))
