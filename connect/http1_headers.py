"""HTTP/1.1 header rewriting for the sidecar, pure: hop-by-hop removal, framing, XFCC.

Headers travel as the parser hands them over: (name, value) byte strings, names in their
original case. Everything here works on those lists and returns the bytes to write, so the
proxy never builds a dict per request.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import overload

Headers = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1: the connection-specific fields a proxy must not forward, plus
# Transfer-Encoding and Content-Length (RFC 9112 §6-7), which this proxy re-frames itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"trailer",
    }
)
XFCC = b"x-forwarded-client-cert"
REQUEST_ID = b"x-request-id"
RETRIABLE = b"x-meshlet-retriable"
"""On a peer sidecar's own 502: the caller's sidecar may send the request to another
instance. `any`: it never reached the app (the app could not be connected to), so any
bodiless request may go again; `idempotent`: the app's connection closed before any byte of
an answer, so only an idempotent one may (RFC 9110 §9.2.2). Only sidecars write it: an
inbound sidecar removes it from its app's answers, an outbound sidecar from what it hands
its app."""
MESHLET_PREFIX = b"x-meshlet-"
"""Fields sidecars write for each other (RETRIABLE, x-meshlet-reason): an inbound sidecar
removes every one a caller sent, so none reaches its app as if a sidecar had said it."""
RETRY_ANY = b"any"
RETRY_IDEMPOTENT = b"idempotent"


@dataclass(frozen=True, slots=True)
class Framing:
    """How a message body is delimited, from the headers llhttp already validated."""

    chunked: bool
    length: int | None
    """Content-Length, or None (chunked, or read until close for responses)."""
    length_line: bytes = b""
    """`content-length: N\\r\\n`, built once per distinct length."""


@dataclass(slots=True)
class RequestHead:
    """What the proxy needs of a parsed request head, collected in one pass over headers."""

    host: bytes
    framing: Framing
    connection_tokens: frozenset[bytes]
    expect_continue: bool
    has_request_id: bool
    upgrade: bytes
    retriable: bytes = b""
    """The value of RETRIABLE (which is never forwarded itself), or empty."""
    hosts: int = 0
    """Host fields seen: more than one makes a request a 400 (RFC 9112 §3.2)."""


_KNOWN_CONNECTION = {
    b"keep-alive": frozenset({b"keep-alive"}),
    b"Keep-Alive": frozenset({b"keep-alive"}),
    b"close": frozenset({b"close"}),
    b"Close": frozenset({b"close"}),
    b"upgrade": frozenset({b"upgrade"}),
    b"Upgrade": frozenset({b"upgrade"}),
}
"""Connection values clients and servers send nearly always, parsed once."""


def _tokens(value: bytes) -> frozenset[bytes]:
    known = _KNOWN_CONNECTION.get(value)
    if known is not None:
        return known
    return frozenset(t.strip().lower() for t in value.split(b",") if t.strip())


# What a header field means to the proxy. Everything not listed is forwarded as it came.
_FORWARD, _HOST, _LENGTH, _TE, _CONNECTION, _EXPECT, _REQUEST_ID, _UPGRADE, _DROP = range(9)
_RETRIABLE = 9
_ROLES = {
    b"host": _HOST,
    b"content-length": _LENGTH,
    b"transfer-encoding": _TE,
    b"connection": _CONNECTION,
    b"expect": _EXPECT,
    REQUEST_ID: _REQUEST_ID,
    RETRIABLE: _RETRIABLE,
    **dict.fromkeys(HOP_BY_HOP - {b"content-length", b"transfer-encoding", b"connection"}, _DROP),
    b"upgrade": _UPGRADE,
}
# Connection tokens that name no field this proxy would otherwise forward.
_PLAIN_TOKENS = frozenset({b"keep-alive", b"close", b"upgrade", b"te"}) | HOP_BY_HOP
_COLON = b": "
_CRLF = b"\r\n"


class HeadRewriter:
    """One pass over a message's (name, value) fields: the framing and connection facts,
    and the fields to forward without the hop-by-hop ones (RFC 9110 §7.6.1) or `drop`.

    Names are classified through a cache keyed by the name as sent, so a field name seen
    before costs one dict lookup; the cache is bounded (names are attacker-chosen). Fields
    whose lower-case name starts with one of `drop_prefixes` are dropped too (decided on a
    cache miss, so it costs nothing per request)."""

    __slots__ = ("_cache", "_cache_size", "_prefixes", "_roles")

    def __init__(
        self,
        drop: frozenset[bytes] = frozenset(),
        cache_size: int = 2048,
        drop_prefixes: tuple[bytes, ...] = (),
    ) -> None:
        self._roles = {**_ROLES, **dict.fromkeys(drop, _DROP)}
        self._prefixes = drop_prefixes
        self._cache: dict[bytes, int] = {}
        self._cache_size = cache_size

    def _role(self, name: bytes) -> int:
        lower = name.lower()
        role = self._roles.get(lower, _FORWARD)
        if role == _FORWARD and lower.startswith(self._prefixes):
            role = _DROP
        if role == _FORWARD and b"_" in lower:
            # CGI-style servers (WSGI...) read `X_Forwarded_Client_Cert` as the field with
            # dashes: an underscored spelling of a field the proxy owns never goes on.
            twin = lower.replace(b"_", b"-")
            if self._roles.get(twin, _FORWARD) != _FORWARD or twin.startswith(self._prefixes):
                role = _DROP
        if len(self._cache) < self._cache_size:
            self._cache[name] = role
        return role

    def rewrite(self, headers: Sequence[tuple[bytes, bytes]], out: list[bytes]) -> RequestHead:
        """The facts of `headers`; appends to `out` the pieces that, joined, are the
        forwarded `Name: value\\r\\n` lines."""
        cache = self._cache
        start = len(out)
        host = b""
        chunked = False
        length: int | None = None
        connection = _NO_TOKENS
        expect = False
        has_id = False
        upgrade = b""
        retriable = b""
        hosts = 0
        for name, value in headers:
            role = cache.get(name)
            if role is None:
                role = self._role(name)
            if role == _FORWARD:
                out += (name, _COLON, value, _CRLF)
            elif role == _DROP:
                continue
            elif role == _HOST:
                host = value
                hosts += 1
                out += (name, _COLON, value, _CRLF)
            elif role == _LENGTH:
                length = int(value)
            elif role == _TE:
                # llhttp rejects anything but a final `chunked` alongside a body it must frame.
                chunked = value.lower().rstrip().endswith(b"chunked")
            elif role == _CONNECTION:
                connection = connection | _tokens(value) if connection else _tokens(value)
            elif role == _EXPECT:
                expect = value.strip().lower() == b"100-continue"
                out += (name, _COLON, value, _CRLF)
            elif role == _REQUEST_ID:
                has_id = True
                out += (name, _COLON, value, _CRLF)
            elif role == _UPGRADE:
                upgrade = value
            elif role == _RETRIABLE:
                retriable = value
        if connection and not connection <= _PLAIN_TOKENS:
            # Connection names other fields (rare): they are hop-by-hop too; drop them. Not
            # the ones the proxy itself acts on (Host, Expect, X-Request-Id): those are
            # end-to-end, and what was decided and promised on them must reach the app.
            named = connection - _PLAIN_TOKENS
            del out[start:]
            for name, value in headers:
                role = cache.get(name)
                if role is None:
                    role = self._role(name)
                if role in _FORWARDED_ROLES and (role != _FORWARD or name.lower() not in named):
                    out += (name, _COLON, value, _CRLF)
        if chunked:
            framing = CHUNKED_BODY
        elif length is None:
            framing = NO_LENGTH
        else:
            framing = _BY_LENGTH.get(length) or _framing_for(length)
        return RequestHead(
            host, framing, connection, expect, has_id, upgrade, retriable, hosts=hosts
        )


_FORWARDED_ROLES = frozenset({_FORWARD, _HOST, _EXPECT, _REQUEST_ID})


class ForwardedFields(Sequence[tuple[bytes, bytes]]):
    """The (name, value) fields of a request head as the app will receive them, read out of
    the head's pieces: from `start`, the forwarded fields as `HeadRewriter.rewrite` appends
    them (`name, ": ", value, CRLF`) up to `stop`, then the lines the sidecar writes itself
    (its X-Forwarded-Client-Cert, framing, upgrade) as whole `name: value\r\n` pieces.

    The request authorizer decides on this, not on what the caller sent: a field the sidecar
    removes (hop-by-hop, named in Connection, a caller's XFCC or x-meshlet-*) must not be able
    to satisfy a header permission for a request the app then gets without it, and a
    permission on XFCC sees the sidecar's value (as Envoy's RBAC filter sees it, after the
    connection manager's SANITIZE_SET). Built per authorized request as a view; the list is
    made only when a permission reads the fields."""

    __slots__ = ("_fields", "_lines", "_start", "_stop")

    def __init__(self, lines: list[bytes], start: int, stop: int) -> None:
        self._lines = lines
        self._start = start
        self._stop = stop
        self._fields: list[tuple[bytes, bytes]] | None = None

    def _all(self) -> list[tuple[bytes, bytes]]:
        fields = self._fields
        if fields is None:
            lines = self._lines
            fields = [(lines[i], lines[i + 2]) for i in range(self._start, self._stop, 4)]
            for line in b"".join(lines[self._stop :]).split(_CRLF):
                name, sep, value = line.partition(_COLON)
                if sep:
                    fields.append((name, value))
            self._fields = fields
        return fields

    def __len__(self) -> int:
        return len(self._all())

    @overload
    def __getitem__(self, i: int) -> tuple[bytes, bytes]: ...
    @overload
    def __getitem__(self, i: slice) -> list[tuple[bytes, bytes]]: ...
    def __getitem__(self, i: int | slice) -> tuple[bytes, bytes] | list[tuple[bytes, bytes]]:
        return self._all()[i]

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self._all())


# Framing values are shared, not built per message (a frozen dataclass is slow to create).
CHUNKED_BODY = Framing(True, None)
NO_LENGTH = Framing(False, None)
_NO_TOKENS: frozenset[bytes] = frozenset()
_BY_LENGTH: dict[int, Framing] = {}


def _framing_for(length: int) -> Framing:
    framing = _BY_LENGTH.get(length)
    if framing is None:
        framing = Framing(False, length, b"content-length: %d\r\n" % length)
        if len(_BY_LENGTH) < 4096:
            _BY_LENGTH[length] = framing
    return framing


def _xfcc_value(value: str) -> str:
    # Envoy quotes a value that contains a separator (`,`, `;`, `=`) and escapes quotes.
    if any(c in value for c in ',;="'):
        return '"' + value.replace('"', '\\"') + '"'
    return value


def xfcc_element(by_uri: str, cert_sha256: str, peer_uri: str) -> bytes:
    """One XFCC element as Envoy writes it: `By=<our URI>;Hash=<hex>;URI=<peer URI>`."""
    return (f"By={_xfcc_value(by_uri)};Hash={cert_sha256};URI={_xfcc_value(peer_uri)}").encode()


class _RequestIds:
    """Request IDs correlate logs; they must be unique, not secret. Each process draws a
    random 80-bit prefix and counts in the last 48 bits, so an ID costs one format."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)  # a forked worker draws its own

    def reseed(self) -> None:
        rng = random.Random(os.urandom(32))
        n = rng.getrandbits(80) << 48
        n = (n & ~(0xF000 << 64)) | (0x4000 << 64)  # version 4
        n = (n & ~(0xC000 << 48)) | (0x8000 << 48)  # RFC 4122 variant
        x = b"%032x" % n
        self.prefix = x[:8] + b"-" + x[8:12] + b"-" + x[12:16] + b"-" + x[16:20] + b"-"
        self.count = itertools.count(rng.getrandbits(40))

    def next(self) -> bytes:
        """A version-4-shaped UUID text, unique within the process, random across them."""
        return self.prefix + b"%012x" % (next(self.count) & 0xFFFFFFFFFFFF)


new_request_id = _RequestIds().next


def request_line(method: bytes, target: bytes) -> bytes:
    return method + b" " + target + b" HTTP/1.1\r\n"


STATUS_TEXT = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    400: b"Bad Request",
    403: b"Forbidden",
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def status_line(status: int, reason: bytes | None = None) -> bytes:
    text = reason if reason is not None else STATUS_TEXT.get(status, b"Unknown")
    return b"HTTP/1.1 " + str(status).encode() + b" " + text + b"\r\n"


def local_response(
    status: int, body: bytes, *, close: bool, extra: Sequence[tuple[bytes, bytes]] = ()
) -> bytes:
    """A complete short response the proxy answers itself (403, 400, 503...)."""
    lines = [status_line(status), b"content-type: text/plain\r\n"]
    lines.append(b"content-length: " + str(len(body)).encode() + b"\r\n")
    for name, value in extra:
        lines.append(name + b": " + value + b"\r\n")
    if close:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    lines.append(body)
    return b"".join(lines)


# Precomputed: the proxy answers these often and they never change.
FORBIDDEN = local_response(403, b"RBAC: access denied", close=False)
FORBIDDEN_CLOSE = local_response(403, b"RBAC: access denied", close=True)
BAD_REQUEST = local_response(400, b"Bad Request", close=True)
HEADERS_TOO_LARGE = local_response(431, b"Request Header Fields Too Large", close=True)
REQUEST_TIMEOUT = local_response(408, b"Request Timeout", close=True)
GATEWAY_TIMEOUT = local_response(504, b"upstream request timeout", close=True)
STREAM_TIMEOUT = local_response(408, b"stream timeout", close=True)
"""A route's idle timeout before the response head (Envoy's words)."""


def fault_abort(status: int) -> bytes:
    """A route's injected abort (Envoy's fault filter's answer)."""
    try:
        reason = HTTPStatus(status).phrase.encode()
    except ValueError:
        reason = b"Unknown"
    body = b"fault filter abort"
    return (
        status_line(status, reason)
        + b"content-type: text/plain\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def unavailable(reason: str, *, close: bool) -> bytes:
    clean = reason.encode("ascii", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
    return local_response(
        503, b"no healthy upstream", close=close, extra=((b"x-meshlet-reason", clean[:200]),)
    )


def bad_gateway(reason: str, *, close: bool, retriable: bytes = b"") -> bytes:
    """502; `retriable` (RETRY_ANY or RETRY_IDEMPOTENT) tells the calling sidecar it may try
    another instance (see RETRIABLE)."""
    clean = reason.encode("ascii", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
    extra = [(b"x-meshlet-reason", clean[:200])]
    if retriable:
        extra.append((RETRIABLE, retriable))
    return local_response(502, b"upstream connect error", close=close, extra=extra)
