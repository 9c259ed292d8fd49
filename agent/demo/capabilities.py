"""Does the running sidecar have the feature a step shows? Asked of the sidecar itself.

A step whose feature this build lacks is announced and skipped, never imitated; a step whose
feature is there must then behave, or the demo fails. So the checks read what a sidecar says
about itself, not how traffic behaves (that is what the steps judge):

* routing (the canary split, retries): the upstream's entry in the sidecar's /v1/status
  (`proxy.upstreams.<name>`) has a `routing` field, which a proxy that applies Consul's
  discovery chain (service-router, -splitter, -resolver) to that upstream reports.
* metrics: the sidecar's admin listener answers GET /metrics with 200.

Each returns None when the feature is there, else the reason it is not, in plain words.
"""

from __future__ import annotations

import aiohttp

from agent.demo.mesh import Sidecar, proxy_upstreams, status


async def routing(http: aiohttp.ClientSession, side: Sidecar, upstream: str) -> str | None:
    held = proxy_upstreams(await status(http, side)).get(upstream)
    if held is None:
        return f"{side.label}'s sidecar does not list its upstream {upstream} in /v1/status"
    if held.get("routing") is None:
        return (
            f"{side.label}'s sidecar does not apply Consul's routing entries to {upstream} "
            "(its /v1/status shows no `routing` for that upstream)"
        )
    return None


async def metrics(http: aiohttp.ClientSession, side: Sidecar) -> str | None:
    try:
        async with http.get(f"http://{side.admin}/metrics") as resp:
            if resp.status == 200:
                return None
            return f"{side.label}'s sidecar answers GET /metrics with {resp.status}"
    except aiohttp.ClientError as err:
        return f"{side.label}'s sidecar's admin listener did not answer GET /metrics: {err}"
