"""The Host the app receives is the Host the request was authorized for, also when the
sidecar supplies it. An HTTP/1.0 request without Host, from a mesh leaf straight to the inbound
port, is forwarded as HTTP/1.1 with `Host: api` (the service the sidecar serves); it used to be
decided with no host at all, so an L7 intention that denies by host (Istio
`to.operation.hosts`, translated to an `:authority` header match) let it through and the app
received exactly the Host that was to be denied. Found by the HTTP fuzz target
(tests/fuzz/http_proxy.py: its decision and the app's request disagreed on the host)."""

from __future__ import annotations

from pathlib import Path

from intentions.engine import Snapshot, compile_snapshot
from intentions.entries import load_entry
from tests.connect.proxy_test_ca import ProxyTestCA
from tests.connect.test_http_paths import start_site


def _deny_host_api() -> Snapshot:
    source = {
        "Name": "web",
        "Permissions": [
            {
                "Action": "deny",
                "HTTP": {"Header": [{"Name": ":authority", "Exact": "api", "IgnoreCase": True}]},
            },
            {"Action": "allow", "HTTP": {"PathPrefix": "/"}},
        ],
    }
    entry = load_entry({"Kind": "service-intentions", "Name": "api", "Sources": [source]})
    return compile_snapshot([entry], default_allow=False)


async def test_http10_without_host_is_decided_on_the_host_it_is_forwarded_with(
    tmp_path: Path,
) -> None:
    site = await start_site(ProxyTestCA(tmp_path), _deny_host_api(), "base")
    try:
        # The control: the same request naming the host is denied.
        assert await site.send(b"GET /public HTTP/1.1\r\nHost: api\r\n\r\n") == b"403"
        assert await site.send(b"GET /public HTTP/1.0\r\nHost: api\r\n\r\n") == b"403"
        # Without Host: the app would receive `Host: api`, so it must be denied too.
        status = await site.send(b"GET /public HTTP/1.0\r\n\r\n")
        assert [r.header(b"host") for r in site.app.received] == []
        assert status == b"403"
    finally:
        await site.inbound.close(grace=0)
        await site.app.close()
