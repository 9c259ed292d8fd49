"""Issue 10 items 2 and 3, as attacks over real sockets: a mesh peer (mTLS with its own leaf)
writes request targets by hand to an InboundHTTP whose L7 intentions deny `/admin`, or allow
only `/public`; a raw-recording app behind it shows what really arrived. In every path
normalization mode, each target is decided on one normalized path, and that same path (with
the query, without a fragment) is what the app receives; what cannot be normalized safely is a
400 that reaches nobody."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from connect.authz import intentions_authorizers
from connect.balancer import BalancerConfig, Target, compile_balancer
from connect.cluster import fixed_endpoints
from connect.dial import Upstream
from connect.http1 import InboundHTTP, OutboundHTTP
from connect.inbound import InboundGate
from connect.seams import PeerCache
from connect.stats import ProxyStats
from intentions.engine import Identity, Snapshot, compile_snapshot
from intentions.entries import load_entry
from intentions.path_normalization import MODES, PathNormalization
from tests.connect.proxy_test_ca import ProxyTestCA, spiffe
from tests.connect.recording_app import RecordingApp, start_recording_app
from tests.connect.test_http_proxy import read_response


def _snapshot(*permissions: dict[str, Any]) -> Snapshot:
    source = {"Name": "web", "Permissions": list(permissions)}
    entry = load_entry({"Kind": "service-intentions", "Name": "api", "Sources": [source]})
    # Default allow: what an allow-list must not fall through to.
    return compile_snapshot([entry], default_allow=True)


POLICIES = {
    "deny_admin": _snapshot({"Action": "deny", "HTTP": {"PathPrefix": "/admin"}}),
    "allow_public": _snapshot(
        {"Action": "allow", "HTTP": {"PathExact": "/public"}},
        {"Action": "deny", "HTTP": {"PathPrefix": "/"}},
    ),
}


def allowed(policy: str, target: bytes) -> bool:
    """The decision each policy must make on the normalized target."""
    path = target.split(b"?", 1)[0]
    if policy == "deny_admin":
        return not path.startswith(b"/admin")
    # `OPTIONS *` matches no path rule: the default policy (allow) decides, as in Envoy.
    return path in (b"/public", b"*")


_ = None  # refused with 400
# method, target; then what the app must receive in base, merge_slashes,
# decode_and_merge_slashes and reject modes (None: 400, nothing reaches the app).
CASES: list[tuple[str, str, str | None, str | None, str | None, str | None]] = [
    ("GET", "/public", "/public", "/public", "/public", "/public"),
    ("GET", "/admin", "/admin", "/admin", "/admin", "/admin"),
    ("GET", "/admin/", "/admin/", "/admin/", "/admin/", "/admin/"),
    ("GET", "/admin/../public", "/public", "/public", "/public", _),
    ("GET", "//admin", "//admin", "/admin", "/admin", _),
    ("GET", "/ADMIN", "/ADMIN", "/ADMIN", "/ADMIN", "/ADMIN"),
    ("GET", "/%2Fadmin", "/%2Fadmin", "/%2Fadmin", "/admin", _),
    ("GET", "/%2fadmin", "/%2fadmin", "/%2fadmin", "/admin", _),
    ("GET", "/public/..%2fadmin", "/public/..%2fadmin", "/public/..%2fadmin", "/admin", _),
    ("GET", "/public/%2e%2e/admin", "/admin", "/admin", "/admin", _),
    ("GET", "/public/%2E./admin", "/admin", "/admin", "/admin", _),
    ("GET", "/;x/admin", "/;x/admin", "/;x/admin", "/;x/admin", "/;x/admin"),
    ("GET", "/public#/../admin", "/public", "/public", "/public", "/public"),
    ("GET", "/public/./admin", "/public/admin", "/public/admin", "/public/admin", _),
    ("GET", "/a/b/../../admin", "/admin", "/admin", "/admin", _),
    ("GET", "\\admin", _, _, _, _),  # llhttp refuses a target starting with `\`
    ("GET", "/public\\..\\admin", "/admin", "/admin", "/admin", _),
    ("GET", "/%5cadmin", "/%5cadmin", "/%5cadmin", "/admin", _),
    ("GET", "/%61dmin", "/admin", "/admin", "/admin", _),
    ("GET", "/%2561dmin", "/%2561dmin", "/%2561dmin", "/%2561dmin", "/%2561dmin"),
    ("GET", "/x/%%32e%%32e/admin", *["/x/%2e%2e/admin"] * 3, _),  # decoded once only
    ("GET", "/public?x=/../admin", *["/public?x=/../admin"] * 4),
    ("GET", "/public/..;/admin", *["/public/..;/admin"] * 4),
    ("GET", "/..", "/", "/", "/", _),
    ("GET", "/../admin", "/admin", "/admin", "/admin", _),
    ("GET", "/public//", "/public//", "/public/", "/public/", _),
    ("GET", "/admin%00", _, _, _, _),
    ("GET", "http://api/admin", "/admin", "/admin", "/admin", "/admin"),
    ("GET", "http://api:80/admin?x", "/admin?x", "/admin?x", "/admin?x", "/admin?x"),
    ("GET", "HTTP://API/public", "/public", "/public", "/public", "/public"),
    ("GET", "https://api/public", "/public", "/public", "/public", "/public"),
    ("GET", "http://api/public/../admin", "/admin", "/admin", "/admin", _),
    ("GET", "http://api//admin", "//admin", "/admin", "/admin", _),
    ("GET", "http://api", "/", "/", "/", "/"),
    ("GET", "http://user@api/public", _, _, _, _),
    ("GET", "ftp://api/public", _, _, _, _),
    ("GET", "http:///public", _, _, _, _),
    ("GET", "*", _, _, _, _),
    ("OPTIONS", "*", "*", "*", "*", "*"),
    ("CONNECT", "api:80", _, _, _, _),
    ("CONNECT", "/admin", _, _, _, _),
    ("GET", "", _, _, _, _),
]


@dataclass
class Site:
    inbound: InboundHTTP
    app: RecordingApp
    client: ssl.SSLContext

    async def send(self, head: bytes) -> bytes:
        """One request on a fresh mTLS connection as `web`; the response's status code."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.inbound.port, ssl=self.client, server_hostname=""
        )
        writer.write(head)
        try:
            status, _, _ = await read_response(reader)
        finally:
            writer.close()
        return status.split(b" ")[1]


@pytest.fixture
def ca(tmp_path: Path) -> ProxyTestCA:
    return ProxyTestCA(tmp_path)


async def start_site(ca: ProxyTestCA, snapshot: Snapshot, mode: PathNormalization) -> Site:
    app = await start_recording_app()
    _, authorize = intentions_authorizers(lambda: snapshot, Identity("api"))
    gate = InboundGate(ca.server_context(ca.leaf("api")), PeerCache(ca.verifier()), ProxyStats())
    inbound = InboundHTTP(
        gate,
        "127.0.0.1",
        app.port,
        authorize=authorize,
        local_uri=spiffe("api"),
        path_normalization=mode,
    )
    await inbound.start()
    return Site(inbound, app, ca.client_context(ca.leaf("web")))


@pytest.fixture
async def sites(ca: ProxyTestCA) -> AsyncIterator[dict[tuple[str, str], Site]]:
    started = {}
    for mode in MODES:
        for policy, snapshot in POLICIES.items():
            started[(mode, policy)] = await start_site(ca, snapshot, mode)
    yield started
    for site in started.values():
        await site.inbound.close(grace=0)
        await site.app.close()


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("mode", MODES)
async def test_every_target_is_decided_and_forwarded_as_one_normalized_path(
    sites: dict[tuple[str, str], Site], mode: PathNormalization, policy: str
) -> None:
    site = sites[(mode, policy)]
    column = 2 + MODES.index(mode)
    wrong = []
    for case in CASES:
        method, target, want = case[0], case[1], case[column]
        head = f"{method} {target} HTTP/1.1\r\nHost: api\r\n\r\n".encode()
        before = len(site.app.received)
        status = await site.send(head)
        got = [(r.method, r.target) for r in site.app.received[before:]]
        if want is None:
            expected_status, expected_got = b"400", []
        elif allowed(policy, want.encode()):
            expected_status, expected_got = b"200", [(method.encode(), want.encode())]
        else:
            expected_status, expected_got = b"403", []
        if (status, got) != (expected_status, expected_got):
            want_text = f"{expected_status!r} {expected_got}"
            wrong.append(f"{method} {target}: got {status!r} {got}, want {want_text}")
    assert not wrong, "\n".join(wrong)


async def test_absolute_form_authority_replaces_host(ca: ProxyTestCA) -> None:
    """RFC 9112 §3.2.2: the authority wins over any Host sent; the app sees one Host, the one
    that was authorized, and the origin-form target."""
    site = await start_site(ca, POLICIES["allow_public"], "base")
    try:
        head = b"GET http://api:8080/public?q HTTP/1.1\r\nHost: evil\r\nHOST: evil2\r\n\r\n"
        assert await site.send(head) == b"200"
        (got,) = site.app.received
        assert (got.method, got.target) == (b"GET", b"/public?q")
        assert got.header(b"host") == [b"api:8080"]
        # HTTP/1.0 may omit Host: the authority supplies it.
        assert await site.send(b"GET http://api/public HTTP/1.0\r\n\r\n") == b"200"
        assert site.app.received[1].header(b"host") == [b"api"]
        # HTTP/1.1 must send Host whatever the target's form (RFC 9112 §3.2).
        assert await site.send(b"GET http://api/public HTTP/1.1\r\n\r\n") == b"400"
        assert len(site.app.received) == 2
    finally:
        await site.inbound.close(grace=0)
        await site.app.close()


async def test_case_is_kept_and_forwarded_as_authorized(ca: ProxyTestCA) -> None:
    """Paths are case-sensitive (as in Istio): `/ADMIN` is not `/admin` to the policy, and the
    app receives `/ADMIN`, the path that was authorized, never a folded one."""
    site = await start_site(ca, POLICIES["deny_admin"], "decode_and_merge_slashes")
    try:
        assert await site.send(b"GET /admin HTTP/1.1\r\nHost: api\r\n\r\n") == b"403"
        assert await site.send(b"GET /ADMIN HTTP/1.1\r\nHost: api\r\n\r\n") == b"200"
        assert [r.target for r in site.app.received] == [b"/ADMIN"]
    finally:
        await site.inbound.close(grace=0)
        await site.app.close()


async def test_http10_without_host_through_an_http_upstream_gets_the_upstream_name(
    ca: ProxyTestCA,
) -> None:
    """Issue 10 item 9: the outbound forwards HTTP/1.0 as HTTP/1.1, which must carry a Host."""
    site = await start_site(ca, POLICIES["deny_admin"], "base")
    client_ctx = ca.client_context(ca.leaf("web"))
    upstream = Upstream(
        name="api",
        endpoints=fixed_endpoints(
            compile_balancer([Target("n1/api", "127.0.0.1", site.inbound.port)], BalancerConfig())
        ),
        client_ssl=lambda: client_ctx,
        verify_peer=PeerCache(ca.verifier()),
        expected_service="api",
    )
    outbound = OutboundHTTP(upstream)
    await outbound.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        status, _, body = await read_response(reader)
        writer.close()
        assert (status.split(b" ")[1], body) == (b"200", b"ok")
        (got,) = site.app.received
        assert (got.method, got.target, got.version) == (b"GET", b"/", b"HTTP/1.1")
        assert got.header(b"host") == [b"api"]
        # A Host the app sent is kept as it is.
        reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port)
        writer.write(b"GET /x HTTP/1.0\r\nHost: api.internal\r\n\r\n")
        status, _, _ = await read_response(reader)
        writer.close()
        assert status.split(b" ")[1] == b"200"
        assert site.app.received[1].header(b"host") == [b"api.internal"]
    finally:
        await outbound.close(grace=0)
        await site.inbound.close(grace=0)
        await site.app.close()


async def test_two_host_fields_are_refused(ca: ProxyTestCA) -> None:
    """RFC 9112 §3.2: more than one Host is a 400. Otherwise the decision (`:authority`: the
    last one) and the app (often the first one) would not agree on the request's host."""
    site = await start_site(ca, POLICIES["allow_public"], "base")
    try:
        head = b"GET /public HTTP/1.1\r\nHost: api\r\nX-A: 1\r\nhost: admin.api\r\n\r\n"
        assert await site.send(head) == b"400"
        assert site.app.received == []
    finally:
        await site.inbound.close(grace=0)
        await site.app.close()


async def test_http10_without_host_straight_to_the_inbound_gets_the_local_service_name(
    ca: ProxyTestCA,
) -> None:
    """A mesh leaf speaking HTTP/1.0 to the inbound port directly: the app receives HTTP/1.1,
    which must carry a Host (RFC 9112 §3.2), so the sidecar names the service it serves."""
    site = await start_site(ca, POLICIES["deny_admin"], "base")
    try:
        assert await site.send(b"GET /public HTTP/1.0\r\n\r\n") == b"200"
        (got,) = site.app.received
        assert (got.target, got.version) == (b"/public", b"HTTP/1.1")
        assert got.header(b"host") == [b"api"]
        assert await site.send(b"GET /public HTTP/1.0\r\nHost: api.internal\r\n\r\n") == b"200"
        assert site.app.received[1].header(b"host") == [b"api.internal"]
    finally:
        await site.inbound.close(grace=0)
        await site.app.close()
