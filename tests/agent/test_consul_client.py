"""The Consul client against the real devstack over HTTP, and against real sockets that
misbehave. The pure parts (env parsing, blocking-index rules, durations) are tested directly."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent.consul import ConsulClient
from agent.consul_blocking import (
    blocking_deadline,
    effective_wait,
    format_duration,
    next_index,
    parse_duration,
)
from agent.consul_config import ConsulConfig, ConsulTLS, config_from_env
from agent.consul_errors import (
    ConsulACLNotFound,
    ConsulBadRequest,
    ConsulBadResponse,
    ConsulConfigError,
    ConsulError,
    ConsulNotFound,
    ConsulPermissionDenied,
    ConsulRejected,
    ConsulUnavailable,
)
from agent.consul_results import HealthCheck, HealthStatus, aggregate_status
from agent.consul_services import (
    CheckDefinition,
    ProxyConfig,
    ServiceRegistration,
    SidecarService,
    Upstream,
)
from devstack.config import DevConfig
from devstack.server import DevServer
from tests.agent.conftest import (
    Pki,
    SocketServer,
    canned,
    relay_to,
    server_tls,
    silent,
)

T = TypeVar("T")


async def parked(dev: DevServer, query: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """Start a blocking query and return once devstack holds it parked (an event, no sleep)."""
    already = dev.store.blocked
    task = asyncio.create_task(query)
    async with asyncio.timeout(10):
        await dev.store.until_blocked(already + 1)
    assert not task.done(), "the blocking query returned without a change"
    return task


def web(**overrides: object) -> ServiceRegistration:
    base = ServiceRegistration(
        name="web",
        port=8080,
        tags=("v1",),
        meta={"team": "mesh"},
        checks=(CheckDefinition(check_id="web-ttl", name="web alive", ttl="30s"),),
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


# ---- pure: durations, blocking rules ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("250ms", 0.25),
        ("1m30s", 90.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("0", 0.0),
        ("1.5s", 1.5),
        ("100us", 1e-4),
        ("-2s", -2.0),
    ],
)
def test_go_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1", "s", "1x", "1s2", "ten seconds", "1 s", "--1s"])
def test_bad_go_durations_name_the_format(text: str) -> None:
    with pytest.raises(ValueError, match="is not a Go duration"):
        parse_duration(text)


def test_durations_format_back_to_what_consul_parses() -> None:
    for seconds in (1.0, 90.0, 0.25, 1.5, 600.0):
        assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


def test_wait_defaults_to_five_minutes_and_is_capped_at_ten() -> None:
    assert effective_wait(None) == 300.0
    assert effective_wait("0s") == 300.0
    assert effective_wait("1s") == 1.0
    assert effective_wait(30) == 30.0
    assert effective_wait("1h") == 600.0
    with pytest.raises(ValueError, match="negative"):
        effective_wait("-1s")


def test_blocking_deadline_covers_consuls_jitter_and_a_margin() -> None:
    assert blocking_deadline(160.0, 5.0) == 160.0 + 10.0 + 5.0
    assert blocking_deadline(effective_wait(None), 10.0) > 300 * 17 / 16


@pytest.mark.parametrize(
    ("previous", "returned", "expected"),
    [
        (0, 7, 7),  # first read
        (7, 7, 7),  # wait ran out, nothing changed
        (7, 9, 9),  # changed
        (9, 5, 0),  # went backwards: start over with a non-blocking read
        (0, 0, 1),  # a zero index would never block; treat as 1
        (5, 0, 0),
    ],
)
def test_next_index_resets_when_backwards_and_never_blocks_on_zero(
    previous: int, returned: int, expected: int
) -> None:
    assert next_index(previous, returned) == expected


def _check(status: HealthStatus, check_id: str = "c") -> HealthCheck:
    return HealthCheck("n", check_id, "c", status, "", "", "", "", (), "ttl")


def test_aggregate_status_orders_maintenance_critical_warning_passing() -> None:
    p, w, c = HealthStatus.PASSING, HealthStatus.WARNING, HealthStatus.CRITICAL
    assert aggregate_status([]) is p
    assert aggregate_status([_check(p), _check(w)]) is w
    assert aggregate_status([_check(w), _check(c), _check(p)]) is c
    maint = _check(c, "_service_maintenance:web")
    assert aggregate_status([_check(p), maint]) is HealthStatus.MAINTENANCE
    assert aggregate_status([_check(p, "_node_maintenance")]) is HealthStatus.MAINTENANCE


def test_registration_renders_consuls_camel_case_and_omits_zero_values() -> None:
    reg = ServiceRegistration(
        name="web",
        port=8080,
        checks=(CheckDefinition(ttl=10, status="passing"),),
        sidecar=SidecarService(
            proxy=ProxyConfig(upstreams=(Upstream("db", local_bind_port=9191),))
        ),
    )
    assert reg.to_json() == {
        "Name": "web",
        "Port": 8080,
        "Checks": [{"TTL": "10s", "Status": "passing"}],
        "Connect": {
            "SidecarService": {
                "Proxy": {"Upstreams": [{"DestinationName": "db", "LocalBindPort": 9191}]}
            }
        },
    }
    assert CheckDefinition(name="x", service_id="web", ttl="5s").to_json(standalone=True) == {
        "Name": "x",
        "ServiceID": "web",
        "TTL": "5s",
    }
    with pytest.raises(ValueError, match="Go duration"):
        CheckDefinition(ttl="soon")


# ---- pure: the consul CLI's environment ---------------------------------------------------------


def test_env_defaults_to_local_plain_http() -> None:
    cfg = config_from_env({})
    assert cfg == ConsulConfig()
    assert cfg.base_url == "http://127.0.0.1:8500"
    assert cfg.tls is None and cfg.token is None


def test_env_address_forms() -> None:
    assert config_from_env({"CONSUL_HTTP_ADDR": "10.0.0.5:8501"}).base_url == "http://10.0.0.5:8501"
    assert config_from_env({"CONSUL_HTTP_ADDR": "http://c:8500"}).base_url == "http://c:8500"
    assert config_from_env({"CONSUL_HTTP_ADDR": "[::1]:8500"}).base_url == "http://[::1]:8500"
    # No port: the scheme's own, as the consul CLI does behind a load balancer.
    assert config_from_env({"CONSUL_HTTP_ADDR": "https://consul.example"}).base_url == (
        "https://consul.example"
    )
    unix = config_from_env({"CONSUL_HTTP_ADDR": "unix:///run/consul/http.sock"})
    assert unix.unix_socket == Path("/run/consul/http.sock")
    assert unix.base_url == "http://localhost"


def test_env_https_scheme_or_ssl_flag_selects_tls_with_its_files() -> None:
    env = {
        "CONSUL_HTTP_ADDR": "https://consul.service:8501",
        "CONSUL_CACERT": "/etc/consul/ca.pem",
        "CONSUL_CAPATH": "/etc/consul/cas",
        "CONSUL_CLIENT_CERT": "/etc/consul/agent.pem",
        "CONSUL_CLIENT_KEY": "/etc/consul/agent-key.pem",
        "CONSUL_TLS_SERVER_NAME": "server.dc1.consul",
    }
    cfg = config_from_env(env)
    assert cfg.base_url == "https://consul.service:8501"
    assert cfg.tls == ConsulTLS(
        ca_file=Path("/etc/consul/ca.pem"),
        ca_path=Path("/etc/consul/cas"),
        client_cert=Path("/etc/consul/agent.pem"),
        client_key=Path("/etc/consul/agent-key.pem"),
        server_name="server.dc1.consul",
        verify=True,
    )
    # CONSUL_HTTP_SSL=true is never downgraded by an http:// address ...
    flagged = config_from_env({"CONSUL_HTTP_ADDR": "http://c:8501", "CONSUL_HTTP_SSL": "true"})
    assert flagged.base_url == "https://c:8501"
    # ... and https:// is not downgraded by CONSUL_HTTP_SSL=false.
    assert config_from_env({"CONSUL_HTTP_ADDR": "https://c:1", "CONSUL_HTTP_SSL": "0"}).tls
    unverified = config_from_env({"CONSUL_HTTP_SSL": "1", "CONSUL_HTTP_SSL_VERIFY": "false"})
    assert unverified.tls is not None and unverified.tls.verify is False


def test_env_tls_files_are_ignored_without_https_as_in_consul() -> None:
    cfg = config_from_env({"CONSUL_CACERT": "/ca.pem", "CONSUL_CLIENT_CERT": "/c.pem"})
    assert cfg.tls is None


def test_env_token_and_token_file_and_empty_values() -> None:
    cfg = config_from_env(
        {"CONSUL_HTTP_TOKEN": "s3cret", "CONSUL_HTTP_TOKEN_FILE": "/t", "CONSUL_HTTP_SSL": ""}
    )
    assert (cfg.token, cfg.token_file, cfg.tls) == ("s3cret", Path("/t"), None)
    assert "s3cret" not in repr(cfg)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CONSUL_HTTP_ADDR": "ftp://c:21"}, "unknown scheme 'ftp'"),
        ({"CONSUL_HTTP_ADDR": "c:http"}, "port must be a number from 1 to 65535"),
        ({"CONSUL_HTTP_ADDR": "c:0"}, "port must be a number"),
        ({"CONSUL_HTTP_ADDR": "::1"}, "IPv6 hosts go in brackets"),
        ({"CONSUL_HTTP_ADDR": "http://c:8500/v1"}, "without a path"),
        ({"CONSUL_HTTP_ADDR": "unix://"}, "unix:// needs a socket path"),
        (
            {"CONSUL_HTTP_ADDR": "unix:///s.sock", "CONSUL_HTTP_SSL": "true"},
            "HTTPS over a unix socket is not supported",
        ),
        ({"CONSUL_HTTP_SSL": "yes"}, "CONSUL_HTTP_SSL='yes': expected true or false"),
        ({"CONSUL_HTTP_SSL_VERIFY": "nope"}, "CONSUL_HTTP_SSL_VERIFY='nope'"),
        (
            {"CONSUL_HTTP_SSL": "true", "CONSUL_CLIENT_CERT": "/c.pem"},
            "needs both client_cert and client_key",
        ),
    ],
)
def test_env_errors_name_the_variable_and_what_is_allowed(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConsulConfigError, match=message.replace("(", r"\(")):
        config_from_env(env)


def test_programmatic_config_is_checked_too() -> None:
    with pytest.raises(ConsulConfigError, match="without a scheme"):
        ConsulConfig(address="https://c:8501")
    with pytest.raises(ConsulConfigError, match="timeout must be a positive number"):
        ConsulConfig(timeout=0)
    with pytest.raises(ConsulConfigError, match="HTTPS over a unix socket"):
        ConsulConfig(unix_socket=Path("/s.sock"), tls=ConsulTLS())


def test_config_files_are_read_when_the_client_is_built(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    missing = tmp_path / "missing"
    with pytest.raises(ConsulConfigError, match="CONSUL_HTTP_TOKEN_FILE"):
        ConsulClient(ConsulConfig(token_file=missing))
    with pytest.raises(ConsulConfigError, match="CONSUL_CACERT"):
        ConsulClient(ConsulConfig(tls=ConsulTLS(ca_file=missing)))
    bad_pem = tmp_path / "bad.pem"
    bad_pem.write_text("not a certificate")
    with pytest.raises(ConsulConfigError, match="client certificate"):
        ConsulClient(ConsulConfig(tls=ConsulTLS(client_cert=bad_pem, client_key=bad_pem)))


# ---- against devstack: agent ---------------------------------------------------------------------


async def test_status_self_and_members(consul: ConsulClient, dev: DevServer) -> None:
    assert await consul.status.leader()
    assert await consul.status.peers() == (await consul.status.leader(),)
    me = await consul.agent.self()
    assert (me.node_name, me.datacenter) == ("meshlet-dev", "dc1")
    assert me.version.count(".") == 2
    assert me.raw["Config"]["NodeName"] == "meshlet-dev"
    members = await consul.agent.members()
    assert [(m.name, m.status) for m in members] == [("meshlet-dev", 1)]
    assert await consul.catalog.datacenters() == ("dc1",)


async def test_register_service_with_sidecar_and_read_it_back(consul: ConsulClient) -> None:
    await consul.agent.register_service(
        web(
            sidecar=SidecarService(
                proxy=ProxyConfig(
                    upstreams=(
                        Upstream("db", local_bind_port=9191, config={"protocol": "tcp"}),
                        Upstream("cache", local_bind_port=9192, datacenter="dc1"),
                    )
                )
            )
        )
    )
    services = await consul.agent.services()
    assert set(services) == {"web", "web-sidecar-proxy"}
    app = services["web"]
    assert (app.service, app.port, app.tags, dict(app.meta)) == (
        "web",
        8080,
        ("v1",),
        {"team": "mesh"},
    )
    assert app.kind == "" and app.proxy is None

    got = await consul.agent.service("web-sidecar-proxy")
    proxy = got.value
    assert got.content_hash and got.content_hash == proxy.content_hash
    assert proxy.kind == "connect-proxy"
    assert 21000 <= proxy.port <= 21255
    assert proxy.proxy is not None
    assert (proxy.proxy.destination_service_name, proxy.proxy.destination_service_id) == (
        "web",
        "web",
    )
    assert (proxy.proxy.local_service_address, proxy.proxy.local_service_port) == (
        "127.0.0.1",
        8080,
    )
    db, cache = proxy.proxy.upstreams
    assert (db.destination_name, db.local_bind_port, dict(db.config)) == (
        "db",
        9191,
        {"protocol": "tcp"},
    )
    assert (cache.destination_name, cache.local_bind_port, cache.datacenter) == (
        "cache",
        9192,
        "dc1",
    )
    # Consul's two default sidecar checks (listening and alias).
    checks = await consul.agent.checks()
    assert {"service:web-sidecar-proxy:1", "service:web-sidecar-proxy:2"} <= set(checks)

    await consul.agent.deregister_service("web")
    assert set(await consul.agent.services()) == set()  # the sidecar goes with its parent


async def test_connect_proxy_registered_on_its_own_is_found_by_connect_queries(
    consul: ConsulClient,
) -> None:
    await consul.agent.register_service(web())
    await consul.agent.register_service(
        ServiceRegistration(
            name="web-proxy",
            kind="connect-proxy",
            port=21500,
            address="10.1.2.3",
            proxy=ProxyConfig(
                destination_service_name="web",
                local_service_port=8080,
                upstreams=(Upstream("db", local_bind_port=9191),),
            ),
            checks=(CheckDefinition(check_id="proxy-ttl", ttl="30s", status="passing"),),
        )
    )
    via_catalog = (await consul.catalog.connect("web")).value
    assert [(s.service_id, s.kind, s.address, s.port) for s in via_catalog] == [
        ("web-proxy", "connect-proxy", "10.1.2.3", 21500)
    ]
    assert via_catalog[0].proxy is not None
    (upstream,) = via_catalog[0].proxy.upstreams
    assert (upstream.destination_name, upstream.local_bind_port) == ("db", 9191)

    via_health = (await consul.health.connect("web", passing=True)).value
    assert [(e.service_id, e.address, e.port, e.status) for e in via_health] == [
        ("web-proxy", "10.1.2.3", 21500, HealthStatus.PASSING)
    ]
    # The application itself is not a Connect endpoint.
    assert [s.service_id for s in (await consul.catalog.service("web")).value] == ["web"]


async def test_ttl_check_updates_drive_health(consul: ConsulClient) -> None:
    await consul.agent.register_service(web())
    entries = (await consul.health.service("web")).value
    (entry,) = entries
    # A check starts critical unless told otherwise; the node's serfHealth is in the entry too.
    assert entry.status is HealthStatus.CRITICAL
    assert {c.check_id for c in entry.checks} == {"serfHealth", "web-ttl"}
    assert entry.address == "127.0.0.1"  # no service address: the node's
    assert (await consul.health.service("web", passing=True)).value == ()

    await consul.agent.pass_check("web-ttl", note="all good")
    (entry,) = (await consul.health.service("web", passing=True)).value
    assert entry.status is HealthStatus.PASSING
    assert (await consul.agent.checks())["web-ttl"].output == "all good"

    await consul.agent.warn_check("web-ttl")
    assert (await consul.health.service("web")).value[0].status is HealthStatus.WARNING
    # passing=true drops warnings too, as Consul does.
    assert (await consul.health.service("web", passing=True)).value == ()

    await consul.agent.update_check("web-ttl", "passing", output="recovered")
    (check,) = (await consul.health.checks("web")).value
    assert (check.status, check.output, check.service_name) == (
        HealthStatus.PASSING,
        "recovered",
        "web",
    )
    await consul.agent.fail_check("web-ttl", note="down")
    critical = (await consul.health.state("critical")).value
    assert [(c.check_id, c.output) for c in critical] == [("web-ttl", "down")]
    node_checks = (await consul.health.node("meshlet-dev")).value
    assert {c.check_id for c in node_checks} == {"serfHealth", "web-ttl"}


async def test_standalone_check_register_and_deregister(consul: ConsulClient) -> None:
    await consul.agent.register_service(web(checks=()))
    await consul.agent.register_check(
        CheckDefinition(name="extra", check_id="extra", service_id="web", ttl="1m")
    )
    assert (await consul.agent.checks())["extra"].service_id == "web"
    await consul.agent.deregister_check("extra")
    assert "extra" not in await consul.agent.checks()
    with pytest.raises(ConsulNotFound) as err:
        await consul.agent.register_check(
            CheckDefinition(name="orphan", service_id="nope", ttl="1m")
        )
    assert err.value.message == 'ServiceID "nope" does not exist'


async def test_health_tags_filter_and_local_health_statuses(consul: ConsulClient) -> None:
    await consul.agent.register_service(web(checks=(CheckDefinition(check_id="a", ttl="1m"),)))
    await consul.agent.register_service(
        web(id="web-2", tags=("v2",), checks=(CheckDefinition(check_id="b", ttl="1m"),))
    )
    await consul.agent.pass_check("a")
    await consul.agent.warn_check("b")
    v2 = (await consul.health.service("web", tags=["v2"])).value
    assert [e.service_id for e in v2] == ["web-2"]
    filtered = (await consul.health.service("web", filter='"v1" in Service.Tags')).value
    assert [e.service_id for e in filtered] == ["web"]
    by_tag = (await consul.catalog.service("web", tags=["v1"])).value
    assert [s.service_id for s in by_tag] == ["web"]

    # The agent health endpoints answer 200/429/503; all are results, not errors.
    assert (await consul.agent.service_health_by_id("web")).status is HealthStatus.PASSING
    warned = await consul.agent.service_health_by_id("web-2")
    assert (warned.status, warned.service.id) == (HealthStatus.WARNING, "web-2")
    by_name = await consul.agent.service_health_by_name("web")
    assert sorted(h.status for h in by_name) == [HealthStatus.PASSING, HealthStatus.WARNING]
    await consul.agent.service_maintenance("web", True, reason="deploy")
    assert (await consul.agent.service_health_by_id("web")).status is HealthStatus.MAINTENANCE
    (entry,) = [e for e in (await consul.health.service("web")).value if e.service_id == "web"]
    assert entry.status is HealthStatus.MAINTENANCE
    await consul.agent.service_maintenance("web", False)
    assert (await consul.agent.service_health_by_id("web")).status is HealthStatus.PASSING
    with pytest.raises(ConsulNotFound):
        await consul.agent.service_health_by_id("nope")
    with pytest.raises(ConsulNotFound):
        await consul.agent.service_health_by_name("nope")


async def test_consuls_refusals_are_typed_with_its_messages(consul: ConsulClient) -> None:
    with pytest.raises(ConsulBadRequest) as bad:
        await consul.agent.register_service(ServiceRegistration(name="", port=1))
    assert (bad.value.status, bad.value.message) == (400, "Missing service name")
    with pytest.raises(ConsulBadRequest, match='unknown field "Bogus"'):
        await consul.agent.register_service({"Name": "x", "Bogus": 1})
    with pytest.raises(ConsulNotFound) as missing:
        await consul.agent.deregister_service("nope")
    assert missing.value.message.startswith('Unknown service ID "nope"')
    with pytest.raises(ConsulNotFound, match='Unknown check ID "nope"'):
        await consul.agent.pass_check("nope")
    with pytest.raises(ConsulNotFound, match="unknown service ID: nope"):
        await consul.agent.service("nope")
    with pytest.raises(ConsulRejected) as bad_filter:
        await consul.health.service("web", filter="Service.Port ==")
    assert bad_filter.value.status == 500
    assert bad_filter.value.message.startswith("Failed to create boolean expression evaluator")
    with pytest.raises(ConsulRejected, match="No path to datacenter"):
        await consul.catalog.services(dc="dc9")
    with pytest.raises(ConsulBadRequest, match="Invalid check status"):
        await consul.agent.update_check("serfHealth", "sideways")


# ---- against devstack: catalog and KV ------------------------------------------------------------


async def test_catalog_register_deregister_and_reads(consul: ConsulClient) -> None:
    assert dict((await consul.catalog.services()).value) == {"consul": ()}
    ok = await consul.catalog.register(
        {
            "Node": "ext-1",
            "Address": "192.0.2.10",
            "NodeMeta": {"rack": "r1"},
            "Service": {"ID": "db-1", "Service": "db", "Port": 5432, "Tags": ["primary"]},
            "Check": {
                "CheckID": "db-1-alive",
                "Name": "db",
                "Status": "passing",
                "ServiceID": "db-1",
            },
        }
    )
    assert ok is True
    assert dict((await consul.catalog.services()).value) == {"consul": (), "db": ("primary",)}
    (db,) = (await consul.catalog.service("db")).value
    assert (db.node, db.address, db.port, db.tags) == ("ext-1", "192.0.2.10", 5432, ("primary",))
    nodes = (await consul.catalog.nodes()).value
    assert {n.name for n in nodes} == {"meshlet-dev", "ext-1"}
    node = (await consul.catalog.node("ext-1")).value
    assert node is not None
    assert (node.node.address, dict(node.node.meta)) == ("192.0.2.10", {"rack": "r1"})
    assert set(node.services) == {"db-1"} and node.services["db-1"].port == 5432
    assert (await consul.catalog.node("nobody")).value is None
    (entry,) = (await consul.health.service("db", passing=True)).value
    assert entry.status is HealthStatus.PASSING

    assert await consul.catalog.deregister("ext-1", service_id="db-1") is True
    assert (await consul.catalog.service("db")).value == ()
    assert await consul.catalog.deregister("ext-1") is True
    assert {n.name for n in (await consul.catalog.nodes()).value} == {"meshlet-dev"}


async def test_kv_round_trip_cas_flags_recurse_keys(consul: ConsulClient) -> None:
    blob = bytes(range(256))
    assert await consul.kv.put("app/config/blob", blob, flags=42) is True
    got = (await consul.kv.get("app/config/blob")).value
    assert got is not None
    assert (got.key, got.value, got.flags) == ("app/config/blob", blob, 42)
    assert got.create_index == got.modify_index > 0

    # cas=0: only if absent; cas=<ModifyIndex>: only if unchanged since.
    assert await consul.kv.put("app/config/blob", b"x", cas=0) is False
    assert await consul.kv.put("app/config/blob", b"v2", cas=got.modify_index + 1000) is False
    assert await consul.kv.put("app/config/blob", b"v2", cas=got.modify_index) is True
    assert await consul.kv.put("app/config/new", "text", cas=0) is True
    await consul.kv.put("app/other", b"")
    await consul.kv.put("app/odd key?#%", b"odd")

    assert (await consul.kv.get("app/other")).value.value == b""  # type: ignore[union-attr]
    assert (await consul.kv.get("app/odd key?#%")).value.value == b"odd"  # type: ignore[union-attr]
    assert (await consul.kv.get("app/absent")).value is None
    listed = (await consul.kv.list("app/config/")).value
    assert [(p.key, p.value) for p in listed] == [
        ("app/config/blob", b"v2"),
        ("app/config/new", b"text"),
    ]
    assert (await consul.kv.keys("app/", separator="/")).value == (
        "app/config/",
        "app/odd key?#%",
        "app/other",
    )
    assert (await consul.kv.list("nothing/")).value == ()
    assert (await consul.kv.keys("nothing/")).value == ()

    current = (await consul.kv.get("app/config/new")).value
    assert current is not None
    assert await consul.kv.delete("app/config/new", cas=current.modify_index + 1000) is False
    assert await consul.kv.delete("app/config/new", cas=current.modify_index) is True
    assert await consul.kv.delete("app/", recurse=True) is True
    assert (await consul.kv.keys("app/")).value == ()


async def test_config_entry_get_put_delete_with_cas(consul: ConsulClient) -> None:
    assert await consul.config_entries.find("service-defaults", "api") is None
    body = {"Kind": "service-defaults", "Name": "api", "Protocol": "http"}
    assert await consul.config_entries.put(body, cas=0) is True
    assert await consul.config_entries.put(body, cas=0) is False
    held = await consul.config_entries.find("service-defaults", "api")
    assert held is not None and held["Protocol"] == "http"
    index = int(held["ModifyIndex"])
    assert await consul.config_entries.delete("service-defaults", "api", cas=index + 1000) is False
    assert await consul.config_entries.find("service-defaults", "api") is not None
    assert await consul.config_entries.delete("service-defaults", "api", cas=index) is True
    assert await consul.config_entries.find("service-defaults", "api") is None
    assert await consul.config_entries.delete("service-defaults", "absent") is True


# ---- blocking queries ----------------------------------------------------------------------------


async def test_blocking_health_query_wakes_on_change(consul: ConsulClient, dev: DevServer) -> None:
    first = await consul.health.service("web")
    assert first.value == () and first.index >= 1 and first.known_leader
    assert first.next_index == first.index
    task = await parked(dev, consul.health.service("web", index=first.index, wait="30s"))
    await consul.agent.register_service(web())
    async with asyncio.timeout(10):
        woke = await task
    assert woke.index > first.index and woke.next_index == woke.index
    assert [e.service_id for e in woke.value] == ["web"]


async def test_blocking_query_returns_unchanged_when_wait_runs_out(consul: ConsulClient) -> None:
    first = await consul.kv.get("watched")
    assert first.value is None
    loop = asyncio.get_running_loop()
    started = loop.time()
    again = await consul.kv.get("watched", index=first.index, wait="1s")
    elapsed = loop.time() - started
    # Consul holds the query for the wait (plus up to wait/16 of jitter).
    assert elapsed >= 0.95
    assert (again.value, again.index, again.next_index) == (None, first.index, first.index)


async def test_blocking_kv_get_waits_for_a_missing_key_to_appear(
    consul: ConsulClient, dev: DevServer
) -> None:
    first = await consul.kv.get("later")
    task = await parked(dev, consul.kv.get("later", index=first.index, wait="30s"))
    await consul.kv.put("later", b"here")
    async with asyncio.timeout(10):
        woke = await task
    assert woke.value is not None and woke.value.value == b"here"
    assert woke.index == woke.value.modify_index > first.index


async def test_blocking_query_survives_an_index_reset(consul: ConsulClient, dev: DevServer) -> None:
    for i in range(8):
        await consul.kv.put(f"svc/k{i}", b"v")
    before = await consul.kv.list("svc/")
    assert before.index > 5
    task = await parked(dev, consul.kv.list("svc/", index=before.index, wait="30s"))
    dev.store.rewind_index(5)  # as a snapshot restore does: every blocking query returns
    async with asyncio.timeout(10):
        after = await task
    assert after.index <= 5 < before.index
    assert after.reset and after.next_index == 0
    assert len(after.value) == 8

    # The watch starts over: a non-blocking read, then blocking on the new, lower index works.
    fresh = await consul.kv.list("svc/", index=after.next_index)
    assert fresh.next_index == fresh.index <= 5
    task = await parked(dev, consul.kv.list("svc/", index=fresh.next_index, wait="30s"))
    await consul.kv.put("svc/new", b"v")
    async with asyncio.timeout(10):
        woke = await task
    assert woke.index > fresh.index and not woke.reset
    assert "svc/new" in {p.key for p in woke.value}


async def test_hash_blocking_on_agent_service(consul: ConsulClient, dev: DevServer) -> None:
    await consul.agent.register_service(web())
    first = await consul.agent.service("web")
    loop = asyncio.get_running_loop()
    started = loop.time()
    same = await consul.agent.service("web", hash=first.content_hash, wait="1s")
    assert loop.time() - started >= 0.95
    assert same.content_hash == first.content_hash and same.value == first.value

    task = await parked(dev, consul.agent.service("web", hash=first.content_hash, wait="30s"))
    await consul.agent.register_service(web(tags=("v2",)))
    async with asyncio.timeout(10):
        changed = await task
    assert changed.content_hash != first.content_hash
    assert changed.value.tags == ("v2",)


# ---- ACLs ----------------------------------------------------------------------------------------


async def test_acl_token_is_sent_and_refusals_are_typed(tmp_path: Path) -> None:
    root = "8f2b1c4e-0000-4000-8000-00000000root"
    config = DevConfig(acl_initial_management_token=root, default_policy="deny")
    async with DevServer(config) as dev:
        token_file = tmp_path / "token"
        token_file.write_text(root + "\n")
        env_client = ConsulClient.from_env(
            {
                "CONSUL_HTTP_ADDR": dev.http_url,
                "CONSUL_HTTP_TOKEN_FILE": str(token_file),
                "CONSUL_HTTP_TOKEN": "ignored-when-the-file-has-one",
            }
        )
        async with (
            ConsulClient(ConsulConfig(address=dev.http_addr)) as anonymous,
            ConsulClient(ConsulConfig(address=dev.http_addr, token="not-a-token")) as unknown,
            ConsulClient(ConsulConfig(address=dev.http_addr, token=root)) as admin,
            env_client,
        ):
            with pytest.raises(ConsulPermissionDenied) as denied:
                await anonymous.agent.register_service(web())
            assert type(denied.value) is ConsulPermissionDenied
            assert denied.value.status == 403
            assert denied.value.message.startswith("Permission denied")
            with pytest.raises(ConsulACLNotFound) as not_found:
                await unknown.agent.register_service(web())
            assert not_found.value.message == "ACL not found"

            await admin.agent.register_service(web())
            assert "web" in (await admin.catalog.services()).value
            assert "web" in (await env_client.catalog.services()).value
            # Reads are filtered, not refused, for a token that may not see the service.
            assert "web" not in (await anonymous.catalog.services()).value
            with pytest.raises(ConsulPermissionDenied):
                await anonymous.kv.put("k", b"v")


# ---- transports: unix socket, HTTPS, keep-alive --------------------------------------------------


async def test_one_keep_alive_connection_serves_sequential_requests(dev: DevServer) -> None:
    async with SocketServer(relay_to(dev.http_addr)) as relay:
        async with ConsulClient(ConsulConfig(address=relay.address)) as consul:
            for _ in range(5):
                await consul.status.leader()
            await consul.kv.put("k", b"v")
            assert (await consul.kv.get("k")).value is not None
        assert relay.connections == 1


async def test_unix_socket_address(dev: DevServer, tmp_path: Path) -> None:
    sock = tmp_path / "consul.sock"
    async with SocketServer(relay_to(dev.http_addr), unix=sock) as relay:
        consul = ConsulClient.from_env({"CONSUL_HTTP_ADDR": f"unix://{sock}"})
        async with consul:
            assert await consul.status.leader()
            await consul.kv.put("over/unix", b"yes")
            got = await consul.kv.get("over/unix")
            assert got.value is not None and got.value.value == b"yes"
        assert relay.connections == 1


async def test_https_with_ca_and_client_certificate_from_env(dev: DevServer, pki: Pki) -> None:
    async with SocketServer(relay_to(dev.http_addr), tls=server_tls(pki)) as tls_front:
        env = {
            "CONSUL_HTTP_ADDR": f"https://{tls_front.address}",
            "CONSUL_CACERT": str(pki.ca),
            "CONSUL_CLIENT_CERT": str(pki.client_cert),
            "CONSUL_CLIENT_KEY": str(pki.client_key),
        }
        async with ConsulClient.from_env(env) as consul:
            assert await consul.status.leader()
            await consul.agent.register_service(web())
            assert "web" in await consul.agent.services()

        # The name to verify can differ from the address (CONSUL_TLS_SERVER_NAME).
        named = env | {"CONSUL_TLS_SERVER_NAME": pki.server_name}
        async with ConsulClient.from_env(named) as consul:
            assert await consul.status.leader()
        async with ConsulClient.from_env(env | {"CONSUL_TLS_SERVER_NAME": "evil.example"}) as c:
            with pytest.raises(ConsulUnavailable, match="TLS"):
                await c.status.leader()

        # A server certificate from a CA we do not trust is refused ...
        async with ConsulClient.from_env(env | {"CONSUL_CACERT": str(pki.other_ca)}) as c:
            with pytest.raises(ConsulUnavailable, match="TLS"):
                await c.status.leader()
        # ... unless verification is explicitly off.
        unverified = env | {"CONSUL_CACERT": str(pki.other_ca), "CONSUL_HTTP_SSL_VERIFY": "false"}
        async with ConsulClient.from_env(unverified) as consul:
            assert await consul.status.leader()

        # The server requires a client certificate: without one there is no answer.
        no_cert = {k: v for k, v in env.items() if not k.startswith("CONSUL_CLIENT")}
        async with ConsulClient(config_from_env(no_cert, timeout=2.0)) as c:
            with pytest.raises(ConsulUnavailable):
                await c.status.leader()


# ---- a Consul that is down or answers garbage ----------------------------------------------------


def _client(address: str, timeout: float = 0.5) -> ConsulClient:
    return ConsulClient(ConsulConfig(address=address, timeout=timeout))


def _http(status: str, body: bytes, headers: str = "") -> bytes:
    # The canned server hangs up after each answer, so it says so, as a real server would.
    head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
    head += f"{headers}\r\n"
    return head.encode() + body


async def test_connection_refused_is_unavailable(closed_port_address: str) -> None:
    async with _client(closed_port_address) as consul:
        with pytest.raises(ConsulUnavailable, match="cannot connect"):
            await consul.status.leader()
        with pytest.raises(ConsulUnavailable):
            await consul.health.service("web", index=5, wait="1s")


async def test_a_server_that_never_answers_hits_the_deadline() -> None:
    requests: list[bytes] = []
    async with SocketServer(silent(requests)) as server, _client(server.address, 0.3) as consul:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ConsulUnavailable, match="no complete answer"):
            await consul.kv.get("k")
        # Generous bounds: they tell a deadline (seconds) from a hang, not measure speed.
        assert loop.time() - started < 10.0
        # A blocking read is allowed its wait, Consul's jitter and the margin, and no more.
        started = loop.time()
        with pytest.raises(ConsulUnavailable, match="no complete answer"):
            await consul.kv.get("k", index=10, wait="1s")
        elapsed = loop.time() - started
        assert 1.0 + 1 / 16 + 0.3 - 0.05 <= elapsed < 15.0
        assert len(requests) == 2
        assert b"index=10" in requests[1] and b"wait=1s" in requests[1]


async def test_non_json_body_is_a_bad_response() -> None:
    reply = _http("200 OK", b"<html>hello</html>", "X-Consul-Index: 3\r\n")
    async with SocketServer(canned(reply)) as server, _client(server.address) as consul:
        with pytest.raises(ConsulBadResponse, match="not JSON"):
            await consul.health.service("web")
        with pytest.raises(ConsulBadResponse, match="not JSON"):
            await consul.status.leader()


async def test_wrong_shape_and_missing_index_are_bad_responses() -> None:
    shaped = _http("200 OK", b'{"not": "a list"}', "X-Consul-Index: 3\r\n")
    async with SocketServer(canned(shaped)) as server, _client(server.address) as consul:
        with pytest.raises(ConsulBadResponse, match="expected a list"):
            await consul.health.service("web")
        with pytest.raises(ConsulBadResponse, match="ID: expected a string, got null"):
            await consul.agent.service("web")
    no_index = _http("200 OK", b"[]")
    async with SocketServer(canned(no_index)) as server, _client(server.address) as consul:
        with pytest.raises(ConsulBadResponse, match="X-Consul-Index"):
            await consul.catalog.service("web")
    bad_entry = _http(
        "200 OK", b'[{"Node": {}, "Service": {}, "Checks": []}]', "X-Consul-Index: 3\r\n"
    )
    async with SocketServer(canned(bad_entry)) as server, _client(server.address) as consul:
        with pytest.raises(ConsulBadResponse, match="unexpected response shape"):
            await consul.health.service("web")


async def test_a_response_cut_off_mid_body_is_an_error_not_a_hang() -> None:
    body = b'[{"Key": "k", "Value": "dg=="}]'
    truncated = b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\nX-Consul-Index: 4\r\n\r\n" + body[:10]
    async with SocketServer(canned(truncated)) as server, _client(server.address, 5.0) as consul:
        async with asyncio.timeout(2):
            with pytest.raises(ConsulUnavailable):
                await consul.kv.list("k")


async def test_a_dropped_connection_is_not_silently_retried() -> None:
    requests: list[bytes] = []

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))

    async with SocketServer(hang_up) as server, _client(server.address) as consul:
        with pytest.raises(ConsulUnavailable, match="closed the connection"):
            await consul.kv.put("k", b"v", cas=7)
        # A KV CAS sent twice could report a spurious `False`; exactly one attempt went out.
        assert len(requests) == 1
        assert server.connections == 1


async def test_not_http_at_all_is_a_bad_response() -> None:
    ssh = canned(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    async with SocketServer(ssh) as server, _client(server.address) as consul:
        with pytest.raises(ConsulBadResponse, match="not an HTTP answer"):
            await consul.status.leader()


async def test_a_zero_index_from_a_buggy_consul_is_treated_as_one() -> None:
    zero = _http("200 OK", b"[]", "X-Consul-Index: 0\r\nX-Consul-KnownLeader: false\r\n")
    async with SocketServer(canned(zero)) as server, _client(server.address) as consul:
        got = await consul.health.service("web")
        assert (got.value, got.index, got.next_index, got.known_leader) == ((), 1, 1, False)
        # Blocking on 5 and getting 0 back is the index going backwards: start over.
        again = await consul.health.service("web", index=5, wait="1s")
        assert (again.index, again.next_index, again.reset) == (1, 0, True)


async def test_the_token_travels_in_the_header_not_the_url() -> None:
    requests: list[bytes] = []
    reply = _http("200 OK", b'"127.0.0.1:8300"')
    async with SocketServer(canned(reply, requests=requests)) as server:
        config = ConsulConfig(address=server.address, token="s3cret-token")
        async with ConsulClient(config) as consul:
            assert await consul.status.leader() == "127.0.0.1:8300"
    (head,) = requests
    request_line, *header_lines = head.decode().split("\r\n")
    assert request_line == "GET /v1/status/leader HTTP/1.1"
    assert "X-Consul-Token: s3cret-token" in header_lines


async def test_errors_from_a_proxy_in_front_are_unavailable_and_others_rejected() -> None:
    gateway = _http("502 Bad Gateway", b"upstream down")
    async with SocketServer(canned(gateway)) as server, _client(server.address) as consul:
        with pytest.raises(ConsulUnavailable, match="502 upstream down"):
            await consul.status.leader()
    teapot = _http("418 I'm a teapot", b"short and stout")
    async with SocketServer(canned(teapot)) as server, _client(server.address) as consul:
        with pytest.raises(ConsulRejected) as err:
            await consul.status.leader()
        assert (err.value.status, err.value.message) == (418, "short and stout")
    moved = _http("302 Found", b"", "Location: http://elsewhere/\r\n")
    async with SocketServer(canned(moved)) as server, _client(server.address) as consul:
        with pytest.raises(ConsulBadResponse, match="302"):
            await consul.status.leader()


async def test_every_error_is_a_consul_error_and_a_closed_client_refuses_work(
    closed_port_address: str,
) -> None:
    consul = _client(closed_port_address)
    with pytest.raises(ConsulError):
        await consul.status.leader()
    await consul.close()
    with pytest.raises(RuntimeError, match="closed"):
        await consul.status.leader()
