"""A read-only status page at /ui/ (where Consul's dev agent serves its web UI).

`GET /` redirects here as it does on Consul, which also makes `http://<agent>:8500` a valid
HTTP health-check target, as clients' test suites assume.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from devstack.server import DevServer

_STATUS_ORDER = {"critical": 0, "warning": 1, "passing": 2}


def add_routes(app: web.Application, server: DevServer) -> None:
    async def root(request: web.Request) -> web.StreamResponse:
        raise web.HTTPMovedPermanently("/ui/")

    async def page(request: web.Request) -> web.StreamResponse:
        return web.Response(text=render_page(server), content_type="text/html")

    app.router.add_get("/", root)
    app.router.add_get("/ui/", page)


def render_page(server: DevServer) -> str:
    store = server.store
    rows = []
    for svc in sorted(store.services.values(), key=lambda s: (s.name, s.node, s.id)):
        checks = store.instance_checks(svc.node, svc.id)
        worst = min((c.status for c in checks), key=_STATUS_ORDER.__getitem__, default="passing")
        address = svc.data.get("Address") or store.nodes[svc.node].address
        rows.append(
            "<tr>"
            f"<td>{html.escape(svc.name)}</td><td>{html.escape(svc.id)}</td>"
            f"<td>{html.escape(svc.node)}</td>"
            f"<td>{html.escape(address)}:{svc.data.get('Port', 0)}</td>"
            f"<td>{html.escape(svc.data.get('Kind', '') or 'service')}</td>"
            f'<td class="{worst}">{worst}</td>'
            "</tr>"
        )
    cfg = server.config
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>meshlet devstack</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.2em 1em;text-align:left}}
.passing{{color:#080}}.warning{{color:#a60}}.critical{{color:#c00}}</style></head>
<body><h1>meshlet devstack</h1>
<p>datacenter <b>{html.escape(cfg.datacenter)}</b>, node <b>{html.escape(cfg.node_name)}</b>,
index {store.index}. The API is under <a href="/v1/catalog/services">/v1/</a>.</p>
<table><tr><th>service</th><th>ID</th><th>node</th><th>address</th><th>kind</th>
<th>health</th></tr>
{"".join(rows)}
</table></body></html>
"""
