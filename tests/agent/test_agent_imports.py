"""`meshlet agent` (a node agent without a sidecar) loads neither the proxy's stack nor
cryptography nor aiohttp: they are `meshlet sidecar`'s (and `meshlet cert`'s, `meshlet
inject --webhook`'s), and were ~30 MB of every node agent's RSS."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_agent_process import ENV, Proc, _free_port, start_dev, write_config

NOT_IN_AGENT = (
    "aiohttp",
    "cryptography",
    "agent.sidecar",
    "agent.dataplanes",
    "connect.sidecar",
    "connect.listener",
    "connect.http1",
    "connect.l4",
    "connect.leaf",
    "connect.tls",
    "connect.dataplane",
)
"""Packages and modules (with their submodules) a node agent has no use for."""

# What `meshlet agent -c FILE` runs up to the event loop: the whole CLI's parser, the file,
# and the runtime with its admin and metrics listeners (constructed, not started).
_AGENT_START = """
import json, sys
from pathlib import Path
from agent.cli import build_parser
from agent.config import load

args = build_parser().parse_args(["agent", "-c", sys.argv[1]])
config = load(Path(sys.argv[1]), {})
from agent.runtime import AgentRuntime

runtime = AgentRuntime(config, config_path=Path(sys.argv[1]), sidecar=args.sidecar)
assert runtime.sidecar is None
print(json.dumps(sorted(sys.modules)))
"""


def _offenders(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in NOT_IN_AGENT)]


def test_the_agent_command_imports_no_proxy_cryptography_or_aiohttp(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    write_config(cfg, "127.0.0.1:1", "127.0.0.1:0", ["api", "db"])
    out = subprocess.run(
        [sys.executable, "-c", _AGENT_START, str(cfg)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
        check=True,
    )
    modules = json.loads(out.stdout)
    assert _offenders(modules) == []
    assert "agent.runtime" in modules and "agent.metrics" in modules


@pytest.fixture
def consul() -> Iterator[str]:
    port = _free_port()
    dev = start_dev(port)
    yield f"127.0.0.1:{port}"
    dev.stop()


def test_a_running_agent_has_no_cryptography_or_aiohttp_mapped(tmp_path: Path, consul: str) -> None:
    admin = f"127.0.0.1:{_free_port()}"
    cfg = tmp_path / "agent.yaml"
    write_config(cfg, consul, admin, ["api"])
    agent = Proc(["agent", "-c", str(cfg)], env=ENV)
    try:
        agent.wait_for_line("ready: ")
        # Serving: registered, watching, answering the admin API and a scrape.
        with urllib.request.urlopen(f"http://{admin}/v1/status", timeout=30) as resp:
            assert json.loads(resp.read())["upstreams"][0]["name"] == "api"
        with urllib.request.urlopen(f"http://{admin}/metrics", timeout=30) as resp:
            assert b"meshlet_upstream_endpoints" in resp.read()
        maps = Path(f"/proc/{agent.p.pid}/maps").read_text()
        # Both ship compiled extensions, mapped once imported (the Rust OpenSSL binding of
        # cryptography; aiohttp's parser, and yarl and multidict under it).
        libraries = {line.split()[-1] for line in maps.splitlines() if line.endswith(".so")}
        loaded = sorted(
            lib
            for lib in libraries
            if any(f"/{pkg}/" in lib for pkg in ("cryptography", "aiohttp", "yarl", "multidict"))
        )
        assert "/httptools/" in "".join(libraries)  # the check sees the packages' libraries
        assert loaded == []
    finally:
        agent.stop()
