"""HTTP/1.1 header rewriting for the sidecar, pure: hop-by-hop removal, framing, XFCC.

Headers travel as the parser hands them over: (name, value) byte strings, names in their
original case. Everything here works on those lists and returns the bytes to write, so the
proxy never builds a dict per request.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class Framing:
    """How a message body is delimited, from the headers llhttp already validated."""

    chunked: bool
    length: int | None
    """Content-Length, or None (chunked, or read until close for responses)."""


@dataclass(slots=True)
class RequestHead:
    """What the proxy needs of a parsed request head, collected in one pass over headers."""

    host: bytes
    framing: Framing
    connection_tokens: frozenset[bytes]
    expect_continue: bool
    has_request_id: bool
    upgrade: bytes


def _tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",") if t.strip()}


def scan(headers: Sequence[tuple[bytes, bytes]]) -> RequestHead:
    """One pass over a request's (or response's) headers: framing and connection facts."""
    host = b""
    chunked = False
    length: int | None = None
    connection: set[bytes] = set()
    expect = False
    has_id = False
    upgrade = b""
    for name, value in headers:
        lower = name.lower()
        if lower == b"host":
            host = value
        elif lower == b"content-length":
            length = int(value)
        elif lower == b"transfer-encoding":
            # llhttp rejects anything but a final `chunked` alongside a body it must frame.
            chunked = value.lower().rstrip().endswith(b"chunked")
        elif lower == b"connection":
            connection |= _tokens(value)
        elif lower == b"expect":
            expect = value.strip().lower() == b"100-continue"
        elif lower == REQUEST_ID:
            has_id = True
        elif lower == b"upgrade":
            upgrade = value
    if chunked:
        framing = CHUNKED_BODY
    elif length is None:
        framing = NO_LENGTH
    else:
        framing = _framing_for(length)
    return RequestHead(
        host, framing, frozenset(connection) if connection else _NO_TOKENS, expect, has_id, upgrade
    )


# Framing values are shared, not built per message (a frozen dataclass is slow to create).
CHUNKED_BODY = Framing(True, None)
NO_LENGTH = Framing(False, None)
_NO_TOKENS: frozenset[bytes] = frozenset()
_BY_LENGTH: dict[int, Framing] = {}


def _framing_for(length: int) -> Framing:
    framing = _BY_LENGTH.get(length)
    if framing is None:
        framing = Framing(False, length)
        if len(_BY_LENGTH) < 4096:
            _BY_LENGTH[length] = framing
    return framing


def forwardable(
    headers: Sequence[tuple[bytes, bytes]],
    connection_tokens: frozenset[bytes],
    drop: frozenset[bytes] = frozenset(),
) -> list[bytes]:
    """`Name: value\\r\\n` lines to forward: no hop-by-hop field, none named in Connection,
    none in `drop` (lower-case)."""
    out: list[bytes] = []
    for name, value in headers:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in connection_tokens or lower in drop:
            continue
        out.append(name + b": " + value + b"\r\n")
    return out


def _xfcc_value(value: str) -> str:
    # Envoy quotes a value that contains a separator (`,`, `;`, `=`) and escapes quotes.
    if any(c in value for c in ',;="'):
        return '"' + value.replace('"', '\\"') + '"'
    return value


def xfcc_element(by_uri: str, cert_sha256: str, peer_uri: str) -> bytes:
    """One XFCC element as Envoy writes it: `By=<our URI>;Hash=<hex>;URI=<peer URI>`."""
    return (f"By={_xfcc_value(by_uri)};Hash={cert_sha256};URI={_xfcc_value(peer_uri)}").encode()


# Request IDs correlate logs; they are not secrets, so a seeded PRNG (no syscall per request)
# is enough, as for Envoy's UUIDs.
_ids = random.Random(os.urandom(32))


def new_request_id() -> bytes:
    """A random (version 4) UUID in its text form, without building a uuid.UUID."""
    n = _ids.getrandbits(128)
    n = (n & ~(0xF000 << 64)) | (0x4000 << 64)  # version 4
    n = (n & ~(0xC000 << 48)) | (0x8000 << 48)  # RFC 4122 variant
    x = b"%032x" % n
    return x[:8] + b"-" + x[8:12] + b"-" + x[12:16] + b"-" + x[16:20] + b"-" + x[20:]


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


def unavailable(reason: str, *, close: bool) -> bytes:
    clean = reason.encode("ascii", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
    return local_response(
        503, b"no healthy upstream", close=close, extra=((b"x-meshlet-reason", clean[:200]),)
    )


def bad_gateway(reason: str, *, close: bool) -> bytes:
    clean = reason.encode("ascii", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
    return local_response(
        502, b"upstream connect error", close=close, extra=((b"x-meshlet-reason", clean[:200]),)
    )
