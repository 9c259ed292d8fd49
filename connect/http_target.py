"""The request target of an inbound HTTP/1 request: its form (RFC 9112 §3.2), then one
normalization (intentions.path_normalization) whose result is both authorized and forwarded.

* origin-form (`/path?query`): normalized.
* absolute-form (`http://api:8080/path?query`): the origin-form of its path and query is
  normalized as above; the authority is returned so the caller puts it in Host. RFC 9112
  §3.2.2: a server receiving the absolute-form "MUST ignore the received Host header field (if
  any) and instead use the host information of the request-target"; Envoy's HTTP/1 codec does
  the same. So the app sees one Host, the authority, which is also what was authorized. Only
  `http` and `https` with a non-empty authority without userinfo are accepted (RFC 9110
  §4.2.1, §4.2.4).
* asterisk-form (`*`): only for OPTIONS, forwarded as it is (path rules never match it).
* authority-form (`host:port`): only for CONNECT, which the sidecar refuses: it is not a
  forward proxy.

Anything else is a BadTarget, which the listener answers with 400.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from intentions.errors import BadRequest
from intentions.path_normalization import PathNormalization, target_normalizer

__all__ = ["BadTarget", "TargetParser", "with_authority"]


class BadTarget(Exception):
    """A request target the sidecar refuses with 400; str() says why."""


# scheme "://" authority, then the rest of the target (path-abempty, query, fragment).
_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)", re.DOTALL)
# host (a DNS name or address, or a bracketed IPv6 literal) and an optional port.
_AUTHORITY = re.compile(rb"(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_SCHEMES = frozenset({b"http", b"https"})
_ASTERISK = (b"*", b"")
_NO_AUTHORITY = b""


class TargetParser:
    """Built once per listener with its normalization mode; called once per request with the
    method and the target as sent. Returns (target, authority): the origin-form target (or
    `*`) that is authorized and forwarded, and for an absolute-form target its authority,
    the Host to forward in place of any Host sent (else empty). A tuple, not an object: this
    runs for every request."""

    __slots__ = ("_normalize",)

    def __init__(self, mode: PathNormalization = "base") -> None:
        self._normalize: Callable[[bytes], bytes] = target_normalizer(mode)

    def __call__(self, method: bytes, raw: bytes) -> tuple[bytes, bytes]:
        if raw[:1] == b"/" and method != b"CONNECT":
            try:
                return self._normalize(raw), _NO_AUTHORITY
            except BadRequest as err:
                raise BadTarget(str(err)) from None
        return self._other_forms(method, raw)

    def _other_forms(self, method: bytes, raw: bytes) -> tuple[bytes, bytes]:
        if method == b"CONNECT":
            raise BadTarget("CONNECT is refused: the sidecar is not a forward proxy")
        if raw == b"*":
            if method != b"OPTIONS":
                raise BadTarget("the asterisk-form target is only valid for OPTIONS")
            return _ASTERISK
        m = _ABSOLUTE.fullmatch(raw)
        if m is None:
            raise BadTarget(f"unsupported request target {raw[:100]!r}")
        scheme, authority, rest = m.groups()
        if scheme.lower() not in _SCHEMES:
            raise BadTarget(f"unsupported scheme {scheme[:20]!r} in an absolute-form target")
        if b"@" in authority:
            raise BadTarget("userinfo in an absolute-form target")
        if _AUTHORITY.fullmatch(authority) is None:
            raise BadTarget(f"invalid authority {authority[:100]!r}")
        if rest[:1] != b"/":
            rest = b"/" + rest  # RFC 9112 §3.2.1: an empty path is sent as `/`
        try:
            return self._normalize(rest), authority
        except BadRequest as err:
            raise BadTarget(str(err)) from None


def with_authority(
    headers: list[tuple[bytes, bytes]], authority: bytes
) -> tuple[list[tuple[bytes, bytes]], bool]:
    """`headers` with every Host field replaced by one carrying `authority` (RFC 9112 §3.2.2),
    and whether the request sent a Host at all (an HTTP/1.1 request must, whatever its form)."""
    kept = [(name, value) for name, value in headers if name.lower() != b"host"]
    sent = len(kept) != len(headers)
    kept.append((b"host", authority))
    return kept, sent
