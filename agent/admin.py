"""The agent's admin HTTP listener, on loopback only.

    GET /live        200 while the event loop answers (systemd and kubelet liveness)
    GET /ready       200 once registered with every upstream's first snapshot; 503 with the
                     reasons otherwise (also while draining)
    GET /v1/status   registration, sidecar readiness and leaf expiry, Consul connectivity,
                     every upstream with its endpoints and last update; `?upstream=NAME`
                     narrows the upstream list (a 10,000-endpoint upstream is a big answer)

The metrics endpoint of the observability work mounts here through `extra_routes`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from aiohttp import web


class StatusSource(Protocol):
    def readiness(self) -> tuple[bool, tuple[str, ...]]: ...

    def status(self, upstream: str | None) -> Mapping[str, Any]: ...


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(body, indent=2, sort_keys=True) + "\n",
        content_type="application/json",
    )


class AdminServer:
    def __init__(
        self,
        source: StatusSource,
        host: str,
        port: int,
        *,
        extra_routes: Sequence[web.RouteDef] = (),
    ) -> None:
        self._source = source
        self._host = host
        self._port = port
        self._extra = extra_routes
        self._runner: web.AppRunner | None = None
        self.address = ""
        """host:port actually bound (the port is chosen by the OS when configured as 0)."""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/live", self._live)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/v1/status", self._status)
        app.router.add_routes(list(self._extra))
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port, reuse_address=True)
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = runner.addresses[0]
        host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.address = f"{host}:{bound[1]}"

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _live(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _ready(self, request: web.Request) -> web.Response:
        ready, reasons = self._source.readiness()
        return _json({"ready": ready, "reasons": list(reasons)}, 200 if ready else 503)

    async def _status(self, request: web.Request) -> web.Response:
        upstream = request.query.get("upstream")
        return _json(dict(self._source.status(upstream)))
