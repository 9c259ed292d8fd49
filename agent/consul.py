"""meshlet's own async Consul HTTP client.

    async with ConsulClient(config_from_env(os.environ)) as consul:
        got = await consul.health.service("web", passing=True)
        while True:
            got = await consul.health.service("web", passing=True, index=got.next_index)
            ...

One pool of keep-alive connections per client (agent/consul_wire.py); endpoints grouped as
Consul's API groups them (`agent`, `catalog`, `health`, `kv`, `status`). Index-blocking reads
take `index` and `wait` and return `Indexed`; `agent.service` blocks on a content hash and
returns `Hashed`. Each call is one HTTP request with a deadline and no retries: the watch loop
that calls it decides when to try again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar
from urllib.parse import quote

from agent.consul_blocking import (
    Hashed,
    Indexed,
    Wait,
    effective_wait,
    format_duration,
    next_index,
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
from agent.consul_http import ConsulHTTP, Params, Response
from agent.consul_json import JSONObject, ShapeError, as_list, as_object, str_tuple
from agent.consul_results import (
    AgentSelf,
    AgentService,
    CatalogNode,
    CatalogService,
    HealthCheck,
    HealthStatus,
    KVPair,
    LocalServiceHealth,
    Member,
    Node,
    ServiceEntry,
    aggregate_status,
)
from agent.consul_services import (
    CheckDefinition,
    ProxyConfig,
    ServiceRegistration,
    SidecarService,
    Upstream,
    Weights,
    registration_body,
)

if TYPE_CHECKING:
    # Imported where used: connect.leaf brings cryptography (~14 MB), which a node agent
    # without a sidecar never needs.
    from connect.leaf import Leaf, TrustBundle

# The client's public surface in one place; the modules behind it stay small and focused.
__all__ = [
    "AgentSelf",
    "AgentService",
    "CatalogNode",
    "CatalogService",
    "CheckDefinition",
    "ConsulACLNotFound",
    "ConsulBadRequest",
    "ConsulBadResponse",
    "ConsulClient",
    "ConsulConfig",
    "ConsulConfigError",
    "ConsulError",
    "ConsulNotFound",
    "ConsulPermissionDenied",
    "ConsulRejected",
    "ConsulTLS",
    "ConsulUnavailable",
    "Hashed",
    "HealthCheck",
    "HealthStatus",
    "Indexed",
    "KVPair",
    "LocalServiceHealth",
    "Member",
    "Node",
    "ProxyConfig",
    "ServiceEntry",
    "ServiceRegistration",
    "SidecarService",
    "Upstream",
    "Wait",
    "Weights",
    "aggregate_status",
    "config_from_env",
    "next_index",
]

T = TypeVar("T")


def _segment(name: str) -> str:
    """One path segment (a service name or ID, a check ID, a node): '/' is data, not a path."""
    return quote(name, safe="")


def _decode(resp: Response, decoder: Callable[[Any], T]) -> T:
    try:
        return decoder(resp.json())
    except ShapeError as exc:
        raise resp.bad(f"unexpected response shape: {exc}") from None


def _decode_body(resp: Response, decoder: Callable[[bytes], T]) -> T:
    """`_decode` for a decoder that parses the body itself (typed, skipping unused fields)."""
    if not resp.body:
        raise resp.bad(f"empty body with status {resp.status}, expected JSON")
    try:
        return decoder(resp.body)
    except ShapeError as exc:
        raise resp.bad(f"unexpected response shape: {exc}") from None


def _tuple_of(item: Callable[[Any], T]) -> Callable[[Any], tuple[T, ...]]:
    return lambda value: tuple(item(v) for v in as_list(value, "response"))


def _map_of(item: Callable[[Any], T]) -> Callable[[Any], Mapping[str, T]]:
    return lambda value: MappingProxyType(
        {k: item(v) for k, v in as_object(value, "response").items()}
    )


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ShapeError(f"expected true or false, got {value!r:.40}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ShapeError(f"expected a string, got {value!r:.40}")
    return value


def _tags_by_service(value: Any) -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType({k: str_tuple(v, k) for k, v in as_object(value, "response").items()})


def _read_params(
    *,
    dc: str,
    index: int,
    wait: Wait | None,
    stale: bool,
    filter: str = "",
    near: str = "",
    peer: str = "",
) -> tuple[list[tuple[str, str]], float | None]:
    """Common read parameters, and the wait Consul will hold the request for (None: won't)."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    params: list[tuple[str, str]] = []
    if dc:
        params.append(("dc", dc))
    if filter:
        params.append(("filter", filter))
    if near:
        params.append(("near", near))
    if peer:
        params.append(("peer", peer))
    if stale:
        params.append(("stale", ""))
    if index == 0:
        # Consul ignores `wait` without an index; so does the deadline.
        return params, None
    seconds = effective_wait(wait)
    params += [("index", str(index)), ("wait", format_duration(seconds))]
    return params, seconds


class _Group:
    def __init__(self, http: ConsulHTTP) -> None:
        self._http = http

    async def _get(
        self,
        path: str,
        decoder: Callable[[Any], T],
        params: Params = (),
        ok: Sequence[int] = (200,),
    ) -> T:
        resp = await self._http.request("GET", path, params=params)
        resp.raise_for_status(ok)
        return _decode(resp, decoder)

    async def _indexed(
        self,
        path: str,
        decoder: Callable[[Any], T],
        params: Params,
        blocking_wait: float | None,
        index: int,
        *,
        missing: Callable[[], T] | None = None,
        body_decoder: Callable[[bytes], T] | None = None,
    ) -> Indexed[T]:
        resp = await self._http.request("GET", path, params=params, blocking_wait=blocking_wait)
        if missing is not None and resp.status == 404:
            # KV answers a missing key with 404 plus the index headers; the watch goes on.
            value = missing()
        else:
            resp.raise_for_status()
            if body_decoder is not None:
                value = _decode_body(resp, body_decoder)
            else:
                value = _decode(resp, decoder)
        meta = resp.query_meta(index)
        return Indexed(value, meta.index, meta.next_index, meta.known_leader, meta.last_contact)

    async def _put(
        self, path: str, payload: Any = None, params: Params = (), ok: Sequence[int] = (200,)
    ) -> Response:
        if payload is None:
            resp = await self._http.request("PUT", path, params=params)
        else:
            resp = await self._http.send_json("PUT", path, payload, params=params)
        resp.raise_for_status(ok)
        return resp


class AgentAPI(_Group):
    """`/v1/agent/*`: the local agent's own services and checks (not index-blocking)."""

    async def self(self) -> AgentSelf:
        return await self._get("/v1/agent/self", AgentSelf.from_json)

    async def members(self, *, wan: bool = False) -> tuple[Member, ...]:
        params = [("wan", "1")] if wan else []
        return await self._get("/v1/agent/members", _tuple_of(Member.from_json), params)

    async def services(self, *, filter: str = "") -> Mapping[str, AgentService]:
        """Local services keyed by service ID, sidecar proxies included."""
        params = [("filter", filter)] if filter else []
        return await self._get("/v1/agent/services", _map_of(AgentService.from_json), params)

    async def service(
        self, service_id: str, *, hash: str = "", wait: Wait | None = None
    ) -> Hashed[AgentService]:
        """One local service; with `hash`, block until its definition no longer hashes to it.

        Raises `ConsulNotFound` when no local service has this ID.
        """
        params: list[tuple[str, str]] = []
        blocking: float | None = None
        if hash:
            blocking = effective_wait(wait)
            params = [("hash", hash), ("wait", format_duration(blocking))]
        path = f"/v1/agent/service/{_segment(service_id)}"
        resp = await self._http.request("GET", path, params=params, blocking_wait=blocking)
        resp.raise_for_status()
        service = _decode(resp, AgentService.from_json)
        content_hash = resp.headers.get("X-Consul-ContentHash") or service.content_hash
        if not content_hash:
            raise resp.bad("no X-Consul-ContentHash header nor ContentHash field")
        return Hashed(service, content_hash)

    async def register_service(
        self,
        definition: ServiceRegistration | JSONObject,
        *,
        replace_existing_checks: bool = False,
    ) -> None:
        """Register (or replace) a local service; a raw JSON object is sent as is."""
        params = [("replace-existing-checks", "true")] if replace_existing_checks else []
        await self._put("/v1/agent/service/register", registration_body(definition), params)

    async def deregister_service(self, service_id: str) -> None:
        """Remove a local service, its checks and its sidecar. Unknown ID: `ConsulNotFound`."""
        await self._put(f"/v1/agent/service/deregister/{_segment(service_id)}")

    async def service_maintenance(self, service_id: str, enable: bool, reason: str = "") -> None:
        params = [("enable", "true" if enable else "false")]
        if reason:
            params.append(("reason", reason))
        await self._put(f"/v1/agent/service/maintenance/{_segment(service_id)}", params=params)

    async def node_maintenance(self, enable: bool, reason: str = "") -> None:
        params = [("enable", "true" if enable else "false")]
        if reason:
            params.append(("reason", reason))
        await self._put("/v1/agent/maintenance", params=params)

    async def checks(self, *, filter: str = "") -> Mapping[str, HealthCheck]:
        params = [("filter", filter)] if filter else []
        return await self._get("/v1/agent/checks", _map_of(HealthCheck.from_json), params)

    async def register_check(self, definition: CheckDefinition | JSONObject) -> None:
        body = registration_body(definition, standalone=True)
        await self._put("/v1/agent/check/register", body)

    async def deregister_check(self, check_id: str) -> None:
        await self._put(f"/v1/agent/check/deregister/{_segment(check_id)}")

    async def _ttl(self, verb: str, check_id: str, note: str) -> None:
        params = [("note", note)] if note else []
        await self._put(f"/v1/agent/check/{verb}/{_segment(check_id)}", params=params)

    async def pass_check(self, check_id: str, note: str = "") -> None:
        """Set a TTL check passing and restart its TTL."""
        await self._ttl("pass", check_id, note)

    async def warn_check(self, check_id: str, note: str = "") -> None:
        await self._ttl("warn", check_id, note)

    async def fail_check(self, check_id: str, note: str = "") -> None:
        await self._ttl("fail", check_id, note)

    async def update_check(self, check_id: str, status: str, output: str = "") -> None:
        """Set a TTL check's status ("passing", "warning", "critical") and output."""
        await self._put(
            f"/v1/agent/check/update/{_segment(check_id)}", {"Status": status, "Output": output}
        )

    # The agent health endpoints put the verdict in the status code: 200 passing, 429 warning,
    # 503 critical or maintenance. All three carry the same JSON body.
    _HEALTH_STATUSES = (200, 429, 503)

    async def service_health_by_name(self, name: str) -> tuple[LocalServiceHealth, ...]:
        """Health of every local instance of `name`. Unknown name: `ConsulNotFound`."""
        return await self._get(
            f"/v1/agent/health/service/name/{_segment(name)}",
            _tuple_of(LocalServiceHealth.from_json),
            ok=self._HEALTH_STATUSES,
        )

    async def service_health_by_id(self, service_id: str) -> LocalServiceHealth:
        """Health of one local instance. Unknown ID: `ConsulNotFound`."""
        return await self._get(
            f"/v1/agent/health/service/id/{_segment(service_id)}",
            LocalServiceHealth.from_json,
            ok=self._HEALTH_STATUSES,
        )


class CatalogAPI(_Group):
    """`/v1/catalog/*`: the cluster-wide registry (index-blocking reads)."""

    async def datacenters(self) -> tuple[str, ...]:
        return await self._get("/v1/catalog/datacenters", _tuple_of(_str))

    async def services(
        self,
        *,
        filter: str = "",
        dc: str = "",
        index: int = 0,
        wait: Wait | None = None,
        stale: bool = False,
    ) -> Indexed[Mapping[str, tuple[str, ...]]]:
        """Service names with the union of their instances' tags."""
        params, blocking = _read_params(dc=dc, index=index, wait=wait, stale=stale, filter=filter)
        return await self._indexed(
            "/v1/catalog/services", _tags_by_service, params, blocking, index
        )

    async def _instances(
        self,
        what: str,
        name: str,
        *,
        tags: Sequence[str],
        filter: str,
        near: str,
        dc: str,
        index: int,
        wait: Wait | None,
        stale: bool,
    ) -> Indexed[tuple[CatalogService, ...]]:
        params, blocking = _read_params(
            dc=dc, index=index, wait=wait, stale=stale, filter=filter, near=near
        )
        params += [("tag", tag) for tag in tags]
        path = f"/v1/catalog/{what}/{_segment(name)}"
        return await self._indexed(
            path, _tuple_of(CatalogService.from_json), params, blocking, index
        )

    async def service(
        self,
        name: str,
        *,
        tags: Sequence[str] = (),
        filter: str = "",
        near: str = "",
        dc: str = "",
        index: int = 0,
        wait: Wait | None = None,
        stale: bool = False,
    ) -> Indexed[tuple[CatalogService, ...]]:
        """Instances of `name` having all of `tags` (no health filtering)."""
        return await self._instances(
            "service",
            name,
            tags=tags,
            filter=filter,
            near=near,
            dc=dc,
            index=index,
            wait=wait,
            stale=stale,
        )

    async def connect(
        self,
        name: str,
        *,
        tags: Sequence[str] = (),
        filter: str = "",
        near: str = "",
        dc: str = "",
        index: int = 0,
        wait: Wait | None = None,
        stale: bool = False,
    ) -> Indexed[tuple[CatalogService, ...]]:
        """Connect-capable endpoints for `name`: its proxies and its Connect-native instances."""
        return await self._instances(
            "connect",
            name,
            tags=tags,
            filter=filter,
            near=near,
            dc=dc,
            index=index,
            wait=wait,
            stale=stale,
        )

    async def nodes(
        self,
        *,
        filter: str = "",
        near: str = "",
        dc: str = "",
        index: int = 0,
        wait: Wait | None = None,
        stale: bool = False,
    ) -> Indexed[tuple[Node, ...]]:
        params, blocking = _read_params(
            dc=dc, index=index, wait=wait, stale=stale, filter=filter, near=near
        )
        return await self._indexed(
            "/v1/catalog/nodes", _tuple_of(Node.from_json), params, blocking, index
        )

    async def node(
        self,
        node: str,
        *,
        filter: str = "",
        dc: str = "",
        index: int = 0,
        wait: Wait | None = None,
        stale: bool = False,
    ) -> Indexed[CatalogNode | None]:
        """A node and its services; `value` is None for an unknown node (Consul sends null)."""
        params, blocking = _read_params(dc=dc, index=index, wait=wait, stale=stale, filter=filter)

        def decode(value: Any) -> CatalogNode | None:
            return None if value is None else CatalogNode.from_json(value)

        return await self._indexed(
            f"/v1/catalog/node/{_segment(node)}", decode, params, blocking, index
        )

    async def register(self, registration: JSONObject) -> bool:
        """`PUT /v1/catalog/register` with Consul's `CatalogRegistration` body, as JSON."""
        resp = await self._put("/v1/catalog/register", dict(registration))
        return _decode(resp, _bool)

    async def deregister(
        self, node: str, *, service_id: str = "", check_id: str = "", dc: str = ""
    ) -> bool:
        """Remove a node, or only one of its services, or only one of its checks."""
        body = {"Node": node}
        for key, value in (("ServiceID", service_id), ("CheckID", check_id), ("Datacenter", dc)):
            if value:
                body[key] = value
        resp = await self._put("/v1/catalog/deregister", body)
        return _decode(resp, _bool)


class HealthAPI(_Group):
    """`/v1/health/*`: instances with their checks (index-blocking reads)."""

    async def _entries(
        self,
        what: str,
        name: str,
        *,
        passing: bool,
        tags: Sequence[str],
        filter: str,
        near: str,
        dc: str,
        index: int,
        wait: Wait | None,
        stale: bool,
        peer: str = "",
    ) -> Indexed[tuple[ServiceEntry, ...]]:
        params, blocking = _read_params(
            dc=dc, index=index, wait=wait, stale=stale, filter=filter, near=near, peer=peer
        )
        params += [("tag", tag) for tag in tags]
        if passing:
            params.append(("passing", "1"))
        path = f"/v1/health/{what}/{_segment(name)}"
        return await self._indexed(path, _tuple_of(ServiceEntry.from_json), params, blocking, index)

    async def service(
        self,
        name: str,
        *,
        passing: bool = False,
        tags: Sequence[str] = (),
        filter: str = "",
        near: str = "",
        dc: str = "",
        index: int = 0,
        wait: Wait | None = None,
        stale: bool = False,
        peer: str = "",
    ) -> Indexed[tuple[ServiceEntry, ...]]:
        """Instances of `name`; `passing` keeps only those whose every check passes; `peer`
        reads them from a cluster peer's imported services instead of this cluster."""
        return await self._entries(
            "service",
            name,
            passing=passing,
            tags=tags,
            filter=filter,
            near=near,
            dc=dc,
            index=index,
            wait=wait,
            stale=stale,
            peer=peer,
        )

    async def connect(
        self,
        name: str,
        *,
        passing: bool = False,
        tags: Sequence[str] = (),
        filter: str = "",
        near: str = "",
        dc: str = "",
        index: int = 0,
        wait: Wait | None = None,
        stale: bool = False,
        peer: str = "",
    ) -> Indexed[tuple[ServiceEntry, ...]]:
        """The proxies (and Connect-native instances) to dial to reach `name`, with health."""
        return await self._entries(
            "connect",
            name,
            passing=passing,
            tags=tags,
            filter=filter,
            near=near,
            dc=dc,
            index=index,
            wait=wait,
            stale=stale,
            peer=peer,
        )

    async def connect_decoded(
        self,
        name: str,
        decode: Callable[[bytes], T],
        *,
        passing: bool = False,
        filter: str = "",
        dc: str = "",
        index: int = 0,
        wait: Wait | None = None,
        peer: str = "",
    ) -> Indexed[T]:
        """`connect`, with the answer's body handed to `decode` instead of being turned into
        `ServiceEntry`s: for callers that decode only what they keep and skip entries they
        have already validated (the agent's incremental watch, agent/health_entries.py). A
        `ShapeError` from `decode` is a `ConsulBadResponse`."""
        params, blocking = _read_params(
            dc=dc, index=index, wait=wait, stale=False, filter=filter, peer=peer
        )
        if passing:
            params.append(("passing", "1"))
        path = f"/v1/health/connect/{_segment(name)}"
        return await self._indexed(path, decode, params, blocking, index, body_decoder=decode)

    async def _checks(
        self,
        path: str,
        *,
        filter: str,
        dc: str,
        index: int,
        wait: Wait | None,
        stale: bool,
        near: str = "",
    ) -> Indexed[tuple[HealthCheck, ...]]:
        params, blocking = _read_params(
            dc=dc, index=index, wait=wait, stale=stale, filter=filter, near=near
        )
        return await self._indexed(path, _tuple_of(HealthCheck.from_json), params, blocking, index)

    async def checks(
        self,
        service: str,
        *,
        filter: str = "",
        near: str = "",
        dc: str = "",
        index: int = 0,
        wait: Wait | None = None,
        stale: bool = False,
    ) -> Indexed[tuple[HealthCheck, ...]]:
        """The checks of every instance of `service` (node checks not included)."""
        path = f"/v1/health/checks/{_segment(service)}"
        return await self._checks(
            path, filter=filter, near=near, dc=dc, index=index, wait=wait, stale=stale
        )

    async def state(
        self,
        state: HealthStatus | str = "any",
        *,
        filter: str = "",
        near: str = "",
        dc: str = "",
        index: int = 0,
        wait: Wait | None = None,
        stale: bool = False,
    ) -> Indexed[tuple[HealthCheck, ...]]:
        """All checks in `state` ("any", "passing", "warning" or "critical")."""
        path = f"/v1/health/state/{_segment(str(state))}"
        return await self._checks(
            path, filter=filter, near=near, dc=dc, index=index, wait=wait, stale=stale
        )

    async def node(
        self,
        node: str,
        *,
        filter: str = "",
        dc: str = "",
        index: int = 0,
        wait: Wait | None = None,
        stale: bool = False,
    ) -> Indexed[tuple[HealthCheck, ...]]:
        """Every check on `node`, node-level and service-level."""
        path = f"/v1/health/node/{_segment(node)}"
        return await self._checks(path, filter=filter, dc=dc, index=index, wait=wait, stale=stale)


def _kv_path(key: str) -> str:
    # As Consul's Go client does: a leading "/" is not part of the key.
    return "/v1/kv/" + quote(key.removeprefix("/"), safe="/")


class KVAPI(_Group):
    """`/v1/kv/*`: the key/value store. Reads block on the key's (or prefix's) index."""

    async def get(
        self,
        key: str,
        *,
        dc: str = "",
        index: int = 0,
        wait: Wait | None = None,
        stale: bool = False,
    ) -> Indexed[KVPair | None]:
        """One key; `value` is None while it does not exist (and blocking waits for it)."""
        params, blocking = _read_params(dc=dc, index=index, wait=wait, stale=stale)

        def decode(value: Any) -> KVPair | None:
            pairs = as_list(value, "response")
            if len(pairs) != 1:
                raise ShapeError(f"expected exactly one entry for a key, got {len(pairs)}")
            return KVPair.from_json(pairs[0])

        return await self._indexed(
            _kv_path(key), decode, params, blocking, index, missing=lambda: None
        )

    async def list(
        self,
        prefix: str,
        *,
        dc: str = "",
        index: int = 0,
        wait: Wait | None = None,
        stale: bool = False,
    ) -> Indexed[tuple[KVPair, ...]]:
        """Every key under `prefix` with its value (`?recurse`), sorted by key."""
        params, blocking = _read_params(dc=dc, index=index, wait=wait, stale=stale)
        params.append(("recurse", ""))
        return await self._indexed(
            _kv_path(prefix),
            _tuple_of(KVPair.from_json),
            params,
            blocking,
            index,
            missing=tuple,
        )

    async def keys(
        self,
        prefix: str = "",
        *,
        separator: str = "",
        dc: str = "",
        index: int = 0,
        wait: Wait | None = None,
        stale: bool = False,
    ) -> Indexed[tuple[str, ...]]:
        """Key names under `prefix`; with `separator`, grouped up to its first occurrence."""
        params, blocking = _read_params(dc=dc, index=index, wait=wait, stale=stale)
        params.append(("keys", ""))
        if separator:
            params.append(("separator", separator))
        return await self._indexed(
            _kv_path(prefix), _tuple_of(_str), params, blocking, index, missing=tuple
        )

    async def put(
        self,
        key: str,
        value: bytes | str,
        *,
        flags: int = 0,
        cas: int | None = None,
        dc: str = "",
    ) -> bool:
        """Write a key. With `cas`, only if its ModifyIndex is `cas` (0: only if absent);
        False means the compare-and-set lost."""
        params: list[tuple[str, str]] = []
        if flags:
            params.append(("flags", str(flags)))
        if cas is not None:
            params.append(("cas", str(cas)))
        if dc:
            params.append(("dc", dc))
        data = value.encode() if isinstance(value, str) else value
        resp = await self._http.request(
            "PUT",
            _kv_path(key),
            params=params,
            body=data,
            content_type="application/octet-stream",
        )
        resp.raise_for_status()
        return _decode(resp, _bool)

    async def delete(
        self, key: str, *, recurse: bool = False, cas: int | None = None, dc: str = ""
    ) -> bool:
        """Delete a key, or every key under a prefix with `recurse`. False: the CAS lost."""
        params: list[tuple[str, str]] = []
        if recurse:
            params.append(("recurse", ""))
        if cas is not None:
            params.append(("cas", str(cas)))
        if dc:
            params.append(("dc", dc))
        resp = await self._http.request("DELETE", _kv_path(key), params=params)
        resp.raise_for_status()
        return _decode(resp, _bool)


def _connect_decoder(parse: Callable[[JSONObject], T]) -> Callable[[Any], T]:
    from connect.leaf import MalformedAnswer

    def decode(value: Any) -> T:
        try:
            return parse(as_object(value, "response"))
        except MalformedAnswer as exc:
            raise ShapeError(str(exc)) from None

    return decode


class ConnectAPI(_Group):
    """`/v1/agent/connect/*`: the agent's CA roots and leaf certificates (index-blocking).

    Answers decode into connect's immutable `TrustBundle` and `Leaf`, which is what the
    certificate rotator consumes; the private key stays inside the `Leaf` (never in a repr).
    """

    async def ca_roots(self, *, index: int = 0, wait: Wait | None = None) -> Indexed[TrustBundle]:
        """Every root to trust and the active one; blocks until they change (a rotation)."""
        from connect.leaf import TrustBundle

        params, blocking = _read_params(dc="", index=index, wait=wait, stale=False)
        return await self._indexed(
            "/v1/agent/connect/ca/roots",
            _connect_decoder(TrustBundle.from_consul),
            params,
            blocking,
            index,
        )

    async def leaf(
        self, service: str, *, index: int = 0, wait: Wait | None = None
    ) -> Indexed[Leaf]:
        """`service`'s leaf; with `index` (its ModifyIndex), wait until the agent replaces it."""
        from connect.leaf import Leaf

        params, blocking = _read_params(dc="", index=index, wait=wait, stale=False)
        return await self._indexed(
            f"/v1/agent/connect/ca/leaf/{_segment(service)}",
            _connect_decoder(Leaf.from_consul),
            params,
            blocking,
            index,
        )

    async def authorize(
        self, target: str, client_cert_uri: str, client_cert_serial: str = ""
    ) -> tuple[bool, str]:
        """Whether `client_cert_uri` may connect to `target`, and Consul's reason."""
        body = {
            "Target": target,
            "ClientCertURI": client_cert_uri,
            "ClientCertSerial": client_cert_serial,
        }
        resp = await self._http.send_json("POST", "/v1/agent/connect/authorize", body)
        resp.raise_for_status()
        obj = _decode(resp, lambda v: as_object(v, "response"))
        allowed, reason = obj.get("Authorized"), obj.get("Reason", "")
        if not isinstance(allowed, bool) or not isinstance(reason, str):
            raise resp.bad("authorize: expected Authorized (bool) and Reason (string)")
        return allowed, reason


class StatusAPI(_Group):
    """`/v1/status/*`: raft leader and peers; a cheap liveness probe of the cluster."""

    async def leader(self) -> str:
        """The leader's RPC address, or "" during an election."""
        return await self._get("/v1/status/leader", _str)

    async def peers(self) -> tuple[str, ...]:
        return await self._get("/v1/status/peers", _tuple_of(_str))


class ConfigEntriesAPI(_Group):
    """`/v1/config`: config entries as JSON objects (Consul's field names), with CAS."""

    async def list(
        self, kind: str, *, index: int = 0, wait: Wait | None = None
    ) -> Indexed[tuple[Mapping[str, Any], ...]]:
        """Every entry of `kind`, sorted by name; blocks until one changes."""
        params, blocking = _read_params(dc="", index=index, wait=wait, stale=False)
        return await self._indexed(
            f"/v1/config/{_segment(kind)}",
            _tuple_of(lambda v: MappingProxyType(dict(as_object(v, "entry")))),
            params,
            blocking,
            index,
        )

    async def get(
        self, kind: str, name: str, *, index: int = 0, wait: Wait | None = None
    ) -> Indexed[Mapping[str, Any]]:
        """One entry (`/v1/config/:kind/:name`); blocks until it changes. A missing entry
        is `ConsulNotFound`."""
        params, blocking = _read_params(dc="", index=index, wait=wait, stale=False)
        return await self._indexed(
            f"/v1/config/{_segment(kind)}/{_segment(name)}",
            lambda v: MappingProxyType(dict(as_object(v, "entry"))),
            params,
            blocking,
            index,
        )

    async def find(self, kind: str, name: str) -> Mapping[str, Any] | None:
        """One entry, or None when Consul has none of that kind and name (404)."""
        resp = await self._http.request("GET", f"/v1/config/{_segment(kind)}/{_segment(name)}")
        if resp.status == 404:
            return None
        resp.raise_for_status()
        return _decode(resp, lambda v: MappingProxyType(dict(as_object(v, "entry"))))

    async def put(self, entry: Mapping[str, Any], *, cas: int | None = None) -> bool:
        """Write an entry; with `cas` only if its ModifyIndex is still `cas` (0: create only).
        False means the CAS check failed and nothing was written."""
        params = [("cas", str(cas))] if cas is not None else []
        resp = await self._put("/v1/config", dict(entry), params)
        return _decode(resp, _bool)

    async def delete(self, kind: str, name: str, *, cas: int | None = None) -> bool:
        """Delete an entry; with `cas` only if its ModifyIndex is still `cas`. False means the
        CAS check failed and nothing was deleted."""
        params = [("cas", str(cas))] if cas is not None else []
        resp = await self._http.request(
            "DELETE", f"/v1/config/{_segment(kind)}/{_segment(name)}", params=params
        )
        resp.raise_for_status()
        # Without cas Consul answers an empty object; with it, true or false.
        return True if cas is None else _decode(resp, _bool)


class DiscoveryChainAPI(_Group):
    """`/v1/discovery-chain/:service`: the compiled chain as Consul's servers compile it."""

    async def get(
        self,
        service: str,
        *,
        compile_dc: str = "",
        index: int = 0,
        wait: Wait | None = None,
    ) -> Indexed[Mapping[str, Any]]:
        """The `Chain` object of the answer (Consul's `CompiledDiscoveryChain` JSON); blocks
        until the chain's inputs change. meshlet's sidecar compiles locally from the watched
        entries instead (agent/routing.py); this read is for tools and for comparing both."""
        params, blocking = _read_params(dc="", index=index, wait=wait, stale=False)
        if compile_dc:
            params.append(("compile-dc", compile_dc))
        return await self._indexed(
            f"/v1/discovery-chain/{_segment(service)}",
            lambda v: MappingProxyType(
                dict(as_object(as_object(v, "answer").get("Chain"), "Chain"))
            ),
            params,
            blocking,
            index,
        )


class ConsulClient:
    """An async client for one Consul agent, owning one keep-alive HTTP session.

    Use it as an async context manager, or call `close()` when done. Building it reads the
    token file and TLS files named in the config (and raises `ConsulConfigError` for them);
    the session itself is opened on entry or on the first request.
    """

    def __init__(self, config: ConsulConfig | None = None) -> None:
        self._http = ConsulHTTP(config if config is not None else ConsulConfig())
        self.agent = AgentAPI(self._http)
        self.catalog = CatalogAPI(self._http)
        self.health = HealthAPI(self._http)
        self.kv = KVAPI(self._http)
        self.status = StatusAPI(self._http)
        self.connect = ConnectAPI(self._http)
        self.config_entries = ConfigEntriesAPI(self._http)
        self.discovery_chain = DiscoveryChainAPI(self._http)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ConsulClient:
        """A client configured the way the consul CLI would be by `env` (default os.environ)."""
        return cls(config_from_env(os.environ if env is None else env))

    @property
    def config(self) -> ConsulConfig:
        return self._http.config

    async def __aenter__(self) -> Self:
        await self._http.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session and its pooled connections. The client cannot be reused."""
        await self._http.close()
