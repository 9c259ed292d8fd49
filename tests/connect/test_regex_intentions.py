"""Regular expressions in L7 intentions (`PathRegex`, a header's `Regex`) are matched the way
Envoy matches them, with RE2: in time linear in the input, whatever the pattern. Python's `re`
backtracks: `(\\w+\\s?)*` against 64 letters and a `!` takes longer than the age of the universe,
and the sidecar's event loop is stuck in it, so one request from any mesh peer that may
connect stops every connection the sidecar serves. Found while writing
the fuzz targets (tests/fuzz), by reading what they reach.

The attack over real sockets: web's mesh leaf straight to api's InboundHTTP, whose intentions
deny a header by regex and allow paths by regex; a recording app behind it."""

from __future__ import annotations

from pathlib import Path

import pytest

from intentions.engine import Snapshot, compile_snapshot
from intentions.entries import load_entry
from tests.connect.proxy_test_ca import ProxyTestCA
from tests.connect.test_http_paths import start_site

# Backtracking blow-up in both: nested repetition over the same characters, no match at the end.
WORDS = r"(\w+\s?)*"
PATH_WORDS = r"/(\w+/?)*"
EVIL = "a" * 64 + "!"


def _snapshot() -> Snapshot:
    source = {
        "Name": "web",
        "Permissions": [
            {"Action": "deny", "HTTP": {"Header": [{"Name": "x-user", "Regex": WORDS}]}},
            {"Action": "allow", "HTTP": {"PathRegex": PATH_WORDS}},
        ],
    }
    entry = load_entry({"Kind": "service-intentions", "Name": "api", "Sources": [source]})
    return compile_snapshot([entry], default_allow=False)


# A hang is a failure: without RE2 the first request never returns (pytest-timeout ends it).
@pytest.mark.timeout(30)
async def test_backtracking_patterns_cannot_stall_the_sidecar(tmp_path: Path) -> None:
    site = await start_site(ProxyTestCA(tmp_path), _snapshot(), "base")
    try:
        # The header does not match the deny pattern: the path decides (allowed).
        head = f"GET /public HTTP/1.1\r\nHost: api\r\nx-user: {EVIL}\r\n\r\n".encode()
        assert await site.send(head) == b"200"
        # The path does not match the allow pattern: default deny.
        assert await site.send(f"GET /{EVIL} HTTP/1.1\r\nHost: api\r\n\r\n".encode()) == b"403"
        # The same patterns still decide as before on ordinary input.
        assert await site.send(b"GET /a/b HTTP/1.1\r\nHost: api\r\nx-user: al ice\r\n\r\n") == (
            b"403"
        )
        assert [r.target for r in site.app.received] == [b"/public"]
    finally:
        await site.inbound.close(grace=0)
        await site.app.close()
