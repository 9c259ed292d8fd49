"""The compiled discovery chain for documented examples equals Consul's JSON for them.

Expected JSON is written out from consul agent/structs/discovery_chain.go (field names and
omitempty), agent/consul/discoverychain/compile.go (node names, catch-all route, default
connect timeout 5s, failover targets) and agent/connect/sni.go (SNI).
"""

from __future__ import annotations

from typing import Any

import pytest

from traffic.chain import ChainEntries, CompileRequest, compile_chain, validate_graph
from traffic.defaults import ProxyDefaults, service_defaults_from_json
from traffic.entries import load_entry
from traffic.errors import GraphError

TD = "11111111-2222-3333-4444-555555555555.consul"


def _entries(*bodies: dict[str, Any]) -> ChainEntries:
    models: list[Any] = []
    for body in bodies:
        if body["Kind"] == "service-defaults":
            models.append(service_defaults_from_json(body))
        else:
            models.append(load_entry(body))
    return ChainEntries.of(models)


def _target(service: str, subset: str = "", filt: str = "", dc: str = "dc1") -> dict[str, Any]:
    tid = f"{subset + '.' if subset else ''}{service}.default.default.{dc}"
    sni = f"{subset + '.' if subset else ''}{service}.default.{dc}.internal.{TD}"
    out: dict[str, Any] = {
        "ConnectTimeout": "5s",
        "ID": tid,
        "Service": service,
        "Namespace": "default",
        "Partition": "default",
        "Datacenter": dc,
        "MeshGateway": {},
        "Subset": {"Filter": filt} if filt else {},
        "TransparentProxy": {},
        "SNI": sni,
        "Name": sni,
    }
    if subset:
        out["ServiceSubset"] = subset
    return out


def _resolver(tid: str, **extra: Any) -> dict[str, Any]:
    return {
        "Type": "resolver",
        "Name": tid,
        "Resolver": {"ConnectTimeout": "5s", "Target": tid, **extra},
    }


HTTP_API = {"Kind": "service-defaults", "Name": "api", "Protocol": "http"}
API_RESOLVER = {
    "Kind": "service-resolver",
    "Name": "api",
    "DefaultSubset": "v1",
    "Subsets": {
        "v1": {"Filter": "Service.Meta.version == v1"},
        "v2": {"Filter": "Service.Meta.version == v2"},
    },
}


def test_default_chain_for_a_service_with_no_entries() -> None:
    chain = compile_chain(CompileRequest("web", TD), ChainEntries())
    assert chain.to_json() == {
        "ServiceName": "web",
        "Namespace": "default",
        "Partition": "default",
        "Datacenter": "dc1",
        "Default": True,
        "Protocol": "tcp",
        "StartNode": "resolver:web.default.default.dc1",
        "Nodes": {
            "resolver:web.default.default.dc1": _resolver("web.default.default.dc1", Default=True)
        },
        "Targets": {"web.default.default.dc1": _target("web")},
    }


def test_canary_virtualservice_as_consul_entries() -> None:
    """shared/examples/canary-virtualservice.yaml: x-canary: true -> v2, else v1/v2 90/10."""
    entries = _entries(
        HTTP_API,
        API_RESOLVER,
        {
            "Kind": "service-router",
            "Name": "api",
            "Routes": [
                {
                    "Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "true"}]}},
                    "Destination": {"Service": "api", "ServiceSubset": "v2"},
                }
            ],
        },
        {
            "Kind": "service-splitter",
            "Name": "api",
            "Splits": [
                {"Weight": 90, "Service": "api", "ServiceSubset": "v1"},
                {"Weight": 10, "Service": "api", "ServiceSubset": "v2"},
            ],
        },
    )
    chain = compile_chain(CompileRequest("api", TD), entries).to_json()
    assert chain == {
        "ServiceName": "api",
        "Namespace": "default",
        "Partition": "default",
        "Datacenter": "dc1",
        "Protocol": "http",
        "StartNode": "router:api.default.default",
        "Nodes": {
            "router:api.default.default": {
                "Type": "router",
                "Name": "api.default.default",
                "Routes": [
                    {
                        "Definition": {
                            "Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "true"}]}},
                            "Destination": {"Service": "api", "ServiceSubset": "v2"},
                        },
                        "NextNode": "resolver:v2.api.default.default.dc1",
                    },
                    {
                        "Definition": {
                            "Match": {"HTTP": {"PathPrefix": "/"}},
                            "Destination": {
                                "Service": "api",
                                "Namespace": "default",
                                "Partition": "default",
                            },
                        },
                        "NextNode": "splitter:api.default.default",
                    },
                ],
            },
            "splitter:api.default.default": {
                "Type": "splitter",
                "Name": "api.default.default",
                "Splits": [
                    {
                        "Definition": {"Weight": 90, "Service": "api", "ServiceSubset": "v1"},
                        "Weight": 90,
                        "NextNode": "resolver:v1.api.default.default.dc1",
                    },
                    {
                        "Definition": {"Weight": 10, "Service": "api", "ServiceSubset": "v2"},
                        "Weight": 10,
                        "NextNode": "resolver:v2.api.default.default.dc1",
                    },
                ],
            },
            "resolver:v1.api.default.default.dc1": _resolver("v1.api.default.default.dc1"),
            "resolver:v2.api.default.default.dc1": _resolver("v2.api.default.default.dc1"),
        },
        "Targets": {
            "v1.api.default.default.dc1": _target("api", "v1", "Service.Meta.version == v1"),
            "v2.api.default.default.dc1": _target("api", "v2", "Service.Meta.version == v2"),
        },
    }


def test_payment_virtualservice_as_consul_entries() -> None:
    """shared/examples/payment-virtualservice.yaml: 10 s timeout, 3 retries on three conditions
    (the per-try timeout has no Consul field)."""
    entries = _entries(
        {"Kind": "service-defaults", "Name": "payment-service", "Protocol": "http"},
        {
            "Kind": "service-router",
            "Name": "payment-service",
            "Routes": [
                {
                    "Match": {"HTTP": {"PathPrefix": "/"}},
                    "Destination": {
                        "Service": "payment-service",
                        "RequestTimeout": "10s",
                        "NumRetries": 3,
                        "RetryOnConnectFailure": True,
                        "RetryOn": ["gateway-error", "connect-failure", "retriable-4xx"],
                    },
                }
            ],
        },
    )
    chain = compile_chain(CompileRequest("payment-service", TD), entries).to_json()
    tid = "payment-service.default.default.dc1"
    assert chain["StartNode"] == "router:payment-service.default.default"
    assert chain["Nodes"] == {
        "router:payment-service.default.default": {
            "Type": "router",
            "Name": "payment-service.default.default",
            "Routes": [
                {
                    "Definition": {
                        "Match": {"HTTP": {"PathPrefix": "/"}},
                        "Destination": {
                            "RequestTimeout": "10s",
                            "Service": "payment-service",
                            "NumRetries": 3,
                            "RetryOnConnectFailure": True,
                            "RetryOn": ["gateway-error", "connect-failure", "retriable-4xx"],
                        },
                    },
                    "NextNode": f"resolver:{tid}",
                },
                {
                    "Definition": {
                        "Match": {"HTTP": {"PathPrefix": "/"}},
                        "Destination": {
                            "Service": "payment-service",
                            "Namespace": "default",
                            "Partition": "default",
                        },
                    },
                    "NextNode": f"resolver:{tid}",
                },
            ],
        },
        f"resolver:{tid}": _resolver(tid, Default=True),
    }
    assert chain["Targets"] == {tid: _target("payment-service")}
    assert "Default" not in chain


def test_resolver_failover_redirect_and_timeouts() -> None:
    """The service-resolver docs' failover example: datacenters in order, never itself."""
    entries = _entries(
        {
            "Kind": "service-resolver",
            "Name": "db",
            "ConnectTimeout": "3s",
            "RequestTimeout": "15s",
            "Failover": {"*": {"Datacenters": ["dc1", "dc2", "dc3"]}},
            "LoadBalancer": {"Policy": "least_request", "LeastRequestConfig": {"ChoiceCount": 3}},
        },
        {"Kind": "service-resolver", "Name": "legacy-db", "Redirect": {"Service": "db"}},
    )
    chain = compile_chain(CompileRequest("legacy-db", TD), entries).to_json()
    assert chain["StartNode"] == "resolver:db.default.default.dc1"
    assert "Default" not in chain  # the start resolver is not legacy-db's own default
    assert chain["Nodes"] == {
        "resolver:db.default.default.dc1": {
            "Type": "resolver",
            "Name": "db.default.default.dc1",
            "Resolver": {
                "ConnectTimeout": "3s",
                "RequestTimeout": 15_000_000_000,
                "Target": "db.default.default.dc1",
                "Failover": {"Targets": ["db.default.default.dc2", "db.default.default.dc3"]},
            },
            "LoadBalancer": {"Policy": "least_request", "LeastRequestConfig": {"ChoiceCount": 3}},
        }
    }
    assert sorted(chain["Targets"]) == [
        "db.default.default.dc1",
        "db.default.default.dc2",
        "db.default.default.dc3",
    ]
    assert chain["Targets"]["db.default.default.dc2"]["SNI"] == f"db.default.dc2.internal.{TD}"
    assert chain["Targets"]["db.default.default.dc2"]["ConnectTimeout"] == "3s"


def test_nested_splitters_are_flattened_with_multiplied_weights() -> None:
    entries = _entries(
        {"Kind": "service-defaults", "Name": "web", "Protocol": "http"},
        {"Kind": "service-defaults", "Name": "api", "Protocol": "http"},
        API_RESOLVER,
        {
            "Kind": "service-splitter",
            "Name": "web",
            "Splits": [
                {"Weight": 50, "RequestHeaders": {"Set": {"x-leg": "web"}}},
                {"Weight": 50, "Service": "api"},
            ],
        },
        {
            "Kind": "service-splitter",
            "Name": "api",
            "Splits": [
                {"Weight": 66.67, "ServiceSubset": "v1", "RequestHeaders": {"Set": {"x-v": "1"}}},
                {"Weight": 33.33, "ServiceSubset": "v2"},
            ],
        },
    )
    chain = compile_chain(CompileRequest("web", TD), entries).to_json()
    splits = chain["Nodes"]["splitter:web.default.default"]["Splits"]
    assert [(s["Weight"], s["NextNode"]) for s in splits] == [
        (50, "resolver:web.default.default.dc1"),
        (33.34, "resolver:v1.api.default.default.dc1"),
        (16.67, "resolver:v2.api.default.default.dc1"),
    ]
    assert splits[1]["Definition"] == {
        "Weight": 66.67,
        "ServiceSubset": "v1",
        "RequestHeaders": {"Set": {"x-v": "1"}},
    }
    assert "splitter:api.default.default" not in chain["Nodes"]
    compiled = compile_chain(CompileRequest("web", TD), entries)
    legs = compiled.nodes["splitter:web.default.default"].splits
    assert [leg.hundredths for leg in legs] == [5000, 3334, 1667]


@pytest.mark.parametrize(
    ("bodies", "service", "text"),
    [
        (
            [
                {
                    "Kind": "service-splitter",
                    "Name": "web",
                    "Splits": [{"Weight": 100, "Service": "other"}],
                }
            ],
            "web",
            'discovery chain "web" uses a protocol "tcp" that does not permit advanced routing or '
            "splitting behavior",
        ),
        (
            [
                HTTP_API,
                {
                    "Kind": "service-router",
                    "Name": "api",
                    "Routes": [{"Destination": {"Service": "db"}}],
                },
            ],
            "api",
            'discovery chain "api" uses inconsistent protocols; service "db" has "tcp" which is '
            'not "http"',
        ),
        (
            [
                HTTP_API,
                {
                    "Kind": "service-router",
                    "Name": "api",
                    "Routes": [{"Destination": {"ServiceSubset": "v3"}}],
                },
            ],
            "api",
            'service "api" does not have a subset named "v3"',
        ),
        (
            [
                {"Kind": "service-resolver", "Name": "a", "Redirect": {"Service": "b"}},
                {"Kind": "service-resolver", "Name": "b", "Redirect": {"Service": "a"}},
            ],
            "a",
            "detected circular resolver redirect: [a.default.default.dc1 -> b.default.default.dc1 "
            "-> a.default.default.dc1]",
        ),
        (
            [
                {"Kind": "service-defaults", "Name": "a", "Protocol": "http"},
                {"Kind": "service-defaults", "Name": "b", "Protocol": "http"},
                {
                    "Kind": "service-splitter",
                    "Name": "a",
                    "Splits": [{"Weight": 100, "Service": "b"}],
                },
                {
                    "Kind": "service-splitter",
                    "Name": "b",
                    "Splits": [{"Weight": 100, "Service": "a"}],
                },
            ],
            "a",
            "detected circular reference: [splitter:a.default.default -> "
            "splitter:b.default.default -> splitter:a.default.default]",
        ),
        (
            [
                {"Kind": "service-defaults", "Name": "ext", "ExternalSNI": "ext.example.com"},
                {"Kind": "service-resolver", "Name": "ext", "Subsets": {"v1": {}}},
            ],
            "ext",
            'service "ext" has an external SNI set; cannot define subsets for external services',
        ),
    ],
)
def test_graph_errors_carry_consul_texts(
    bodies: list[dict[str, Any]], service: str, text: str
) -> None:
    entries = _entries(*bodies)
    with pytest.raises(GraphError) as err:
        compile_chain(CompileRequest(service, TD), entries)
    assert str(err.value) == text
    with pytest.raises(GraphError):
        validate_graph(entries, TD)


def test_overrides_customize_the_chain() -> None:
    entries = _entries(
        HTTP_API,
        API_RESOLVER,
        {
            "Kind": "service-splitter",
            "Name": "api",
            "Splits": [
                {"Weight": 50, "ServiceSubset": "v1"},
                {"Weight": 50, "ServiceSubset": "v2"},
            ],
        },
    )
    tcp = compile_chain(CompileRequest("api", TD, override_protocol="tcp"), entries).to_json()
    # A non-HTTP override drops the splitter and marks the chain customized.
    assert tcp["Protocol"] == "tcp"
    assert tcp["StartNode"] == "resolver:v1.api.default.default.dc1"
    assert len(tcp["CustomizationHash"]) == 8
    timed = compile_chain(
        CompileRequest(
            "api", TD, override_connect_timeout_ns=1_000_000_000, override_mesh_gateway_mode="local"
        ),
        entries,
    ).to_json()
    target = timed["Targets"]["v1.api.default.default.dc1"]
    assert (target["ConnectTimeout"], target["MeshGateway"]) == ("1s", {"Mode": "local"})
    assert timed["CustomizationHash"] != tcp["CustomizationHash"]
    plain = compile_chain(CompileRequest("api", TD), entries).to_json()
    assert "CustomizationHash" not in plain


def test_proxy_defaults_protocol_applies_when_no_service_defaults() -> None:
    entries = ChainEntries.of(
        [
            ProxyDefaults(protocol="http"),
            load_entry(
                {
                    "Kind": "service-router",
                    "Name": "web",
                    "Routes": [{"Match": {"HTTP": {"PathPrefix": "/a"}}}],
                }
            ),
        ]
    )
    assert compile_chain(CompileRequest("web", TD), entries).protocol == "http"


def test_router_docs_example_prefix_to_another_service() -> None:
    """service-router docs: requests under /admin go to the admin service."""
    entries = _entries(
        {"Kind": "service-defaults", "Name": "web", "Protocol": "http"},
        {"Kind": "service-defaults", "Name": "admin", "Protocol": "http"},
        {
            "Kind": "service-router",
            "Name": "web",
            "Routes": [
                {
                    "Match": {"HTTP": {"PathPrefix": "/admin"}},
                    "Destination": {"Service": "admin", "PrefixRewrite": "/"},
                }
            ],
        },
    )
    chain = compile_chain(CompileRequest("web", TD), entries).to_json()
    assert chain["Nodes"]["router:web.default.default"]["Routes"] == [
        {
            "Definition": {
                "Match": {"HTTP": {"PathPrefix": "/admin"}},
                "Destination": {"Service": "admin", "PrefixRewrite": "/"},
            },
            "NextNode": "resolver:admin.default.default.dc1",
        },
        {
            "Definition": {
                "Match": {"HTTP": {"PathPrefix": "/"}},
                "Destination": {"Service": "web", "Namespace": "default", "Partition": "default"},
            },
            "NextNode": "resolver:web.default.default.dc1",
        },
    ]
    assert chain["Targets"] == {
        "admin.default.default.dc1": _target("admin"),
        "web.default.default.dc1": _target("web"),
    }
    assert chain["Nodes"]["resolver:admin.default.default.dc1"] == _resolver(
        "admin.default.default.dc1", Default=True
    )


def test_splitters_nested_beyond_the_stack_are_a_graph_error_not_a_crash() -> None:
    """Attack: a write that nests splitters deeper than Python's stack (RecursionError before)."""
    depth = 1500
    models: list[Any] = [
        load_entry(
            {
                "Kind": "service-splitter",
                "Name": f"s{i}",
                "Splits": [{"Weight": 100, "Service": f"s{i + 1}"}],
            }
        )
        for i in range(depth)
    ]
    models += [
        service_defaults_from_json(
            {"Kind": "service-defaults", "Name": f"s{i}", "Protocol": "http"}
        )
        for i in range(depth + 1)
    ]
    entries = ChainEntries.of(models)
    with pytest.raises(GraphError) as err:
        compile_chain(CompileRequest("s0", TD), entries)
    assert str(err.value) == 'discovery chain "s0" nests splitters too deeply for this server'
    # A shallow part of the same graph still compiles.
    chain = compile_chain(CompileRequest(f"s{depth - 3}", TD), entries)
    assert chain.start_node == f"splitter:s{depth - 3}.default.default"
