"""The systemd units as shipped and as `meshlet install systemd` renders them: they pass
`systemd-analyze verify`, and the installed console script, started exactly as the unit's
ExecStart= says (its Environment=, its LoadCredential= token under $CREDENTIALS_DIRECTORY),
talks sd_notify to a test NOTIFY_SOCKET in the order systemd expects. systemd itself is not
running here: the test plays the service manager's part for one unit."""

from __future__ import annotations

import importlib.resources
import ipaddress
import json
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from agent.install_cli import default_node_address
from agent.unit_files import UNIT_FILES, UnitError
from tests.integration.test_agent_process import ENV, MESHLET, Proc, _free_port

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
TOKEN = "2b0c1d5e-6a7f-4e8d-9c3b-0a1b2c3d4e5f"


def install(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # --address: the default (the default route's source address) is tested on its own.
    done = subprocess.run(
        [MESHLET, "install", "systemd", "--root", str(root), "--address", "10.0.0.5", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
        check=False,
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def service_section(unit: Path) -> dict[str, list[str]]:
    """The [Service] keys of a unit file, each with its values in order."""
    keys: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            keys.setdefault(key, []).append(value)
    return keys


def specifiers(value: str, instance: str, credentials: Path) -> str:
    return value.replace("%i", instance).replace("%d", str(credentials)).replace("%%", "%")


def test_reference_copies_are_the_shipped_units() -> None:
    for name in UNIT_FILES:
        packaged = importlib.resources.files("agent").joinpath("units", name).read_text()
        assert (ROOT / "systemd" / name).read_text() == packaged, name
    assert sorted(p.name for p in (ROOT / "systemd").iterdir()) == sorted(UNIT_FILES)


def test_install_writes_units_config_and_credential(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    root = tmp_path / "root"
    done = install(root, "--service", "web", "--consul-token-file", str(token_file))
    units, etc = root / "etc/systemd/system", root / "etc/meshlet"
    assert "systemctl enable --now meshlet-sidecar@web.service" in done.stdout

    for name in ("meshlet-sidecar@.service", "meshlet-agent.service"):
        exec_start = service_section(units / name)["ExecStart"]
        assert len(exec_start) == 1
        assert shlex.split(exec_start[0])[0] == MESHLET  # the console script installed here
        shipped = (ROOT / "systemd" / name).read_text()
        assert (units / name).read_text() == shipped.replace(
            "/opt/meshlet/venv/bin/meshlet", MESHLET
        )

    credential = etc / "creds/web.consul-token"
    assert credential.read_text() == TOKEN + "\n"
    assert stat.S_IMODE(credential.stat().st_mode) == 0o600
    assert stat.S_IMODE((etc / "creds").stat().st_mode) == 0o700
    config = etc / "web.yaml"
    assert TOKEN not in config.read_text()
    raw = yaml.safe_load(config.read_text())
    assert raw["service"] == {"name": "web", "address": "127.0.0.1", "port": 8080}
    assert raw["sidecar"]["address"] == "10.0.0.5"
    assert raw["sidecar"]["port"] == 21000
    check = subprocess.run(
        [MESHLET, "sidecar", "--check-config", "-c", str(config)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stderr

    # An edited file is kept; another token is refused without --force, nothing rewritten.
    config.write_text(config.read_text().replace("port: 8080", "port: 8081"))
    token_file.write_text("another-token\n")
    refused = install(root, "--service", "web", "--consul-token-file", str(token_file), check=False)
    assert refused.returncode == 2
    assert "web.consul-token holds another token; --force replaces it" in refused.stderr
    assert credential.read_text() == TOKEN + "\n"
    kept = install(root, "--service", "web")
    assert f"kept {config}" in kept.stdout
    assert "port: 8081" in config.read_text()
    assert credential.read_text() == TOKEN + "\n"

    # A second service on the host gets its own sidecar and admin ports.
    install(root, "--service", "api")
    api = yaml.safe_load((etc / "api.yaml").read_text())
    assert (api["sidecar"]["port"], api["admin"]["address"]) == (21001, "127.0.0.1:19001")
    assert (etc / "creds/api.consul-token").read_text() == ""  # no ACLs: an empty credential

    bad = install(root, "--service", "../web", check=False)
    assert bad.returncode == 2 and "--service: expected 1 to 63 letters" in bad.stderr

    # meshlet-agent.service: its own file and credential, valid for `meshlet agent`.
    done = install(root, "--service", "db", "--agent-only")
    assert "systemctl enable --now meshlet-agent.service" in done.stdout
    agent_config = etc / "agent.yaml"
    assert yaml.safe_load(agent_config.read_text())["service"]["name"] == "db"
    assert "meshlet agent --check-config" in agent_config.read_text()
    assert (etc / "creds/agent.consul-token").exists()
    check = subprocess.run(
        [MESHLET, "agent", "--check-config", "-c", str(agent_config)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stderr


def testdefault_node_address_is_an_ip_or_a_clear_error() -> None:
    try:
        address = default_node_address()
    except UnitError as exc:
        assert str(exc).startswith("--address: this host has no default route")
    else:
        ipaddress.ip_address(address)


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_rendered_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    root = tmp_path / "root"
    install(root, "--service", "web", "--app-unit", "web.service")
    units = root / "etc/systemd/system"
    # The instance systemctl would start, and the application the drop-in orders after it.
    (units / "meshlet-sidecar@web.service").symlink_to("meshlet-sidecar@.service")
    (units / "web.service").write_text(
        "[Unit]\nDescription=web\n[Service]\nExecStart=/bin/sleep infinity\n"
    )
    drop_in = (units / "web.service.d/10-meshlet.conf").read_text()
    assert "Requires=meshlet-sidecar@web.service" in drop_in
    assert "After=meshlet-sidecar@web.service" in drop_in
    # A port below 1024: a reinstall adds the capability drop-in, which must verify too.
    config = root / "etc/meshlet/web.yaml"
    config.write_text(config.read_text().replace("port: 21000", "port: 443"))
    install(root, "--service", "web")
    low = units / "meshlet-sidecar@web.service.d/10-low-ports.conf"
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in low.read_text()
    assert "(sidecar.port)" in low.read_text()

    targets = ["meshlet-sidecar@web.service", "meshlet-agent.service", "web.service"]
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", *(f"./{t}" for t in targets)],
        cwd=units,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify reports unknown keys and unparsable values as warnings with status 0: none allowed.
    assert (done.returncode, done.stdout + done.stderr) == (0, "")

    config.write_text(config.read_text().replace("port: 443", "port: 21000"))
    assert "no port below 1024" in install(root, "--service", "web").stdout
    assert not low.exists()


def _notes(sock: socket.socket, until: str, seen: list[str]) -> list[str]:
    """Datagrams up to and including the first holding `until`; all of them go to `seen`."""
    got = []
    while True:
        msg = sock.recv(4096).decode()
        got.append(msg)
        seen.append(msg)
        if until in msg.splitlines():
            return got


def test_exec_start_speaks_sd_notify_in_order(tmp_path: Path) -> None:
    dev_port = _free_port()
    consul = f"127.0.0.1:{dev_port}"
    dev = Proc(
        [
            "dev",
            "--http-addr",
            consul,
            "--acl-initial-management-token",
            TOKEN,
            "--acl-default-policy",
            "deny",
        ]
    )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(30)
    sidecar: Proc | None = None
    try:
        dev.wait_for_line("HTTP API at http://")
        # ACLs are on and deny by default: only the token from the credential gets in.
        anonymous = urllib.request.Request(
            f"http://{consul}/v1/agent/service/register",
            data=json.dumps({"Name": "probe", "Port": 1}).encode(),
            method="PUT",
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(anonymous, timeout=10)
        assert refused.value.code == 403
        refused.value.close()

        token_file = tmp_path / "token"
        token_file.write_text(TOKEN)
        root = tmp_path / "root"
        install(root, "--service", "web", "--consul-token-file", str(token_file))
        config = root / "etc/meshlet/web.yaml"
        raw = yaml.safe_load(config.read_text())
        raw["consul"]["address"] = consul
        raw["sidecar"].update(address="127.0.0.1", port=_free_port())
        raw["admin"]["address"] = f"127.0.0.1:{_free_port()}"
        raw["shutdown"]["drain_period"] = "1s"
        raw["watch"] = {"retry_initial": "50ms", "retry_max": "500ms"}
        config.write_text(yaml.safe_dump(raw))

        # Play systemd for meshlet-sidecar@web.service: its ExecStart= with %i, its
        # Environment=, its LoadCredential= copied into a credentials directory.
        unit = service_section(root / "etc/systemd/system/meshlet-sidecar@.service")
        credentials = tmp_path / "credentials"
        credentials.mkdir(mode=0o700)
        for spec in unit["LoadCredential"]:
            ident, _, source = specifiers(spec, "web", credentials).partition(":")
            shutil.copy(root / source.lstrip("/"), credentials / ident)
        env = {**ENV, "CREDENTIALS_DIRECTORY": str(credentials)}
        env.pop("CONSUL_HTTP_TOKEN", None)
        env.pop("CONSUL_HTTP_TOKEN_FILE", None)
        for assignment in unit["Environment"]:
            key, _, value = specifiers(assignment, "web", credentials).partition("=")
            env[key] = value
        assert env["PYTHONSAFEPATH"] == "1"
        assert env["CONSUL_HTTP_TOKEN_FILE"] == str(credentials / "consul-token")
        # WatchdogSec= is 20s in the unit; 0.4s here so the pings come every 0.2s.
        env.update(NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="400000")
        (exec_start,) = unit["ExecStart"]
        argv = shlex.split(specifiers(exec_start, "web", credentials))
        assert argv == [MESHLET, "sidecar", "-c", "/etc/meshlet/web.yaml"]
        argv[3] = str(root / argv[3].lstrip("/"))  # the only change: --root's prefix
        sidecar = Proc(argv[1:], env=env)  # Proc runs MESHLET, which is argv[0]

        seen: list[str] = []
        ready = _notes(sock, "READY=1", seen)
        assert not any("WATCHDOG=1" in m for m in ready)  # systemd arms it at READY=1
        assert "STATUS=ready, 0 upstreams" in ready[-1].splitlines()
        catalog = urllib.request.Request(
            f"http://{consul}/v1/catalog/service/web", headers={"X-Consul-Token": TOKEN}
        )
        with urllib.request.urlopen(catalog, timeout=10) as resp:
            assert [e["ServiceID"] for e in json.loads(resp.read())] == ["web"]
        pings = 0
        while pings < 2:
            pings += _notes(sock, "WATCHDOG=1", seen)[-1].count("WATCHDOG=1")

        sidecar.p.send_signal(signal.SIGHUP)
        reloading = _notes(sock, "RELOADING=1", seen)[-1].splitlines()
        assert any(line.startswith("MONOTONIC_USEC=") for line in reloading)
        again = _notes(sock, "READY=1", seen)
        assert not any("STOPPING=1" in m for m in again)
        _notes(sock, "WATCHDOG=1", seen)  # still pinged after the reload

        sidecar.p.send_signal(signal.SIGTERM)
        stopping = _notes(sock, "STOPPING=1", seen)
        assert not any("READY=1" in m for m in stopping)
        assert sidecar.p.wait(30) == 0

        order = [
            line
            for m in seen
            for line in m.splitlines()
            if line in ("READY=1", "RELOADING=1", "STOPPING=1")
        ]
        assert order == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    finally:
        if sidecar is not None:
            sidecar.stop()
        sock.close()
        dev.stop()
