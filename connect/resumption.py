"""TLS session resumption for sidecar-to-sidecar dials.

asyncio's `create_connection` has no `session=`; both event loops (uvloop's SSLProtocol and
asyncio's) build the connection's `SSLObject` with `sslcontext.wrap_bio(...)`. A
`ResumingClientContext` is an `ssl.SSLContext` whose `wrap_bio` offers the session that the
dial in progress chose (`offering`, a context variable the loop carries from the dialing task
into the handshake's callbacks). Nothing else changes: the handshake still verifies the server
(a resumed TLS 1.3 session proves the server holds the secret of a handshake that verified
its certificate), and the caller still checks the server's SPIFFE identity, which OpenSSL keeps
in the session.

Sessions are kept per context (`sessions_of`) and per dial key: endpoint and the identity the
caller expects, so a session is never offered to another endpoint or for another expected
service. A new client context (leaf or roots rotated) starts with no sessions. A session is
dropped at the earliest of the server leaf's expiry, the session's own lifetime, and `MAX_AGE`.

TLS 1.3 tickets arrive after the handshake, so `keep` holds the connection's `SSLObject` and the
next `offer` for that key takes its session once it has a ticket. That session is offered again
on every dial until the entry expires; a resumed dial does not replace it with the ticket the
server sent on that connection. Reading a session out of a connection costs ~130 us (Python's
ssl copies it through i2d/d2i_SSL_SESSION, which decodes the server's certificate again with
OpenSSL 3.0's slow decoders), as much as the rest of a resumed dial's Python work. Servers
accept a ticket more than once (OpenSSL's and BoringSSL's tickets are stateless, so Envoy's and
ours do); RFC 8446 C.4 advises fresh tickets so that a passive observer cannot link a client's
connections, which between two sidecars their addresses already do. A server that refuses a
ticket makes a full handshake, whose session then replaces the refused one.

Whoever replaces a client context ends its sessions (`end_sessions`; connect.tls.DynamicTLS on
each rotation). The cache hangs off the context, and a kept `SSLObject` refers back to the
context from C, a reference the cyclic collector cannot see: until its entries are dropped,
a context that is no longer used (its SSL_CTX, roots and leaf, the kept connections' SSL
objects) can never be freed.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Hashable, Iterator
from contextvars import ContextVar
from typing import Any

from connect.ssl_native import (
    SESSION_GETTER_LEAKS,
    NativeSession,
    confirmed,
    offer_session,
    session_of,
    sessions_readable,
)

__all__ = [
    "MAX_AGE",
    "ResumingClientContext",
    "SessionCache",
    "end_sessions",
    "offering",
    "sessions_of",
]

MAX_AGE = 300.0
"""Seconds a session is offered at most (OpenSSL's server ticket lifetime is 7200)."""

Session = ssl.SSLSession | NativeSession
"""A kept session: read natively (connect.ssl_native.session_of) wherever the native calls
reach the connection, by ssl's getter only where that does not leak."""

_OFFER: ContextVar[tuple[ResumingClientContext, Session] | None] = ContextVar(
    "meshlet_tls_session_offer", default=None
)


class ResumingClientContext(ssl.SSLContext):
    """A client context that offers the session chosen by `offering` (if made by this very
    context) and owns a `SessionCache`."""

    _meshlet_sessions: SessionCache

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        obj = super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        if session is None and not server_side:
            offer = _OFFER.get()
            if (
                offer is not None
                and offer[0] is self
                and not offer_session(obj, offer[1])
                and isinstance(offer[1], ssl.SSLSession)
            ):
                with contextlib.suppress(ValueError):  # not from this context: no offer
                    obj.session = offer[1]  # ssl's way: a copy of the session
        return obj


def sessions_of(ctx: ssl.SSLContext) -> SessionCache | None:
    """The context's session cache; None for a context that cannot offer sessions, and where
    sessions cannot be read without a leak (native calls off on a leaking CPython)."""
    if not isinstance(ctx, ResumingClientContext) or not sessions_readable():
        return None
    try:
        return ctx._meshlet_sessions
    except AttributeError:
        cache = ctx._meshlet_sessions = SessionCache()
        return cache


def end_sessions(ctx: ssl.SSLContext) -> None:
    """`ctx` dials no more: its sessions are dropped and no new one is kept (a dial with it
    still in flight finishes without one), so nothing it kept holds it alive."""
    cache = getattr(ctx, "_meshlet_sessions", None)
    if isinstance(cache, SessionCache):
        cache.close()


@contextlib.contextmanager
def offering(ctx: ssl.SSLContext, session: Session | None) -> Iterator[None]:
    """Offer `session` to handshakes that `ctx` starts in this context (the dialing task and
    the loop callbacks created while dialing)."""
    if session is None or not isinstance(ctx, ResumingClientContext):
        yield
        return
    token = _OFFER.set((ctx, session))
    try:
        yield
    finally:
        _OFFER.reset(token)


class _Kept:
    __slots__ = ("der", "expires", "session", "source")

    def __init__(self, source: ssl.SSLObject, der: bytes, expires: float) -> None:
        self.source: ssl.SSLObject | None = source
        self.session: Session | None = None
        self.der = der
        self.expires = expires


class SessionCache:
    """The newest session per dial key, for one client context."""

    def __init__(self, limit: int = 4096, max_age: float = MAX_AGE) -> None:
        self._kept: dict[Hashable, _Kept] = {}
        self._limit = limit
        self._max_age = max_age
        self._closed = False
        self.offered = 0
        """Dials that offered a session (for stats and tests)."""

    def offer(self, key: Hashable) -> Session | None:
        kept = self._kept.get(key)
        if kept is None:
            return None
        now = time.time()
        source = kept.source
        if source is not None:
            session = _read_session(source)
            if session is not None and session.has_ticket:
                kept.session = session
                kept.source = None
                kept.expires = min(kept.expires, session.time + session.timeout)
        if kept.expires <= now:
            del self._kept[key]
            return None
        if kept.session is not None:
            self.offered += 1
        return kept.session

    def keep(self, key: Hashable, ssl_object: Any) -> None:
        """After a dial whose server was verified: the session of a full handshake (once it
        has its ticket) is the one to offer for `key` until the entry expires; a resumed dial
        changes nothing, so every resumption uses a session from a full handshake at most
        `max_age` seconds ago."""
        if self._closed or not isinstance(ssl_object, ssl.SSLObject):
            return
        der = ssl_object.getpeercert(True) or b""
        kept = self._kept.get(key)
        if kept is not None and kept.der == der:
            if not ssl_object.session_reused:
                kept.source = ssl_object  # a refused or a first session: this one next
            return
        if ssl_object.session_reused:
            return  # only a full handshake starts an entry (and its MAX_AGE)
        not_after = _not_after(ssl_object)
        if not_after is None:
            return
        if len(self._kept) >= self._limit:
            self._kept.clear()
        self._kept[key] = _Kept(ssl_object, der, min(not_after, time.time() + self._max_age))

    def forget(self, key: Hashable) -> None:
        self._kept.pop(key, None)

    def close(self) -> None:
        """Drop every entry and keep none from now on (see `end_sessions`)."""
        self._closed = True
        self._kept.clear()

    def __len__(self) -> int:
        return len(self._kept)


def _read_session(ssl_object: ssl.SSLObject) -> Session | None:
    """The connection's session; None where only ssl's getter could read it and it leaks a
    session per read (connect.ssl_native.SESSION_GETTER_LEAKS): no resumption then."""
    session = session_of(ssl_object)
    if session is not None or confirmed(ssl_object) or SESSION_GETTER_LEAKS:
        return session
    return ssl_object.session


def _not_after(ssl_object: ssl.SSLObject) -> float | None:
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    not_after = cert.get("notAfter")
    if not isinstance(not_after, str):
        return None
    return float(ssl.cert_time_to_seconds(not_after))
