"""What Nomad sends and writes for a Connect group's sidecar, as test data.

`registration` is the body Nomad's Consul client PUTs to /v1/agent/service/register for a
group service with `connect { sidecar_service {} }` (nomad command/agent/consul/connect.go):
the parent service with `Connect.SidecarService`, whose proxy Consul registers as
`<parent ID>-sidecar-proxy`. `bootstrap` is what `consul connect envoy -bootstrap` writes to
`${NOMAD_SECRETS_DIR}/envoy_bootstrap.json` (Consul's bootstrap template, trimmed to the parts
that name the proxy, the agent and the token).

One deliberate difference: Nomad sets `bind_address` to 0.0.0.0 inside the group's network
namespace; tests listen on loopback only, so `bind_address` is a parameter.
"""

from __future__ import annotations

from typing import Any

JOB = "web-api"


def parent_id(alloc: str, group: str, service: str, port_label: str) -> str:
    # nomad client/serviceregistration/id.go MakeAllocServiceID, for a group service.
    return f"_nomad-task-{alloc}-group-{group}-{service}-{port_label}"


def proxy_id(alloc: str, group: str, service: str, port_label: str) -> str:
    return parent_id(alloc, group, service, port_label) + "-sidecar-proxy"


def registration(
    *,
    alloc: str,
    group: str,
    service: str,
    app_port: int,
    proxy_port: int,
    protocol: str = "http",
    upstreams: tuple[tuple[str, int, str], ...] = (),
    bind_address: str = "127.0.0.1",
    check_interval: str = "1s",
) -> dict[str, Any]:
    """Nomad's registration of `service` (port label = the app port, as `port = "8080"`)."""
    pid = parent_id(alloc, group, service, str(app_port))
    return {
        "ID": pid,
        "Name": service,
        "Tags": [],
        "Port": app_port,
        "Address": "127.0.0.1",
        "Meta": {"external-source": "nomad"},
        "Checks": [
            {
                "Name": f"{service}-health",
                "HTTP": f"http://127.0.0.1:{app_port}/health",
                "Interval": check_interval,
                "Timeout": "1s",
            }
        ],
        "Connect": {
            "SidecarService": {
                "Port": proxy_port,
                "Address": "127.0.0.1",
                "Proxy": {
                    "LocalServiceAddress": "127.0.0.1",
                    "LocalServicePort": app_port,
                    "Config": {
                        "bind_address": bind_address,
                        "bind_port": proxy_port,
                        "protocol": protocol,
                        "envoy_stats_tags": [
                            f"nomad.group={group}",
                            f"nomad.job={JOB}",
                            "nomad.namespace=default",
                            f"nomad.alloc_id={alloc}",
                        ],
                    },
                    "Upstreams": [
                        {
                            "DestinationType": "service",
                            "DestinationName": name,
                            "LocalBindPort": port,
                            "Config": {"protocol": up_protocol},
                        }
                        for name, port, up_protocol in upstreams
                    ],
                },
                "Checks": [
                    {
                        "Name": "Connect Sidecar Listening",
                        "TCP": f"127.0.0.1:{proxy_port}",
                        "Interval": check_interval,
                    },
                    {"Name": f"Connect Sidecar Aliasing {pid}", "AliasService": pid},
                ],
            }
        },
    }


def bootstrap(proxy: str, cluster: str, token: str = "", admin: str = "127.0.0.2:19001") -> Any:
    host, _, port = admin.rpartition(":")
    return {
        "admin": {
            "access_log_path": "/dev/null",
            "address": {"socket_address": {"address": host, "port_value": int(port)}},
        },
        "node": {"cluster": cluster, "id": proxy, "metadata": {"namespace": "default"}},
        "static_resources": {
            "clusters": [
                {
                    "name": "local_agent",
                    "ignore_health_on_host_removal": False,
                    "connect_timeout": "1s",
                    "type": "STATIC",
                    "http2_protocol_options": {},
                    "loadAssignment": {
                        "clusterName": "local_agent",
                        "endpoints": [
                            {
                                "lbEndpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "pipe": {"path": "alloc/tmp/consul_grpc.sock"}
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ]
        },
        "dynamic_resources": {
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "ads_config": {
                "api_type": "DELTA_GRPC",
                "transport_api_version": "V3",
                "grpc_services": {
                    "initial_metadata": [{"key": "x-consul-token", "value": token}],
                    "envoy_grpc": {"cluster_name": "local_agent"},
                },
            },
        },
    }
