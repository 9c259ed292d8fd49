"""The agent's configuration model: every problem named with its key path, env overrides,
and the committed reference in docs/ generated from the same model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError, load, parse, proxy_env_problems, reference_markdown

ROOT = Path(__file__).resolve().parents[2]

MINIMAL: dict[str, Any] = {"service": {"name": "web", "port": 8080}}


def _problems(raw: Any, env: dict[str, str] | None = None) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse(raw, env or {}, source="agent.yaml")
    assert str(info.value).startswith("agent.yaml: ")
    return {p.path: p.message for p in info.value.problems}


def test_the_issue_example_parses(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        """
consul: {address: 127.0.0.1:8500, token_file: /etc/meshlet/web.token}
service:
  name: web
  port: 8080
  check: {http: "http://127.0.0.1:8080/healthz", interval: 10s}
sidecar:
  port: 21000
  protocol: http
  upstreams:
  - {name: api, local_bind_port: 9191}
certs: {source: consul}
admin: {address: 127.0.0.1:19000}
"""
    )
    cfg = load(path, {})
    assert cfg.service.service_id == "web"
    assert cfg.service.check is not None and cfg.service.check.interval == 10.0
    assert cfg.sidecar.upstreams[0].name == "api"
    assert cfg.sidecar.upstreams[0].local_bind_address == "127.0.0.1"
    assert cfg.consul_client.address == "127.0.0.1:8500"
    assert cfg.consul_client.token_file == Path("/etc/meshlet/web.token")


def test_minimal_config_takes_defaults() -> None:
    cfg = parse(MINIMAL, {})
    assert cfg.sidecar.port == 21000
    assert cfg.admin.address == "127.0.0.1:19000"
    assert cfg.watch.wait == 300.0
    assert cfg.certs.source == "consul"


def test_every_problem_is_reported_with_its_key_path() -> None:
    problems = _problems(
        {
            "service": {"port": "8080", "check": {"http": "x", "tcp": "a:1"}, "tags": "a"},
            "sidecar": {
                "protocol": "udp",
                "check_ttl": "soon",
                "upstreams": [
                    {"name": "api", "local_bind_port": 9191, "datacenter": "dc2", "peer": "p"},
                    {"name": "db", "local_bind_port": 9191},
                    {"local_bind_port": 70000},
                ],
            },
            "certs": {"source": "vault"},
            "admin": {"address": "0.0.0.0:19000"},
            "extra": True,
        }
    )
    assert problems == {
        "service.name": "required",
        "service.port": "expected an integer, got '8080'",
        "service.tags": "expected a list, got a string",
        "service.check": "expected exactly one of http, tcp or ttl, got http, tcp",
        "sidecar.protocol": "expected one of tcp, http, http2, grpc, got 'udp'",
        "sidecar.check_ttl": 'expected a duration such as "10s", "500ms" or "1m", got \'soon\'',
        "sidecar.upstreams[0]": (
            "set datacenter or peer, not both (Consul: an upstream cannot specify both)"
        ),
        "sidecar.upstreams[1].local_bind_port": (
            "127.0.0.1:9191 is already used by sidecar.upstreams[0]"
        ),
        "sidecar.upstreams[2].name": "required",
        "sidecar.upstreams[2].local_bind_port": (
            "expected a port number from 1 to 65535, got 70000"
        ),
        "certs.vault": "required when certs.source is vault",
        "admin.address": "must be a loopback address (127.0.0.1 or ::1), got 0.0.0.0",
        "extra": (
            "unknown key; expected one of: service, consul, sidecar, certs, admin, watch, "
            "shutdown, telemetry, log_level"
        ),
    }


def test_check_rules() -> None:
    assert _problems({"service": {"name": "w", "port": 1, "check": {"http": "http://x/"}}}) == {
        "service.check.interval": "required for a http check, e.g. 10s"
    }
    assert _problems(
        {"service": {"name": "w", "port": 1, "check": {"ttl": "10s", "interval": "1s"}}}
    ) == {"service.check.interval": "not allowed for a ttl check (the application reports itself)"}


def test_env_overrides_the_file_like_the_consul_cli() -> None:
    raw = {**MINIMAL, "consul": {"address": "127.0.0.1:8500", "token": "from-file"}}
    cfg = parse(raw, {"CONSUL_HTTP_ADDR": "https://consul.service:8501", "CONSUL_HTTP_TOKEN": "t"})
    assert cfg.consul_client.address == "consul.service:8501"
    assert cfg.consul_client.tls is not None
    assert cfg.consul_client.token == "t"
    # Unrelated variables are not consulted.
    assert parse(raw, {"HOME": "/root"}).consul_client.token == "from-file"


def test_bad_consul_env_names_the_variable() -> None:
    problems = _problems(MINIMAL, {"CONSUL_HTTP_ADDR": "ftp://x"})
    assert "CONSUL_HTTP_ADDR='ftp://x': unknown scheme 'ftp'" in problems["consul"]


def test_connection_pool_is_sized_from_the_upstreams() -> None:
    ups = [{"name": f"s{i}", "local_bind_port": 10000 + i} for i in range(300)]
    cfg = parse({**MINIMAL, "sidecar": {"upstreams": ups}}, {})
    assert cfg.consul_client.max_connections == 316
    cfg = parse({**MINIMAL, "consul": {"max_connections": 50}}, {})
    assert cfg.consul_client.max_connections == 50


def test_yaml_errors_name_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("service:\n  name: web\n  port: [8080\n")
    with pytest.raises(ConfigError) as info:
        load(path, {})
    assert str(info.value).startswith(f"{path}: not valid YAML: line ")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "nope.yaml", {})


def test_top_level_must_be_a_mapping() -> None:
    assert _problems(["a"]) == {"": "expected a mapping at the top, got a list"}


def test_committed_reference_is_generated_from_the_model() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == reference_markdown(), (
        "docs/configuration.md is stale: run "
        "`.venv/bin/meshlet agent --print-config-reference > docs/configuration.md`"
    )


def test_reference_lists_every_key() -> None:
    doc = reference_markdown()
    for key in (
        "consul.address",
        "service.check.http",
        "sidecar.upstreams[].local_bind_port",
        "certs.vault.role",
        "admin.address",
        "shutdown.drain_period",
    ):
        assert f"| `{key}` |" in doc


def test_path_normalization_is_one_of_the_modes_and_named_when_wrong() -> None:
    assert parse(MINIMAL, {}).sidecar.path_normalization == "base"
    raw = {**MINIMAL, "sidecar": {"protocol": "http", "path_normalization": "reject"}}
    assert parse(raw, {}).sidecar.path_normalization == "reject"
    assert _problems({**MINIMAL, "sidecar": {"path_normalization": "NONE"}}) == {
        "sidecar.path_normalization": (
            "expected one of base, merge_slashes, decode_and_merge_slashes, reject, got 'NONE'"
        )
    }


# ---- settings that used to pass here and fail only at start --------------------------------


def test_vault_auth_offers_only_what_the_vault_source_implements() -> None:
    vault = {"address": "https://vault:8200", "role": "web", "auth": "kubernetes"}
    problems = _problems({**MINIMAL, "certs": {"source": "vault", "vault": vault}})
    assert problems == {"certs.vault.auth": "expected one of token, approle, got 'kubernetes'"}


NAME_RULE = "expected letters, digits, '.', '-' and '_' only (not '.' or '..')"


@pytest.mark.parametrize(
    "name",
    # Each would reach the leaf's URI percent-encoded (.../svc/web%20api) or as a character
    # SPIFFE forbids in a path segment (':', '@'); '.' and '..' are dot-segments.
    ["web api", "web%2Fadmin", "wéb", "a?b", "a#b", "a:b", "a@b", "..", "."],
)
def test_a_service_name_no_leaf_can_carry_is_refused(name: str) -> None:
    problems = _problems({"service": {"name": name, "port": 8080}})
    assert set(problems) == {"service.name"}
    assert problems["service.name"].endswith(NAME_RULE)
    ups = [{"name": name, "local_bind_port": 9191}]
    problems = _problems({**MINIMAL, "sidecar": {"upstreams": ups}})
    assert set(problems) == {"sidecar.upstreams[0].name"}
    assert problems["sidecar.upstreams[0].name"].endswith(NAME_RULE)


@pytest.mark.parametrize(
    "name", ["web", "Web-2", "web_api", "com.daml.ledger.api.v1.ActiveContractsService"]
)
def test_names_consul_accepts_beyond_dns_labels_still_parse(name: str) -> None:
    assert parse({"service": {"name": name, "port": 8080}}, {}).service.name == name


PORT_RULE = "expected a port from 1 to 65535 that no other listener of this file uses"


def test_sidecar_port_equal_to_service_port_is_refused() -> None:
    problems = _problems({"service": {"name": "web", "port": 21000}, "sidecar": {"port": 21000}})
    assert problems == {
        "sidecar.port": "127.0.0.1:21000 collides with service.port (127.0.0.1:21000); " + PORT_RULE
    }
    # Same port on two distinct addresses is two sockets.
    raw = {
        "service": {"name": "web", "port": 21000, "address": "10.0.0.1"},
        "sidecar": {"port": 21000, "address": "10.0.0.2"},
    }
    assert parse(raw, {}).sidecar.port == 21000


def test_listener_ports_that_collide_are_refused_with_both_keys() -> None:
    problems = _problems(
        {
            **MINIMAL,
            "sidecar": {
                "port": 21000,
                "upstreams": [
                    {"name": "a", "local_bind_port": 21000},
                    {"name": "b", "local_bind_port": 9191, "local_bind_address": "0.0.0.0"},
                    {"name": "c", "local_bind_port": 9191},
                    {"name": "d", "local_bind_port": 8080},
                    {"name": "e", "local_bind_port": 19000},
                ],
            },
        }
    )
    assert problems == {
        "sidecar.upstreams[0].local_bind_port": (
            "127.0.0.1:21000 collides with sidecar.port (127.0.0.1:21000); " + PORT_RULE
        ),
        # A wildcard bind holds the port on every address.
        "sidecar.upstreams[2].local_bind_port": (
            "127.0.0.1:9191 collides with sidecar.upstreams[1].local_bind_port (0.0.0.0:9191); "
            + PORT_RULE
        ),
        "sidecar.upstreams[3].local_bind_port": (
            "127.0.0.1:8080 collides with service.port (127.0.0.1:8080); " + PORT_RULE
        ),
        "admin.address": (
            "127.0.0.1:19000 collides with sidecar.upstreams[4].local_bind_port "
            "(127.0.0.1:19000); " + PORT_RULE
        ),
    }


def test_admin_port_zero_collides_with_nothing() -> None:
    raw = {**MINIMAL, "admin": {"address": "127.0.0.1:0"}, "sidecar": {"port": 21000}}
    assert parse(raw, {}).admin.address == "127.0.0.1:0"


def test_the_proxy_needs_the_vault_credentials_of_its_auth() -> None:
    vault = {"address": "https://vault:8200", "role": "web"}
    token = parse({**MINIMAL, "certs": {"source": "vault", "vault": vault}}, {})
    approle = parse(
        {**MINIMAL, "certs": {"source": "vault", "vault": {**vault, "auth": "approle"}}}, {}
    )
    allowed = "expected token (VAULT_TOKEN) or approle (VAULT_ROLE_ID and VAULT_SECRET_ID)"
    assert [str(p) for p in proxy_env_problems(token, {"VAULT_ROLE_ID": "r"})] == [
        f"certs.vault.auth: token needs VAULT_TOKEN in the environment, which is not set; {allowed}"
    ]
    assert proxy_env_problems(token, {"VAULT_TOKEN": "t"}) == []
    assert [str(p) for p in proxy_env_problems(approle, {"VAULT_TOKEN": "t"})] == [
        "certs.vault.auth: approle needs VAULT_ROLE_ID and VAULT_SECRET_ID in the environment, "
        f"which are not set; {allowed}"
    ]
    assert proxy_env_problems(approle, {"VAULT_ROLE_ID": "r", "VAULT_SECRET_ID": "s"}) == []
    assert proxy_env_problems(parse(MINIMAL, {}), {}) == []
