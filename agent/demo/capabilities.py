"""Does the running sidecar have the feature a step shows? Asked of the sidecar itself.

A step whose feature this build lacks is announced and skipped, never imitated; a step whose
feature is there must then behave, or the demo fails. So the checks read what a sidecar says
about itself, not how traffic behaves (that is what the steps judge):

* routing (the canary split, retries): the sidecar's /v1/status has a `proxy.routing`
  section, which a proxy that watches and applies Consul's discovery chain (service-router,
  -splitter, -resolver) reports, with `upstreams.<name>.routed` once it routes that upstream
  by a compiled chain.
* metrics: the sidecar's admin listener answers GET /metrics with 200.

Each returns None when the feature is there, else the reason it is not, in plain words.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp

from agent.demo.mesh import Sidecar, status


def routing_of(state: Mapping[str, Any]) -> Mapping[str, Any] | None:
    routing: Mapping[str, Any] | None = (state.get("proxy") or {}).get("routing")
    return routing


async def routing(http: aiohttp.ClientSession, side: Sidecar) -> str | None:
    if routing_of(await status(http, side)) is None:
        return (
            f"{side.label}'s sidecar does not apply Consul's routing entries "
            "(its /v1/status has no proxy.routing)"
        )
    return None


async def routed(http: aiohttp.ClientSession, side: Sidecar, upstream: str) -> bool:
    """Whether the sidecar now routes `upstream` by its compiled discovery chain."""
    routing = routing_of(await status(http, side)) or {}
    return bool(((routing.get("upstreams") or {}).get(upstream) or {}).get("routed"))


async def metrics(http: aiohttp.ClientSession, side: Sidecar) -> str | None:
    try:
        async with http.get(f"http://{side.admin}/metrics") as resp:
            if resp.status == 200:
                return None
            return f"{side.label}'s sidecar answers GET /metrics with {resp.status}"
    except aiohttp.ClientError as err:
        return f"{side.label}'s sidecar's admin listener did not answer GET /metrics: {err}"
