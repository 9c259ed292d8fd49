"""agent/nomad_inputs.py: what Nomad writes and registers, turned into meshlet's config.

The bootstrap file and si_token are written by another process and the registration comes
from Consul: each hostile or malformed form is refused with a ConfigError that names the input
and the field, before anything is asked of Consul or bound. The registration tests run against
devstack over real HTTP with the JSON Nomad sends.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.config import ConfigError
from agent.nomad_inputs import (
    MAX_BOOTSTRAP_BYTES,
    gather,
    parse_bootstrap,
    resolve,
)
from devstack.config import DevConfig
from devstack.server import DevServer
from tests.conftest import Http
from tests.nomad.nomad_fixtures import bootstrap, proxy_id, registration

ALLOC = "0c2d6f8e-1b5a-4f3e-8a7d-2e9c4b1f6a30"
WEB_PROXY = proxy_id(ALLOC, "web", "web", "8000")


def _boot(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = bootstrap(WEB_PROXY, "web", token="b00t-t0ken")
    doc.update(changes)
    return doc


def _bytes(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def test_the_bootstrap_gives_the_proxy_id_and_the_token() -> None:
    boot = parse_bootstrap(_bytes(_boot()), "envoy_bootstrap.json")
    assert boot.proxy_id == WEB_PROXY
    assert boot.token == "b00t-t0ken"
    # Without ACLs Consul writes an empty token.
    assert parse_bootstrap(_bytes(bootstrap(WEB_PROXY, "web")), "b").token == ""


def _with_token(value: Any, twice: bool = False) -> dict[str, Any]:
    doc = _boot()
    metadata = [{"key": "x-consul-token", "value": value}]
    if twice:
        metadata.append({"key": "x-consul-token", "value": "other"})
    doc["dynamic_resources"]["ads_config"]["grpc_services"]["initial_metadata"] = metadata
    return doc


HOSTILE_BOOTSTRAPS: dict[str, tuple[bytes, str]] = {
    "not json": (b"{node: ", "not JSON"),
    "not utf-8": (b'{"node": {"id": "\xff"}}', "not JSON"),
    "a list": (b"[]", "expected a JSON object"),
    "no node": (_bytes({"admin": {}}), "node: expected an object"),
    "id not a string": (_bytes(_boot(node={"id": 7})), "node.id: expected the proxy's service"),
    "empty id": (_bytes(_boot(node={"id": ""})), "node.id: expected the proxy's service"),
    # Each of these would be sent to Consul as a path segment of /v1/agent/service/<id>.
    "dot-dot id": (_bytes(_boot(node={"id": ".."})), "node.id: expected a Consul service ID"),
    "path id": (_bytes(_boot(node={"id": "../self"})), "node.id: expected a Consul service ID"),
    "newline id": (_bytes(_boot(node={"id": "a\nb"})), "node.id: expected a Consul service ID"),
    "long id": (_bytes(_boot(node={"id": "a" * 300})), "node.id: expected a Consul service ID"),
    # The token becomes the X-Consul-Token header of every request.
    "token with CRLF": (
        _bytes(_with_token("t\r\nX-Injected: 1")),
        "x-consul-token: expected an ACL token of printable characters",
    ),
    "token with a space": (_bytes(_with_token("a b")), "x-consul-token: expected an ACL token"),
    "token not a string": (_bytes(_with_token(["t"])), "x-consul-token: expected a string"),
    "token twice": (_bytes(_with_token("t", twice=True)), "given more than once"),
    "metadata not a list": (
        _bytes(
            _boot(dynamic_resources={"ads_config": {"grpc_services": {"initial_metadata": {}}}})
        ),
        "initial_metadata: expected a list",
    ),
    "too large": (
        b'{"node": {"id": "x"}, "pad": "' + b"a" * MAX_BOOTSTRAP_BYTES + b'"}',
        "larger than",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_BOOTSTRAPS))
def test_a_malformed_bootstrap_is_refused_naming_the_field(case: str, tmp_path: Path) -> None:
    data, expected = HOSTILE_BOOTSTRAPS[case]
    path = tmp_path / "envoy_bootstrap.json"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as err:
        gather({"NOMAD_SECRETS_DIR": str(tmp_path)})
    assert str(err.value).startswith(f"{path}: ")
    assert expected in str(err.value)


def _secrets(tmp_path: Path, *, si_token: bytes | None, boot_token: str = "b00t") -> Path:
    tmp_path.joinpath("envoy_bootstrap.json").write_text(
        json.dumps(bootstrap(WEB_PROXY, "web", token=boot_token))
    )
    if si_token is not None:
        tmp_path.joinpath("si_token").write_bytes(si_token)
    return tmp_path


def test_the_si_token_wins_over_the_bootstrap_token(tmp_path: Path) -> None:
    env = {"NOMAD_SECRETS_DIR": str(_secrets(tmp_path, si_token=b"s1-t0ken\n"))}
    inputs = gather(env)
    assert (inputs.proxy_id, inputs.token) == (WEB_PROXY, "s1-t0ken")
    assert inputs.token_source == str(tmp_path / "si_token")


def test_an_empty_or_missing_si_token_falls_back_to_the_bootstrap(tmp_path: Path) -> None:
    env = {"NOMAD_SECRETS_DIR": str(_secrets(tmp_path, si_token=b"\n"))}
    assert gather(env).token == "b00t"
    tmp_path.joinpath("si_token").unlink()
    assert gather(env).token == "b00t"


@pytest.mark.parametrize("token", [b"a\r\nX-Injected: 1\n", b"\xff\xfe", b"t" * 5000])
def test_a_malformed_si_token_is_refused(tmp_path: Path, token: bytes) -> None:
    env = {"NOMAD_SECRETS_DIR": str(_secrets(tmp_path, si_token=token))}
    with pytest.raises(ConfigError) as err:
        gather(env)
    assert str(err.value).startswith(f"{tmp_path / 'si_token'}: expected an ACL token")


def test_proxy_id_flag_wins_and_is_checked(tmp_path: Path) -> None:
    env = {"NOMAD_SECRETS_DIR": str(_secrets(tmp_path, si_token=None))}
    assert gather(env, proxy_id="other-sidecar-proxy").proxy_id == "other-sidecar-proxy"
    with pytest.raises(ConfigError, match="--proxy-id: expected a Consul service ID"):
        gather(env, proxy_id="../agent/self")
    with pytest.raises(ConfigError, match="no proxy ID: pass --proxy-id"):
        gather({})


# ---- against devstack: the registration Nomad made -------------------------------------------


async def _register(http: Http, body: dict[str, Any], token: str = "") -> None:
    headers = {"X-Consul-Token": token} if token else None
    status, text, _ = await http.put("/v1/agent/service/register", json=body, headers=headers)
    assert status == 200, text


def _web(**kw: Any) -> dict[str, Any]:
    return registration(
        alloc=ALLOC,
        group="web",
        service="web",
        app_port=8000,
        proxy_port=24100,
        upstreams=(("api", 9191, "http"),),
        **kw,
    )


def _env(dev: DevServer, secrets: Path, **extra: str) -> dict[str, str]:
    return {"NOMAD_SECRETS_DIR": str(secrets), "CONSUL_HTTP_ADDR": dev.http_url, **extra}


async def test_resolve_reads_the_proxy_registration_nomad_made(
    dev: DevServer, http: Http, tmp_path: Path
) -> None:
    await _register(http, _web())
    env = _env(
        dev,
        _secrets(tmp_path, si_token=None, boot_token=""),
        NOMAD_ENVOY_ADMIN_ADDR_web="127.0.0.2:19001",
    )
    resolved = await resolve(env, timeout=5)
    cfg = resolved.config
    assert resolved.external.proxy_id == WEB_PROXY and resolved.external.owner == "nomad"
    assert (cfg.service.name, cfg.service.id) == ("web", WEB_PROXY.removesuffix("-sidecar-proxy"))
    assert (cfg.service.address, cfg.service.port) == ("127.0.0.1", 8000)
    assert (cfg.sidecar.address, cfg.sidecar.port, cfg.sidecar.protocol) == (
        "127.0.0.1",
        24100,
        "http",
    )
    assert [(u.name, u.bind, u.protocol) for u in cfg.sidecar.upstreams] == [
        ("api", "127.0.0.1:9191", "http")
    ]
    assert cfg.admin.address == "127.0.0.2:19001"  # where Nomad puts Envoy's admin API
    assert cfg.shutdown.drain_period == 0  # Nomad stops the app first
    assert cfg.consul_client.token is None


async def test_a_file_adds_settings_but_not_what_nomad_registered(
    dev: DevServer, http: Http, tmp_path: Path
) -> None:
    await _register(http, _web())
    tmp_path.joinpath("s").mkdir()
    secrets = _secrets(tmp_path / "s", si_token=None)
    env = _env(dev, secrets)
    good = tmp_path / "meshlet.yaml"
    good.write_text("log_level: debug\nshutdown: {drain_period: 3s}\nsidecar: {check_ttl: 9s}\n")
    cfg = (await resolve(env, config_file=good, timeout=5)).config
    assert (cfg.log_level, cfg.shutdown.drain_period, cfg.sidecar.check_ttl) == ("debug", 3, 9)
    assert cfg.sidecar.port == 24100
    bad = tmp_path / "bad.yaml"
    bad.write_text("service: {name: evil, port: 1}\nsidecar: {port: 1, upstreams: []}\n")
    with pytest.raises(ConfigError) as err:
        await resolve(env, config_file=bad, timeout=5)
    text = str(err.value)
    assert "service: set by Nomad's registration" in text
    assert "sidecar.port: set by Nomad's registration" in text
    assert "sidecar.upstreams: set by Nomad's registration" in text


def _mutate(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    node = body["Connect"]["SidecarService"]["Proxy"]
    *parents, last = path.split(".")
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value
    if last == "LocalBindSocketPath":
        node.pop("LocalBindPort")  # Consul takes one or the other
    return body


UNSUPPORTED: dict[str, tuple[str, Any, str]] = {
    "transparent": ("Mode", "transparent", "Proxy.Mode: transparent proxying is not supported"),
    "socket upstream": (
        "Upstreams.0.LocalBindSocketPath",
        "/alloc/tmp/api.sock",
        "Proxy.Upstreams[0].LocalBindSocketPath: meshlet listens on TCP ports only",
    ),
    "prepared query": (
        "Upstreams.0.DestinationType",
        "prepared_query",
        "Proxy.Upstreams[0].DestinationType: prepared_query is not supported",
    ),
    "bind_port text": ("Config.bind_port", "abc", "Proxy.Config.bind_port: expected a port"),
    "bind_port out of range": (
        "Config.bind_port",
        70000,
        "Proxy.Config.bind_port: expected a port",
    ),
    "bind_address not text": (
        "Config.bind_address",
        ["0.0.0.0"],
        "Proxy.Config.bind_address: expected an IP address",
    ),
    "upstream bad name": (
        "Upstreams.0.DestinationName",
        "api?x",
        "sidecar.upstreams[0].name: 'api?x' cannot be the service name in a SPIFFE ID",
    ),
    "protocol unknown": ("Config.protocol", "thrift", "sidecar.protocol: expected one of"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
async def test_a_registration_meshlet_cannot_serve_is_refused(
    case: str, dev: DevServer, http: Http, tmp_path: Path
) -> None:
    path, value, expected = UNSUPPORTED[case]
    await _register(http, _mutate(_web(), path, value))
    env = _env(dev, _secrets(tmp_path, si_token=None))
    with pytest.raises(ConfigError) as err:
        await resolve(env, timeout=5)
    assert str(err.value).startswith(f"proxy registration {WEB_PROXY}")
    assert expected in str(err.value)


async def test_a_proxy_id_that_names_no_proxy_is_refused(
    dev: DevServer, http: Http, tmp_path: Path
) -> None:
    await _register(http, _web())
    env = _env(dev, _secrets(tmp_path, si_token=None))
    parent = WEB_PROXY.removesuffix("-sidecar-proxy")
    with pytest.raises(ConfigError, match="Kind: expected connect-proxy, got typical"):
        await resolve(env, proxy_id=parent, timeout=5)


async def test_a_registration_that_never_comes_times_out_naming_it(
    dev: DevServer, tmp_path: Path
) -> None:
    env = _env(dev, _secrets(tmp_path, si_token=None))
    with pytest.raises(ConfigError) as err:
        await resolve(env, timeout=0.5)
    assert str(err.value) == (
        f"proxy registration {WEB_PROXY}: not registered with the Consul agent "
        "(gave up after 0.5s; Nomad registers it first)"
    )


async def test_with_acls_the_si_token_is_used_and_a_wrong_one_refused_at_once(
    tmp_path: Path,
) -> None:
    config = DevConfig(acl_initial_management_token="root-t0ken", default_policy="deny")
    async with DevServer(config) as dev, aiohttp.ClientSession() as session:
        await _register(Http(session, dev.http_url), _web(), token="root-t0ken")
        env = _env(dev, _secrets(tmp_path, si_token=b"root-t0ken\n", boot_token="wrong"))
        resolved = await resolve(env, timeout=5)
        assert resolved.config.consul_client.token == "root-t0ken"
        tmp_path.joinpath("si_token").unlink()
        # Refused, not retried until the deadline: the token will not change by itself.
        with pytest.raises(ConfigError) as err:
            await resolve(env, timeout=600)
        assert "Consul refused to show it" in str(err.value) and "403" in str(err.value)


async def test_the_files_consul_section_is_used_to_reach_consul_and_checked(
    dev: DevServer, http: Http, tmp_path: Path
) -> None:
    await _register(http, _web())
    env = {"NOMAD_SECRETS_DIR": str(_secrets(tmp_path, si_token=None))}  # no CONSUL_HTTP_ADDR
    settings = tmp_path / "meshlet.yaml"
    settings.write_text(f"consul: {{address: '{dev.http_addr}', timeout: 3s}}\n")
    cfg = (await resolve(env, config_file=settings, timeout=5)).config
    assert cfg.consul_client.timeout == 3
    settings.write_text("consul: {timeout: soon}\n")
    with pytest.raises(ConfigError) as err:
        await resolve(env, config_file=settings, timeout=5)
    assert str(err.value).startswith(f"{settings}: consul.timeout: expected a duration")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-c", "x.yaml", "--proxy-id", "p"], "meshlet sidecar: --proxy-id only with --nomad"),
        (["-c", "x.yaml", "--bootstrap", "b.json"], "--bootstrap only with --nomad"),
        (["--nomad", "--registration-timeout", "0"], "--registration-timeout: expected seconds"),
        (["--nomad"], "--nomad: no proxy ID: pass --proxy-id, or --bootstrap FILE"),
    ],
)
def test_the_command_line_refuses_nomad_flags_it_cannot_use(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    from agent.cli import main

    monkeypatch.delenv("NOMAD_SECRETS_DIR", raising=False)
    assert main(["sidecar", *argv]) == 2
    assert expected in capsys.readouterr().err


def test_a_proxy_id_of_another_allocation_is_refused(tmp_path: Path) -> None:
    env = {"NOMAD_SECRETS_DIR": str(_secrets(tmp_path, si_token=None))}
    assert gather({**env, "NOMAD_ALLOC_ID": ALLOC}).proxy_id == WEB_PROXY
    other = "11111111-2222-3333-4444-555555555555"
    with pytest.raises(ConfigError) as err:
        gather({**env, "NOMAD_ALLOC_ID": other})
    assert str(err.value) == (
        f"{tmp_path / 'envoy_bootstrap.json'}: node.id: {WEB_PROXY} is the proxy of another "
        f"allocation, not of this one (NOMAD_ALLOC_ID={other})"
    )
    with pytest.raises(ConfigError, match=r"--proxy-id: .* is the proxy of another allocation"):
        gather({**env, "NOMAD_ALLOC_ID": other}, proxy_id=WEB_PROXY)


async def test_a_registration_whose_port_is_not_the_tasks_is_refused(
    dev: DevServer, http: Http, tmp_path: Path
) -> None:
    await _register(http, _web())
    env = _env(dev, _secrets(tmp_path, si_token=None))
    ok = await resolve({**env, "NOMAD_PORT_connect_proxy_web": "24100"}, timeout=5)
    assert ok.config.sidecar.port == 24100
    with pytest.raises(ConfigError) as err:
        await resolve({**env, "NOMAD_PORT_connect_proxy_web": "24999"}, timeout=5)
    assert str(err.value).endswith(
        "Proxy.Config.bind_port: 24100 is not this task's port (NOMAD_PORT_connect_proxy_web=24999)"
    )


async def test_the_tasks_token_beats_a_token_file_in_the_settings_file(
    dev: DevServer, http: Http, tmp_path: Path
) -> None:
    await _register(http, _web())
    env = _env(dev, _secrets(tmp_path, si_token=b"s1\n"))
    node_token = tmp_path / "node.token"
    node_token.write_text("node-wide\n")
    settings = tmp_path / "meshlet.yaml"
    settings.write_text(f"consul: {{token_file: '{node_token}'}}\n")
    resolved = await resolve(env, config_file=settings, timeout=5)
    assert resolved.config.consul_client.token == "s1"
    assert resolved.config.consul_client.token_file is None
    assert resolved.token_source == str(tmp_path / "si_token")
    # The environment still wins, as for the consul CLI.
    resolved = await resolve({**env, "CONSUL_HTTP_TOKEN": "from-env"}, timeout=5)
    assert resolved.config.consul_client.token == "from-env"
    assert resolved.token_source.startswith("the environment")
