"""Consul's HTTP conventions: routing, errors, headers, query parameters, blocking.

Mirrors the `wrap`/`parse` layer of Consul's agent/http.go: every endpoint declares its
methods, errors become Consul's status codes with plain-text bodies, read endpoints backed by
server state carry the index headers and block on `?index=`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from devstack.acl import ACLNotFound, Identity, PermissionDenied
from devstack.bexpr import Filter, FilterError, Schema, compile_filter
from devstack.decode import DecodeError, Spec, decode
from devstack.durations import DurationError, parse_duration

if TYPE_CHECKING:
    from devstack.server import DevServer

T = TypeVar("T")
log = logging.getLogger("devstack.http")

DEFAULT_WAIT = 300.0  # default_query_time
MAX_WAIT = 600.0  # max_query_time
JITTER_FRACTION = 16


class HTTPError(Exception):
    """An error with its own status (Consul's HTTPError / CodeWithPayloadError)."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


class RPCError(Exception):
    """An error from the server's state machine; Consul answers these with 500."""


def bad_request(reason: str) -> HTTPError:
    return HTTPError(400, reason)


def not_found(reason: str) -> HTTPError:
    return HTTPError(404, reason)


class _Empty:
    """No body at all (Go's nil result), as opposed to a JSON `null`."""


EMPTY: Any = _Empty()


@dataclass
class Reply:
    body: Any = EMPTY
    # Raw bodies (KV ?raw) bypass JSON encoding.
    raw: bytes | None = None
    status: int = 200
    index: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


# A handler answers with a Reply, or streams its own response (/v1/agent/monitor).
Handler = Callable[["Call"], Awaitable["Reply | web.StreamResponse"]]


@dataclass(frozen=True)
class Route:
    path: str
    methods: dict[str, Handler]
    # Routes ending in "/" match by prefix (Go ServeMux); the remainder is Call.tail.
    # `rpc` routes are served by the (single) server: they honour ?dc and consistency modes.
    rpc: bool = False

    @property
    def prefix(self) -> bool:
        return self.path.endswith("/")


class Call:
    """One request as an endpoint sees it: parsed parameters, identity, body, blocking."""

    def __init__(
        self, server: DevServer, request: web.Request, route: Route, identity: Identity
    ) -> None:
        self.server = server
        self.store = server.store
        self.request = request
        self.query = request.query
        self.identity = identity
        self.tail = request.path[len(route.path) :] if route.prefix else ""
        self.min_index = 0
        self.wait = DEFAULT_WAIT
        self.results_filtered = False

    def flag(self, name: str) -> bool:
        """Go's `query.Has(name)` for bare flags such as ?recurse or ?passing."""
        return name in self.query

    def bool_param(self, name: str, error: str) -> bool:
        if name not in self.query:
            return False
        value = self.query[name]
        if value == "":
            return True
        if value.lower() in ("1", "t", "true"):
            return True
        if value.lower() in ("0", "f", "false"):
            return False
        raise bad_request(error)

    async def body(self, spec: Spec) -> dict[str, Any]:
        raw = await self.request.read()
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise bad_request(f"Request decode failed: {_go_json_error(err)}") from None
        try:
            result: dict[str, Any] = decode(data, spec)
        except DecodeError as err:
            raise bad_request(f"Request decode failed: {err}") from None
        return result

    def filter(self, schema: Schema) -> Filter | None:
        expression = self.query.get("filter", "")
        if not expression:
            return None
        try:
            return compile_filter(expression, schema)
        except FilterError as err:
            raise RPCError(f"Failed to create boolean expression evaluator: {err}") from None

    def parse_blocking(self) -> None:
        index = self.query.get("index", "")
        if index:
            if not index.isdigit():
                raise bad_request("Invalid index")
            self.min_index = int(index)
        wait = self.query.get("wait", "")
        if wait:
            try:
                ns = parse_duration(wait)
            except DurationError:
                raise bad_request("Invalid wait time") from None
            self.wait = ns / 1e9 if ns > 0 else DEFAULT_WAIT
        self.wait = min(self.wait, MAX_WAIT)
        self.wait += random.uniform(0, self.wait / JITTER_FRACTION)

    async def blocking(self, compute: Callable[[], tuple[int, T]]) -> tuple[int, T]:
        """Run `compute` until its index passes ?index, the wait runs out, or the state
        store is abandoned (index rewound)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        epoch = self.store.epoch
        while True:
            index, result = compute()
            remaining = deadline - loop.time()
            if (
                self.min_index == 0
                or index > self.min_index
                or self.store.epoch != epoch
                or self.store.closed
                or remaining <= 0
            ):
                return index, result
            await self.store.wait_for_change(remaining)

    def reply(self, body: Any, *, index: int | None = None, status: int = 200) -> Reply:
        return Reply(body=body, index=index, status=status)


def _go_json_error(err: Exception) -> str:
    if isinstance(err, RecursionError):
        # Go's decoder stops at 10,000 levels, Python's near 1,000: Go's words either way.
        return "exceeded max depth"
    if isinstance(err, json.JSONDecodeError):
        if err.msg.startswith("Expecting value") and err.pos >= len(err.doc):
            return "unexpected EOF"
        return f"invalid character at offset {err.pos + 1}: {err.msg}"
    return "invalid UTF-8 in request body"


class Router:
    def __init__(self) -> None:
        self._exact: dict[str, Route] = {}
        self._prefix: list[Route] = []

    def add(self, path: str, *, rpc: bool = False, **methods: Handler) -> None:
        route = Route(path, {m.upper(): h for m, h in methods.items()}, rpc)
        if route.prefix:
            self._prefix.append(route)
            self._prefix.sort(key=lambda r: len(r.path), reverse=True)
        else:
            self._exact[path] = route

    def routes(self) -> list[Route]:
        """Every route served, exact ones first (tests check each has its ACL check)."""
        return [*self._exact.values(), *self._prefix]

    def match(self, path: str) -> Route | None:
        route = self._exact.get(path)
        if route is not None:
            return route
        return next((r for r in self._prefix if path.startswith(r.path)), None)


def token_of(request: web.Request) -> str:
    """Consul's order: ?token=, then X-Consul-Token, then Authorization: Bearer."""
    token = request.query.get("token", "")
    if token:
        return token
    token = request.headers.get("X-Consul-Token", "")
    if token:
        return token
    scheme, _, rest = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer":
        return rest.strip().split(" ")[0] if rest.strip() else ""
    return ""


def make_handler(server: DevServer, router: Router) -> Callable[[web.Request], Awaitable[Any]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        headers: dict[str, str] = {"X-Consul-Default-ACL-Policy": server.config.default_policy}
        try:
            reply = await _dispatch(server, router, request, headers)
        except HTTPError as err:
            headers.update(err.headers)
            return _text(err.status, err.reason or "An unexpected error occurred", headers)
        except (PermissionDenied, ACLNotFound) as err:
            return _text(403, str(err), headers)
        except RPCError as err:
            text = str(err)
            status = 403 if "Permission denied" in text or "ACL not found" in text else 500
            return _text(status, text, headers)
        except Exception as err:
            # A bug in devstack must still answer like Consul does (plain 500), and be loud.
            log.exception("unexpected error serving %s %s", request.method, request.path)
            return _text(500, f"devstack internal error: {type(err).__name__}: {err}", headers)
        if isinstance(reply, web.StreamResponse):
            return reply
        return _render(request, reply, headers, pretty=True)

    return handle


async def _dispatch(
    server: DevServer, router: Router, request: web.Request, headers: dict[str, str]
) -> Reply | web.StreamResponse:
    path = request.path
    if not path.startswith("/v1/"):
        raise not_found(
            "Invalid URL path: if attempting to use the HTTP API, "
            "ensure the path starts with '/v1/'"
        )
    route = router.match(path)
    if route is None:
        raise not_found("Invalid URL path: not a recognized HTTP API endpoint")
    allow = ",".join(["OPTIONS", *route.methods])
    if request.method == "OPTIONS":
        return Reply(headers={"Allow": allow})
    handler = route.methods.get(request.method)
    if handler is None:
        raise HTTPError(405, f"method {request.method} not allowed", {"Allow": allow})
    identity = server.acl.resolve(token_of(request))
    call = Call(server, request, route, identity)
    if route.rpc:
        _parse_rpc_params(call, server)
    reply = await handler(call)
    if isinstance(reply, web.StreamResponse):
        return reply
    if route.rpc and reply.index is not None:
        headers.update(
            {
                "X-Consul-Index": str(max(reply.index, 1)),
                "X-Consul-KnownLeader": "true",
                "X-Consul-LastContact": "0",
                "X-Consul-Effective-Consistency": _consistency(call),
                "X-Consul-Query-Backend": "blocking-query",
            }
        )
    if call.results_filtered and identity.token_given:
        headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
    return reply


def _consistency(call: Call) -> str:
    if call.flag("stale"):
        return "stale"
    return "consistent" if call.flag("consistent") else "leader"


def _parse_rpc_params(call: Call, server: DevServer) -> None:
    q = call.query
    if "stale" in q and "consistent" in q:
        raise bad_request("Cannot specify ?stale with ?consistent, conflicting semantics.")
    if "cached" in q and "consistent" in q:
        raise bad_request("Cannot specify ?cached with ?consistent, conflicting semantics.")
    if "max_stale" in q:
        try:
            parse_duration(q["max_stale"])
        except DurationError:
            raise bad_request(f'Invalid max_stale value "{q["max_stale"]}"') from None
    call.parse_blocking()
    dc = q.get("dc", "")
    if dc and dc != server.config.datacenter:
        raise RPCError("No path to datacenter")


def _text(status: int, text: str, headers: dict[str, str]) -> web.Response:
    return web.Response(
        status=status, text=text, content_type="text/plain", charset="utf-8", headers=headers
    )


def _render(
    request: web.Request, reply: Reply, headers: dict[str, str], *, pretty: bool
) -> web.Response:
    headers.update(reply.headers)
    if reply.raw is not None:
        return web.Response(
            status=reply.status, body=reply.raw, headers=headers, content_type=reply.content_type
        )
    if reply.body is EMPTY:
        return web.Response(status=reply.status, headers=headers)
    # A -dev agent always pretty-prints (Consul's marshalJSON checks DevMode).
    text = json.dumps(reply.body, indent=4 if pretty else None)
    response = web.Response(
        status=reply.status, text=text, content_type=reply.content_type, headers=headers
    )
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        response.enable_compression()
    return response
