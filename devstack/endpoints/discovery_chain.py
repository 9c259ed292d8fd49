"""/v1/discovery-chain/:service: the compiled chain (traffic.chain), blocking on config entries.

`POST` takes an upstream's overrides, decoded as consul `agent/discovery_chain_endpoint.go`
decodes them: `OverrideProtocol`, `OverrideConnectTimeout` (Go text or nanoseconds),
`OverrideMeshGateway.Mode`, each also in snake_case; other keys are ignored.
"""

from __future__ import annotations

import json
from typing import Any

from devstack.config_entries import chain_entries
from devstack.httpapi import Call, Reply, Router, RPCError, bad_request
from traffic.chain import MESH_GATEWAY_MODES, CompileRequest, compile_chain
from traffic.durations import parse_duration
from traffic.errors import GraphError


def routes(router: Router) -> None:
    router.add("/v1/discovery-chain/", rpc=True, get=read, post=read)


def _weak_string(value: Any, what: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(int(value)) if float(value).is_integer() else repr(value)
    if isinstance(value, str):
        return value
    raise bad_request(f"Request decoding failed: {what}: invalid type {type(value).__name__}")


def _pick(raw: dict[str, Any], camel: str, snake: str) -> Any:
    # TranslateKeys: the snake_case alias applies only when the field itself is absent.
    for key, value in raw.items():
        if key.lower() == camel.lower():
            return value
    return raw.get(snake)


async def _overrides(call: Call) -> dict[str, Any]:
    text = await call.request.read()
    try:
        raw = json.loads(text, parse_constant=float) if text.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad_request(f"Request decoding failed: {err}") from None
    except RecursionError:  # Go's decoder: past 10,000 levels; Python's: near 1,000
        raise bad_request("Request decoding failed: exceeded max depth") from None
    if raw is None:
        raise bad_request("Request decoding failed: EOF")
    if not isinstance(raw, dict):
        raise bad_request(
            "Request decoding failed: json: cannot unmarshal array into Go value of type "
            "map[string]interface {}"
        )
    out: dict[str, Any] = {}
    protocol = _pick(raw, "OverrideProtocol", "override_protocol")
    if protocol is not None:
        out["override_protocol"] = _weak_string(protocol, "OverrideProtocol")
    timeout = _pick(raw, "OverrideConnectTimeout", "override_connect_timeout")
    if isinstance(timeout, str):
        try:
            out["override_connect_timeout_ns"] = parse_duration(timeout)
        except ValueError as err:
            raise bad_request(f"Request decoding failed: {err}") from None
    elif isinstance(timeout, int | float) and not isinstance(timeout, bool):
        out["override_connect_timeout_ns"] = int(timeout)
    gateway = _pick(raw, "OverrideMeshGateway", "override_mesh_gateway")
    if isinstance(gateway, dict):
        mode = _pick(gateway, "Mode", "mode")
        mode = "" if mode is None else _weak_string(mode, "OverrideMeshGateway.Mode")
        if mode not in MESH_GATEWAY_MODES:
            raise bad_request("Invalid OverrideMeshGateway.Mode parameter")
        out["override_mesh_gateway_mode"] = mode
    return out


async def read(call: Call) -> Reply:
    name = call.tail
    if not name:
        raise bad_request("Missing chain name")
    overrides = await _overrides(call) if call.request.method == "POST" else {}
    call.identity.require("service:read", name)
    server = call.server
    request = CompileRequest(
        service=name,
        trust_domain=server.identity.ca.trust_domain,
        datacenter=call.query.get("compile-dc") or server.config.datacenter,
        **overrides,
    )
    store = call.store

    def compiled() -> tuple[int, dict[str, Any]]:
        index = store.table_index("config")
        try:
            chain = compile_chain(request, chain_entries(store.config))
        except GraphError as err:
            raise RPCError(str(err)) from None
        return max(index, 1), {"Chain": chain.to_json()}

    index, body = await call.blocking(compiled)
    return call.reply(body, index=index)
