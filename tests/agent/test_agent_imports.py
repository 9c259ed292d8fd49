"""`meshlet agent` (a node agent without a sidecar) loads neither the proxy's stack nor
cryptography nor aiohttp: they are `meshlet sidecar`'s (and `meshlet cert`'s, `meshlet
inject --webhook`'s), and were ~30 MB of every node agent's RSS.

Neither a running agent nor a running sidecar loads what only a CLI command runs (the Istio
translators, the injector, the unit templates, importlib.metadata): every `meshlet` process
builds the whole parser, and its subcommand modules imported all of that at the top, ~3 MB
of each agent's RSS."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.mesh import drain_log, metrics, start_app, wait_status, write_sidecar_config
from tests.integration.test_agent_process import ENV, Proc, _free_port, start_dev, write_config

CLI_ONLY = (
    "intentions.apply",
    "intentions.check",
    "intentions.policy",
    "intentions.render",
    "intentions.translate",
    "traffic.from_istio",
    "traffic.istio_apply",
    "agent.inject",
    "agent.inject_config",
    "agent.inject_webhook",
    "agent.unit_files",
    "agent.demo",
    "devstack",
    "importlib.metadata",
    "prometheus_client.parser",
)
"""What only a CLI command runs (`meshlet intentions`, `routes`, `telemetry`, `inject`,
`install`, `version`, `top`, `demo`, `dev`): no agent or sidecar has a use for it."""

NOT_IN_AGENT = (
    *CLI_ONLY,
    # The intentions engine and the discovery chain are the proxy's (agent.config has the
    # intentions package's errors and path normalization).
    "intentions.engine",
    "intentions.entries",
    "traffic",
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


IMPORT_LOG = {**ENV, "PYTHONPROFILEIMPORTTIME": "1"}
"""A process with it (and a sidecar's data planes, which inherit it) logs each module on
stderr as it imports it: what a running process loaded, read from outside."""


def _offenders(modules: list[str], banned: tuple[str, ...] = NOT_IN_AGENT) -> list[str]:
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in banned)]


def _imported(lines: list[str]) -> list[str]:
    # "import time:   self [us] |   cumulative | imported package", one line per module.
    return [line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")]


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


def test_a_running_agent_has_no_cryptography_aiohttp_or_cli_command_loaded(
    tmp_path: Path, consul: str
) -> None:
    admin = f"127.0.0.1:{_free_port()}"
    cfg = tmp_path / "agent.yaml"
    write_config(cfg, consul, admin, ["api"])
    agent = Proc(["agent", "-c", str(cfg)], env=IMPORT_LOG)
    try:
        agent.wait_for_line("ready: ")
        log = drain_log(agent)
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
    log.join(30)
    modules = _imported(agent.lines)
    assert "agent.runtime" in modules and "agent.metrics" in modules  # the log is whole
    assert _offenders(modules) == []


def test_a_running_sidecar_has_no_cli_command_loaded(tmp_path: Path, consul: str) -> None:
    app = start_app("api")
    admin = f"127.0.0.1:{_free_port()}"
    cfg = tmp_path / "api.yaml"
    write_sidecar_config(
        cfg,
        consul=consul,
        service="api",
        app_port=app.server_address[1],
        sidecar_port=_free_port(),
        admin=admin,
        protocol="http",
    )
    sidecar = Proc(["sidecar", "-c", str(cfg)], env=IMPORT_LOG)
    try:
        sidecar.wait_for_line("ready:")
        log = drain_log(sidecar)
        # Serving: its data plane up, the leaf held, intentions applied, a scrape answered.
        wait_status(admin, lambda s: s["sidecar"]["ready"], "the sidecar ready")
        assert "meshlet_" in metrics(admin)
    finally:
        sidecar.stop()
        app.shutdown()
        app.server_close()
    log.join(30)
    modules = _imported(sidecar.lines)
    # The agent's and its data plane's imports both: the sidecar's processes load none of it.
    assert "agent.sidecar" in modules and "connect.dataplane.process" in modules
    assert "intentions.engine" in modules  # the proxy's own, still loaded
    assert _offenders(modules, CLI_ONLY) == []
