"""connect.local_app: the local app's timeouts from a proxy's Config and service-defaults,
merged as Consul merges them, and bad values refused naming the field (pure)."""

from __future__ import annotations

import pytest

from connect.local_app import DEFAULT_LOCAL_APP, LocalAppTimeouts, effective_local_app


def test_nothing_set_is_envoys_defaults_under_consul() -> None:
    # local_connect_timeout_ms 5000 (Consul's default), Envoy's 15 s route timeout, no route
    # idle timeout (Envoy's 5 min stream idle timeout: the listener's idle limit).
    assert effective_local_app() == DEFAULT_LOCAL_APP == LocalAppTimeouts(5.0, 15.0, None)


def test_the_registration_wins_then_service_defaults_then_proxy_defaults() -> None:
    mesh = {"local_connect_timeout_ms": 100, "local_request_timeout_ms": 200}
    entry = {"Name": "api", "LocalConnectTimeoutMs": 300, "LocalRequestTimeoutMs": 400}
    own = {"local_request_timeout_ms": 500, "local_idle_timeout_ms": 600}
    assert effective_local_app(mesh) == LocalAppTimeouts(0.1, 0.2, None)
    assert effective_local_app(mesh, entry) == LocalAppTimeouts(0.3, 0.4, None)
    assert effective_local_app(mesh, entry, own) == LocalAppTimeouts(0.3, 0.5, 0.6)


def test_a_service_defaults_0_is_unset_as_consul_copies_only_positive_values() -> None:
    mesh = {"local_request_timeout_ms": 200}
    entry = {"Name": "api", "LocalConnectTimeoutMs": 0, "LocalRequestTimeoutMs": 0}
    assert effective_local_app(mesh, entry) == LocalAppTimeouts(5.0, 0.2, None)


def test_0_in_a_config_turns_the_request_and_idle_timeouts_off() -> None:
    # Envoy's route timeout and idle_timeout of 0 disable them.
    own = {"local_request_timeout_ms": 0, "local_idle_timeout_ms": 0}
    assert effective_local_app({"local_idle_timeout_ms": 9}, None, own) == LocalAppTimeouts(
        5.0, None, None
    )


@pytest.mark.parametrize(
    ("mesh", "entry", "own", "named"),
    [
        ({"local_request_timeout_ms": -1}, None, None, "proxy-defaults Config.local_request"),
        (None, {"LocalConnectTimeoutMs": -5}, None, "service-defaults.LocalConnectTimeoutMs"),
        (None, {"LocalRequestTimeoutMs": "1s"}, None, "service-defaults.LocalRequestTimeoutMs"),
        (None, None, {"local_idle_timeout_ms": "300ms"}, "Proxy.Config.local_idle_timeout_ms"),
        (None, None, {"local_connect_timeout_ms": -1}, "Proxy.Config.local_connect_timeout_ms"),
        (None, None, {"local_request_timeout_ms": "-5"}, "Proxy.Config.local_request_timeout"),
        (None, None, {"local_request_timeout_ms": float("nan")}, "Proxy.Config.local_request"),
        # Hostile sizes: no overflow out of the decoder, a refusal naming the field.
        (None, None, {"local_request_timeout_ms": 10**400}, "Proxy.Config.local_request"),
        (None, None, {"local_idle_timeout_ms": "9" * 5000}, "Proxy.Config.local_idle_timeout"),
        (None, None, {"local_idle_timeout_ms": "\u00b2"}, "Proxy.Config.local_idle_timeout"),
        (None, {"LocalRequestTimeoutMs": 10**400}, None, "service-defaults.LocalRequestTimeoutMs"),
        (None, None, {"local_request_timeout_ms": True}, "Proxy.Config.local_request_timeout"),
        (None, None, ["local_request_timeout_ms"], "sidecar registration Proxy.Config: must"),
    ],
)
def test_a_bad_value_is_refused_naming_where(
    mesh: object, entry: object, own: object, named: str
) -> None:
    with pytest.raises(ValueError) as err:
        effective_local_app(mesh, entry, own)
    assert named in str(err.value)


def test_a_config_value_is_read_as_consul_reads_it_weakly_typed() -> None:
    # Consul's ParseProxyConfig decodes Config with mapstructure's WeaklyTypedInput: a number
    # is truncated, a string of digits is its number, and a connect timeout under 1 ms is
    # its 5000 default. (service-defaults fields are typed ints: Consul refuses others.)
    own = {"local_request_timeout_ms": "300", "local_idle_timeout_ms": 1500.9}
    assert effective_local_app(None, None, own) == LocalAppTimeouts(5.0, 0.3, 1.5)
    mesh = {"local_connect_timeout_ms": 100}
    assert effective_local_app(mesh, None, {"local_connect_timeout_ms": 0}).connect_timeout == 0.1
    assert effective_local_app({"local_connect_timeout_ms": ""}) == DEFAULT_LOCAL_APP


def test_keys_that_are_not_ours_are_left_alone() -> None:
    assert effective_local_app({"protocol": "http", "tracing": {"x": 1}}) == DEFAULT_LOCAL_APP
