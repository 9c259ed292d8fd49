"""Request-target forms (RFC 9112 §3.2), pure: what the inbound listener authorizes and
forwards for each, and what it refuses with 400."""

from __future__ import annotations

import pytest

from connect.http_target import BadTarget, TargetParser, with_authority


@pytest.mark.parametrize(
    ("method", "raw", "want"),
    [
        (b"GET", b"/a/../b?x#f", (b"/b?x", b"")),
        (b"GET", b"http://api/admin", (b"/admin", b"api")),
        (b"GET", b"http://api:80/admin?x", (b"/admin?x", b"api:80")),
        (b"GET", b"HTTPS://Api.Example/p/./q", (b"/p/q", b"Api.Example")),
        (b"GET", b"http://api", (b"/", b"api")),
        (b"GET", b"http://api?x=1", (b"/?x=1", b"api")),
        (b"GET", b"http://api#frag", (b"/", b"api")),
        (b"GET", b"http://[::1]:8080/x", (b"/x", b"[::1]:8080")),
        (b"GET", b"http://10.0.0.1/x", (b"/x", b"10.0.0.1")),
        (b"OPTIONS", b"*", (b"*", b"")),
    ],
)
def test_accepted_targets(method: bytes, raw: bytes, want: tuple[bytes, bytes]) -> None:
    assert TargetParser()(method, raw) == want


@pytest.mark.parametrize(
    ("method", "raw", "reason"),
    [
        (b"GET", b"*", "only valid for OPTIONS"),
        (b"CONNECT", b"api:443", "not a forward proxy"),
        (b"CONNECT", b"/x", "not a forward proxy"),
        (b"CONNECT", b"http://api/x", "not a forward proxy"),
        (b"GET", b"api:80", "unsupported request target"),
        (b"GET", b"ftp://api/x", "unsupported scheme"),
        (b"GET", b"http://user:pw@api/x", "userinfo"),
        (b"GET", b"http:///x", "invalid authority"),
        (b"GET", b"http://api:/x", "invalid authority"),
        (b"GET", b"http://a%2fb/x", "invalid authority"),
        (b"GET", b"http://api:123456/x", "invalid authority"),
        (b"GET", b"http://api/a%00", "%00"),
        (b"GET", b"", "unsupported request target"),
    ],
)
def test_refused_targets(method: bytes, raw: bytes, reason: str) -> None:
    with pytest.raises(BadTarget, match=reason):
        TargetParser()(method, raw)


def test_the_mode_applies_to_absolute_form_too() -> None:
    assert TargetParser("merge_slashes")(b"GET", b"http://api//admin") == (b"/admin", b"api")
    with pytest.raises(BadTarget, match="not in normal form"):
        TargetParser("reject")(b"GET", b"http://api//admin")


def test_the_authority_replaces_every_host() -> None:
    headers = [(b"Host", b"evil"), (b"X-A", b"1"), (b"HOST", b"evil2")]
    assert with_authority(headers, b"api") == ([(b"X-A", b"1"), (b"host", b"api")], True)
    assert with_authority([(b"X-A", b"1")], b"api") == ([(b"X-A", b"1"), (b"host", b"api")], False)
