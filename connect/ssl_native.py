"""OpenSSL calls Python's ssl module does not expose, made on the OpenSSL objects behind
`ssl.SSLContext`, `ssl.SSLObject` and `ssl.SSLSession` through ctypes. Each is an optimisation
with the plain ssl behaviour as its fallback, and none touches what a handshake verifies.

`send_loaded_chain_only(ctx)`: SSL_MODE_NO_AUTO_CHAIN. When a context's certificate comes
without intermediates, OpenSSL builds the chain it sends from the context's trust store at every
handshake (a chain verification of our own leaf) and sends what it built, the root included:
for a mesh leaf signed by the root itself, one more certificate on the wire, one more chain build
on our side and one more certificate for the peer to decode (OpenSSL 3.0's decoders are the
expensive part of a handshake) and check, for nothing: the peer trusts the root already or
refuses us anyway. Consul's leaf endpoint gives the intermediates a peer may need with the leaf
(connect.leaf.Leaf.chain_pem), and Envoy, fed the same leaf, sends exactly that chain.

`no_ticket_on_resumption(ctx)`: a server context that resumes a TLS 1.3 (or 1.2) session
issues no new ticket on that connection (SSL_CTX_set_session_ticket_cb, whose decrypt callback
answers SSL_TICKET_RETURN_USE; OpenSSL otherwise sends one ticket after every resumption and
offers no other way to turn that off). A ticket costs the server about a third of a resumed
handshake: OpenSSL 3.0 encodes the session, decodes it again (the client's certificate through
the slow decoders) and encodes it once more. A sidecar's dialer never keeps a resumed
connection's ticket (connect.resumption), so that work bought nothing; and without renewal a
session resumes only within the lifetime of its full handshake's ticket. A client that uses
each ticket once (BoringSSL's TLS 1.3 default, so Envoy) resumes every other connection
instead of every one.

`has_ticket(ssl_object)`: whether a client connection's session has its ticket yet, from
SSL_get_session, where ssl's `session` returns a copy made the same slow way (below).

`session_of(ssl_object)`: the connection's session as a `NativeSession`, a copy made with
SSL_SESSION_dup (below). ssl's `session` getter leaks on every read in CPython 3.10 to 3.12 and
3.13.0 (gh-116810: it copies the session through i2d/d2i, then takes the connection's own
session with SSL_get1_session and drops the copy's pointer): ~6.5 kB a read, the server's
certificate with it, for the process's life. `SESSION_GETTER_LEAKS` says whether this Python
does; where it does and the native calls are off, callers must not read `session` at all.

`offer_session(ssl_object, session)`: SSL_set_session with OpenSSL's own copy of the session.
ssl's `wrap_bio(session=)` copies it by encoding and decoding it (i2d then d2i_SSL_SESSION, a
workaround from before OpenSSL 1.1.1 had SSL_SESSION_dup), which decodes the server's
certificate again with OpenSSL 3.0's slow decoders: 140 to 300 us per resumed dial on this box,
as much as the rest of the dial. SSL_SESSION_dup copies the fields and takes references to the
certificates instead.

How the pointers are found: CPython keeps an OpenSSL pointer right after the object header of
each of these objects (`PySSLContext.ctx`, `PySSLSocket.ssl` after its socket weakref,
`PySSLSession.session`). Each pointer is used only after OpenSSL confirms it, reading through
it values Python reports (options, verify mode, the context an SSL belongs to, a session's time
and timeout, the context object a socket and a session point back to); any mismatch, another
interpreter, or a library that is not OpenSSL 3 leaves everything as plain ssl does it.
"""

from __future__ import annotations

import ctypes
import os
import platform
import ssl
import sys
import weakref
from functools import cache
from typing import Any

__all__ = [
    "SESSION_GETTER_LEAKS",
    "NativeSession",
    "confirmed",
    "has_ticket",
    "no_ticket_on_resumption",
    "offer_session",
    "send_loaded_chain_only",
    "session_of",
    "sessions_readable",
]

_LAYOUTS_READ = ((3, 11), (3, 12), (3, 13))
_P = ctypes.sizeof(ctypes.c_void_p)
_HEAD = object.__basicsize__  # PyObject_HEAD
_SSL_CTRL_MODE = 33
_SSL_MODE_NO_AUTO_CHAIN = 0x8
# An option without effect on our handshakes (renegotiation is TLS 1.2's, and refused anyway),
# toggled through Python to see it change through the pointer.
_PROBE_OPTION = getattr(ssl, "OP_NO_RENEGOTIATION", 0x40000000)
# ssl's verify modes as OpenSSL's SSL_VERIFY_* flags (PEER = 1, FAIL_IF_NO_PEER_CERT = 2).
_VERIFY_FLAGS = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}

_VERSION = sys.version_info[:3]
SESSION_GETTER_LEAKS = (3, 10, 0) <= _VERSION < (3, 12, 8) or (3, 13, 0) <= _VERSION < (3, 13, 1)
"""Whether `ssl.SSLObject.session` leaks a session per read (gh-116810; the fix reached 3.12
in its October 2024 backport and 3.13 in 3.13.1, 3.12.7 counted as leaking to be safe; 3.10
and 3.11 never got it: 3.11.7 leaks 6.5 kB a read on this box)."""


def _fn(lib: ctypes.CDLL, name: str, restype: object, *argtypes: object) -> Any:
    f = getattr(lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


class _Libssl:
    def __init__(self, lib: ctypes.CDLL) -> None:
        vp, c_int, c_long = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
        self.ctx_ctrl = _fn(lib, "SSL_CTX_ctrl", c_long, vp, c_int, c_long, vp)
        self.ctx_get_options = _fn(lib, "SSL_CTX_get_options", ctypes.c_uint64, vp)
        self.ctx_get_verify_mode = _fn(lib, "SSL_CTX_get_verify_mode", c_int, vp)
        self.get_ssl_ctx = _fn(lib, "SSL_get_SSL_CTX", vp, vp)
        self.is_server = _fn(lib, "SSL_is_server", c_int, vp)
        self.in_before = _fn(lib, "SSL_in_before", c_int, vp)
        self.get0_session = _fn(lib, "SSL_get_session", vp, vp)
        self.set_session = _fn(lib, "SSL_set_session", c_int, vp, vp)
        self.session_dup = _fn(lib, "SSL_SESSION_dup", vp, vp)
        self.session_free = _fn(lib, "SSL_SESSION_free", None, vp)
        self.session_get_time = _fn(lib, "SSL_SESSION_get_time", c_long, vp)
        self.session_get_timeout = _fn(lib, "SSL_SESSION_get_timeout", c_long, vp)
        self.session_has_ticket = _fn(lib, "SSL_SESSION_has_ticket", c_int, vp)
        self.ctx_set_session_ticket_cb = _fn(
            lib, "SSL_CTX_set_session_ticket_cb", c_int, vp, vp, _DecryptTicket, vp
        )


# SSL_TICKET_STATUS (what OpenSSL found in a client's ticket) -> SSL_TICKET_RETURN (what to do).
_TICKET_EMPTY, _TICKET_NO_DECRYPT, _TICKET_SUCCESS, _TICKET_SUCCESS_RENEW = 3, 4, 5, 6
_RETURN_ABORT, _RETURN_IGNORE_RENEW, _RETURN_USE = 0, 2, 3
_TICKET_DECISION = {
    # A good ticket: resume, no new ticket. OpenSSL reports every good TLS 1.3 ticket as
    # SUCCESS_RENEW (and a TLS 1.2 one under a ticket key callback's rotated key, which ssl
    # never sets); its default then renews.
    _TICKET_SUCCESS: _RETURN_USE,
    _TICKET_SUCCESS_RENEW: _RETURN_USE,
    # As by default: no resumption, so a full handshake that issues its tickets.
    _TICKET_EMPTY: _RETURN_IGNORE_RENEW,
    _TICKET_NO_DECRYPT: _RETURN_IGNORE_RENEW,
}

# SSL_CTX_decrypt_session_ticket_fn(SSL *, SSL_SESSION *, keyname, keyname_len, status, arg)
_DecryptTicket = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
    ctypes.c_int, ctypes.c_void_p,
)  # fmt: skip


def _use_without_renewal(*args: int | None) -> int:
    """(ssl, session, keyname, keyname_len, status, arg): the decision for `status`. Anything
    not listed aborts the handshake (fail closed)."""
    status = args[4]
    return _TICKET_DECISION.get(status, _RETURN_ABORT) if status is not None else _RETURN_ABORT


# One C callable for every context, alive as long as the process (contexts point to it).
_USE_WITHOUT_RENEWAL = _DecryptTicket(_use_without_renewal)


@cache
def _libssl() -> _Libssl | None:
    """libssl as the `_ssl` extension links it (the very library whose objects ssl made).

    None (plain ssl everywhere) outside the CPython releases whose object layouts were read
    for this (3.11 to 3.13), with another library than OpenSSL 3, or when the operator says
    MESHLET_SSL_NATIVE=0."""
    if os.environ.get("MESHLET_SSL_NATIVE", "1") == "0":
        return None
    if (
        platform.python_implementation() != "CPython"
        or sys.version_info[:2] not in _LAYOUTS_READ
        or not ssl.OPENSSL_VERSION.startswith("OpenSSL 3.")
    ):
        return None
    try:
        return _Libssl(ctypes.CDLL(ssl._ssl.__file__))  # type: ignore[attr-defined]
    except (OSError, AttributeError):
        return None


def _field(obj: object, offset: int) -> int:
    return ctypes.c_void_p.from_address(id(obj) + offset).value or 0


def _ctx_pointer(ctx: ssl.SSLContext) -> int:
    """The context's SSL_CTX, 0 if it cannot be confirmed; kept on the context (fixed for its
    life)."""
    known: int | None = getattr(ctx, "_meshlet_ssl_ctx", None)
    if known is None:
        known = ctx._meshlet_ssl_ctx = _confirmed_ctx_pointer(ctx)  # type: ignore[attr-defined]
    return known


def _confirmed_ctx_pointer(ctx: ssl.SSLContext) -> int:
    lib = _libssl()
    ptr = _field(ctx, _HEAD)
    if lib is None or not ptr:
        return 0
    if lib.ctx_get_options(ptr) != int(ctx.options):
        return 0
    if lib.ctx_get_verify_mode(ptr) != _VERIFY_FLAGS[ctx.verify_mode]:
        return 0
    # Equal values could be a coincidence: change one through Python, see it through the pointer.
    before = ctx.options
    try:
        ctx.options = before ^ _PROBE_OPTION
        seen = lib.ctx_get_options(ptr) == int(ctx.options)
    finally:
        ctx.options = before
    return ptr if seen and lib.ctx_get_options(ptr) == int(before) else 0


def send_loaded_chain_only(ctx: ssl.SSLContext) -> bool:
    """Make `ctx` send the certificate chain it loaded and nothing it could build. Returns
    whether it could (False: unchanged)."""
    lib = _libssl()
    ptr = _ctx_pointer(ctx)
    if lib is None or not ptr:
        return False
    mode = lib.ctx_ctrl(ptr, _SSL_CTRL_MODE, _SSL_MODE_NO_AUTO_CHAIN, None)
    return bool(mode & _SSL_MODE_NO_AUTO_CHAIN)


def no_ticket_on_resumption(ctx: ssl.SSLContext) -> bool:
    """Make server context `ctx` issue no ticket on a resumed connection (full handshakes keep
    their `num_tickets`). Returns whether it could (False: unchanged, OpenSSL's default)."""
    lib = _libssl()
    ptr = _ctx_pointer(ctx)
    if lib is None or not ptr:
        return False
    return bool(lib.ctx_set_session_ticket_cb(ptr, None, _USE_WITHOUT_RENEWAL, None) == 1)


def _ssl_pointer(lib: _Libssl, ssl_object: ssl.SSLObject) -> int:
    """The connection's SSL, 0 unless confirmed: the PySSLSocket points back to the context
    object whose confirmed SSL_CTX the SSL belongs to."""
    ctx = ssl_object.context
    ctx_ptr = _ctx_pointer(ctx)
    if not ctx_ptr:
        return 0
    sock = ssl_object._sslobj  # type: ignore[attr-defined]
    # PySSLSocket: Socket (weakref), ssl, ctx (the PySSLContext it was made by).
    ssl_ptr = _field(sock, _HEAD + _P)
    if not ssl_ptr or _field(sock, _HEAD + 2 * _P) != id(ctx):
        return 0
    return ssl_ptr if lib.get_ssl_ctx(ssl_ptr) == ctx_ptr else 0


def has_ticket(ssl_object: ssl.SSLObject) -> bool | None:
    """Whether the connection's current session has a ticket (a TLS 1.3 client's, once the
    server sent one), read without the copy ssl's `session` makes; None if unconfirmed."""
    lib = _libssl()
    ssl_ptr = _ssl_pointer(lib, ssl_object) if lib is not None else 0
    if lib is None or not ssl_ptr:
        return None
    session = lib.get0_session(ssl_ptr)
    return bool(session and lib.session_has_ticket(session))


class NativeSession:
    """A copy of a connection's TLS session, freed with this object: what `offer_session`
    offers to later connections of the same context. `time`, `timeout` and `has_ticket` as
    ssl.SSLSession has them."""

    __slots__ = ("_context", "_lib", "_ptr", "has_ticket", "time", "timeout")

    def __init__(self, lib: _Libssl, ptr: int, context: ssl.SSLContext) -> None:
        self._lib, self._ptr = lib, ptr
        # Weak: the context's session cache holds these, and the context must stay freeable.
        self._context = weakref.ref(context)
        self.has_ticket = bool(lib.session_has_ticket(ptr))
        self.time = int(lib.session_get_time(ptr))
        self.timeout = int(lib.session_get_timeout(ptr))

    def pointer_for(self, ctx: ssl.SSLContext) -> int:
        """The SSL_SESSION, for a connection of `ctx` only (the context it was read from)."""
        return self._ptr if self._context() is ctx else 0

    def __del__(self) -> None:
        self._lib.session_free(self._ptr)


def sessions_readable() -> bool:
    """Whether a connection's session can be read without a leak: natively, or by ssl's
    getter where it does not leak."""
    return _libssl() is not None or not SESSION_GETTER_LEAKS


def confirmed(ssl_object: ssl.SSLObject) -> bool:
    """Whether the native calls reach this connection's SSL (False: plain ssl only)."""
    lib = _libssl()
    return lib is not None and bool(_ssl_pointer(lib, ssl_object))


def session_of(ssl_object: ssl.SSLObject) -> NativeSession | None:
    """A copy of the connection's current session, without ssl's leaking getter; None if it
    has none yet or the connection is not `confirmed`."""
    lib = _libssl()
    ssl_ptr = _ssl_pointer(lib, ssl_object) if lib is not None else 0
    if lib is None or not ssl_ptr:
        return None
    current = lib.get0_session(ssl_ptr)
    # A copy (fields copied, certificates referenced), not the connection's own session:
    # OpenSSL marks that one not resumable if the connection ends without a close_notify.
    ptr = lib.session_dup(current) if current else 0
    return NativeSession(lib, ptr, ssl_object.context) if ptr else None


def offer_session(ssl_object: ssl.SSLObject, session: ssl.SSLSession | NativeSession) -> bool:
    """Offer `session` on a client `ssl_object` whose handshake has not started, without the
    copy ssl makes. False (nothing done) unless every pointer is confirmed; the caller then
    offers an ssl.SSLSession the plain way (a NativeSession not at all)."""
    lib = _libssl()
    ssl_ptr = _ssl_pointer(lib, ssl_object) if lib is not None else 0
    if lib is None or not ssl_ptr or lib.is_server(ssl_ptr) or not lib.in_before(ssl_ptr):
        return False
    ctx = ssl_object.context
    if isinstance(session, NativeSession):
        sess_ptr = session.pointer_for(ctx)
        if not sess_ptr:
            return False
    else:
        # PySSLSession: session, ctx (the PySSLContext of the connection it was read from).
        sess_ptr = _field(session, _HEAD)
        if not sess_ptr or _field(session, _HEAD + _P) != id(ctx):
            return False
        if (
            lib.session_get_time(sess_ptr) != session.time
            or lib.session_get_timeout(sess_ptr) != session.timeout
            or bool(lib.session_has_ticket(sess_ptr)) != session.has_ticket
        ):
            return False
    if lib.get0_session(ssl_ptr):
        return False  # a session is set already: not ours to replace
    # Each connection gets its own copy, as with ssl: OpenSSL marks a connection's session not
    # resumable when the connection ends without a close_notify (ssl_clear_bad_session), which
    # must not reach the kept session. SSL_SESSION_dup copies fields and takes references to
    # the certificates, where ssl's copy encodes and decodes them.
    dup = lib.session_dup(sess_ptr)
    if not dup:
        return False
    try:
        return bool(lib.set_session(ssl_ptr, dup) == 1)
    finally:
        lib.session_free(dup)  # the connection holds its own reference
