"""The agent's admin HTTP listener, on loopback only.

    GET /live        200 while the event loop answers (systemd and kubelet liveness)
    GET /ready       200 once registered with every upstream's first snapshot; 503 with the
                     reasons otherwise (also while draining)
    GET /v1/status   registration, sidecar readiness and leaf expiry, Consul connectivity,
                     every upstream with its endpoints and last update; `?upstream=NAME`
                     narrows the upstream list (a 10,000-endpoint upstream is a big answer)

The metrics endpoint of the observability work mounts here through `extra_routes`. The
transport (and what it refuses) is agent/admin_http.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from agent.admin_http import JSON, HTTPServer, Limits, Query, Reply, Route


class StatusSource(Protocol):
    def readiness(self) -> tuple[bool, tuple[str, ...]]: ...

    def status(self, upstream: str | None) -> Mapping[str, Any]: ...


def _json(body: object, status: int = 200) -> Reply:
    text = json.dumps(body, indent=2, sort_keys=True) + "\n"
    return Reply(status, text.encode(), JSON)


class AdminServer:
    def __init__(
        self,
        source: StatusSource,
        host: str,
        port: int,
        *,
        extra_routes: Sequence[Route] = (),
        limits: Limits | None = None,
    ) -> None:
        self._source = source
        routes = [
            Route("/live", self._live),
            Route("/ready", self._ready),
            Route("/v1/status", self._status),
            *extra_routes,
        ]
        self._http = HTTPServer(routes, host, port, limits=limits)

    @property
    def address(self) -> str:
        """host:port actually bound (the port is chosen by the OS when configured as 0)."""
        return self._http.address

    async def start(self) -> None:
        await self._http.start()

    async def close(self) -> None:
        await self._http.close()

    def _live(self, query: Query) -> Reply:
        return Reply(200, b"ok\n")

    def _ready(self, query: Query) -> Reply:
        ready, reasons = self._source.readiness()
        return _json({"ready": ready, "reasons": list(reasons)}, 200 if ready else 503)

    def _status(self, query: Query) -> Reply:
        return _json(dict(self._source.status(query.get("upstream"))))
