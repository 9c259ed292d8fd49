"""The Go types Consul filters, as :mod:`devstack.filter` schemas.

Each schema lists the fields go-bexpr v0.1.2 exposes for the Go type Consul hands to
``bexpr.CreateFilter`` on that endpoint: exported fields minus those tagged ``bexpr:"-"``
(raft indexes, enterprise meta, check definitions, opaque ``Config`` maps, ...). The source of
truth is ``hashicorp/consul:agent/structs/structs_filtering_test.go``, which pins these field
sets for Node, NodeService, ServiceNode, HealthCheck and CheckServiceNode (and asserts that
``api.AgentService`` matches NodeService), cross-checked with the selector tables in the API docs.
Consul renders these types with their Go field names as JSON keys, which is what lets one schema
serve both validation and the walk over the rendered JSON.
"""

from __future__ import annotations

from typing import Final

from devstack.bexpr import (
    BOOL,
    INT,
    STRING,
    UINT8,
    UINT16,
    IPAddress,
    ListOf,
    MapOf,
    Struct,
    struct,
)

__all__ = [
    "AGENT_CHECK",
    "AGENT_MEMBER",
    "AGENT_SERVICE",
    "CATALOG_NODE",
    "CATALOG_SERVICE_NODE",
    "HEALTH_ENTRY",
    "INTENTION",
    "NODE_SERVICE",
]

_STRING_MAP: Final = MapOf(STRING)

# structs.ServiceAddress / api.ServiceAddress: the values of a service's TaggedAddresses.
_SERVICE_ADDRESS: Final = struct(Address=STRING, Port=INT)

_WEIGHTS: Final = struct(Passing=INT, Warning=INT)

_MESH_GATEWAY: Final = struct(Mode=STRING)

_UPSTREAM: Final = struct(
    DestinationType=STRING,
    DestinationNamespace=STRING,
    DestinationPartition=STRING,
    DestinationPeer=STRING,
    DestinationName=STRING,
    Datacenter=STRING,
    LocalBindAddress=STRING,
    LocalBindPort=INT,
    LocalBindSocketPath=STRING,
    LocalBindSocketMode=STRING,
    MeshGateway=_MESH_GATEWAY,
)

_EXPOSE_PATH: Final = struct(
    ListenerPort=INT,
    Path=STRING,
    LocalPathPort=INT,
    Protocol=STRING,
    ParsedFromCheck=BOOL,
)

_ENVOY_EXTENSION: Final = struct(
    Name=STRING,
    Required=BOOL,
    ConsulVersion=STRING,
    EnvoyVersion=STRING,
)

# structs.ConnectProxyConfig (ServiceProxy, Service.Proxy) and api.AgentServiceConnectProxyConfig.
_CONNECT_PROXY: Final = struct(
    EnvoyExtensions=ListOf(_ENVOY_EXTENSION),
    DestinationServiceName=STRING,
    DestinationServiceID=STRING,
    LocalServiceAddress=STRING,
    LocalServicePort=INT,
    LocalServiceSocketPath=STRING,
    Mode=STRING,
    Upstreams=ListOf(_UPSTREAM),
    MeshGateway=_MESH_GATEWAY,
    Expose=struct(Checks=BOOL, Paths=ListOf(_EXPOSE_PATH)),
    TransparentProxy=struct(OutboundListenerPort=INT, DialedDirectly=BOOL),
    AccessLogs=struct(
        Enabled=BOOL,
        DisableListenerLogs=BOOL,
        Type=STRING,
        Path=STRING,
        JSONFormat=STRING,
        TextFormat=STRING,
    ),
)

_SERVICE_CONNECT: Final = struct(Native=BOOL)

# structs.Node: /v1/catalog/nodes entries and the "Node" of health entries.
_NODE: Final = struct(
    ID=STRING,
    Node=STRING,
    Partition=STRING,
    PeerName=STRING,
    Address=STRING,
    Datacenter=STRING,
    TaggedAddresses=_STRING_MAP,
    Meta=_STRING_MAP,
)

NODE_SERVICE: Final[Struct] = struct(
    Kind=STRING,
    ID=STRING,
    Service=STRING,
    Tags=ListOf(STRING),
    Address=STRING,
    TaggedAddresses=MapOf(_SERVICE_ADDRESS),
    Meta=_STRING_MAP,
    Port=INT,
    SocketPath=STRING,
    Weights=_WEIGHTS,
    EnableTagOverride=BOOL,
    Proxy=_CONNECT_PROXY,
    Connect=_SERVICE_CONNECT,
    PeerName=STRING,
)
"""structs.NodeService: the "Service" of health entries and /v1/catalog/node/:node services."""

AGENT_SERVICE: Final[Struct] = NODE_SERVICE
"""Values of /v1/agent/services (api.AgentService; Consul's own test pins it to NodeService)."""

AGENT_CHECK: Final[Struct] = struct(
    Node=STRING,
    CheckID=STRING,
    Name=STRING,
    Status=STRING,
    Notes=STRING,
    Output=STRING,
    ServiceID=STRING,
    ServiceName=STRING,
    ServiceTags=ListOf(STRING),
    Type=STRING,
    Interval=STRING,
    Timeout=STRING,
    ExposedPort=INT,
    PeerName=STRING,
    # A time.Time: selectable, but it has no exported fields and supports no operator.
    LastCheckStartTime=struct(),
)
"""structs.HealthCheck: /v1/agent/checks values, /v1/health/checks, /state and /node entries."""

AGENT_MEMBER: Final[Struct] = struct(
    Name=STRING,
    Addr=IPAddress(),
    Port=UINT16,
    Tags=_STRING_MAP,
    Status=INT,
    ProtocolMin=UINT8,
    ProtocolMax=UINT8,
    ProtocolCur=UINT8,
    DelegateMin=UINT8,
    DelegateMax=UINT8,
    DelegateCur=UINT8,
)
"""serf.Member: /v1/agent/members entries (Status is serf's MemberStatus, an int)."""

CATALOG_NODE: Final[Struct] = _NODE
"""structs.Node: /v1/catalog/nodes entries."""

CATALOG_SERVICE_NODE: Final[Struct] = struct(
    ID=STRING,
    Node=STRING,
    Address=STRING,
    Datacenter=STRING,
    TaggedAddresses=_STRING_MAP,
    NodeMeta=_STRING_MAP,
    ServiceKind=STRING,
    ServiceID=STRING,
    ServiceName=STRING,
    ServiceTags=ListOf(STRING),
    ServiceAddress=STRING,
    ServiceTaggedAddresses=MapOf(_SERVICE_ADDRESS),
    ServiceMeta=_STRING_MAP,
    ServicePort=INT,
    ServiceSocketPath=STRING,
    ServiceWeights=_WEIGHTS,
    ServiceEnableTagOverride=BOOL,
    ServiceProxy=_CONNECT_PROXY,
    ServiceConnect=_SERVICE_CONNECT,
    PeerName=STRING,
)
"""structs.ServiceNode: /v1/catalog/service/:s and /connect/:s entries; /v1/catalog/services
filters these instances before grouping them by name."""

HEALTH_ENTRY: Final[Struct] = struct(
    Node=_NODE,
    Service=NODE_SERVICE,
    Checks=ListOf(AGENT_CHECK),
)
"""structs.CheckServiceNode: /v1/health/service/:s and /v1/health/connect/:s entries."""

INTENTION: Final[Struct] = struct(
    Action=STRING,
    Description=STRING,
    DestinationNS=STRING,
    DestinationName=STRING,
    ID=STRING,
    Meta=_STRING_MAP,
    Precedence=INT,
    SourceNS=STRING,
    SourceName=STRING,
    SourceType=STRING,
)
"""structs.Intention, as /v1/connect/intentions lists it (selectors from intentions.mdx)."""
