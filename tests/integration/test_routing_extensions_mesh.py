"""Istio's fault injection and mirroring, end to end: a VirtualService translated and written
by `meshlet routes apply` (carried in the router's meshlet.io Meta keys), then real requests
from web's app through web's `meshlet sidecar` to api v1 and v2, each behind its own
`meshlet sidecar` with its own app server. The mirror's app (v2) receives the copies; an
aborted request never reaches an app."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

import pytest

from tests.integration.mesh import put_intentions, routes_apply, wait_status
from tests.integration.test_routing_mesh import EXAMPLES, CanaryMesh, canary_mesh

__all__ = ["canary_mesh"]  # the fixture, used by name

VIRTUAL_SERVICE = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  hosts: [api]
  http:
  - match: [{headers: {x-fault: {exact: abort}}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: api, subset: v1}}]
  - route: [{destination: {host: api, subset: v1}}]
    mirror: {host: api, subset: v2}
    mirrorPercentage: {value: 100}
"""

V1 = "v1.api.default.default.dc1"
V2 = "v2.api.default.default.dc1"


def _get(port: int, headers: dict[str, str], path: str = "/orders") -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, json.loads(body) if resp.status == 200 else body
    finally:
        conn.close()


@pytest.mark.timeout(240)
def test_fault_abort_and_mirror_through_real_sidecars(
    canary_mesh: CanaryMesh, tmp_path: Path
) -> None:
    mesh = canary_mesh
    put_intentions(mesh.consul, "api", "allow")
    vs = tmp_path / "vs.yaml"
    vs.write_text(VIRTUAL_SERVICE)
    warned = routes_apply(mesh.consul, vs, EXAMPLES / "api-destinationrule.yaml")
    assert "ignore" in warned  # other Consul proxies ignore the meshlet.io keys

    def routed(st: Any) -> bool:
        api = st["proxy"].get("routing", {}).get("upstreams", {}).get("api", {})
        return {V1, V2} <= set(api.get("targets", ()))  # v2: the mirror's target

    wait_status(mesh.web_admin, routed, "web's api routed with its mirror")
    v2_paths: list[str] = mesh.v2_app.paths  # type: ignore[attr-defined]

    def v1_answers_and_v2_gets_copies(_: Any) -> bool:
        # A copy is fire and forget: until v2's target has its endpoints, copies are skipped.
        status, body = _get(mesh.web_upstream, {})
        return status == 200 and body["app"] == "api" and "/orders" in v2_paths

    wait_status(mesh.web_admin, v1_answers_and_v2_gets_copies, "v1 reachable, copies at v2")
    before = v2_paths.count("/orders")
    for _ in range(5):
        status, body = _get(mesh.web_upstream, {"x-trace": "t"})
        assert status == 200 and body["app"] == "api"  # the answer is v1's, never the copy's
    # Every copy reached v2's app (fire and forget: they may still be on their way).
    wait_status(
        mesh.web_admin, lambda _: v2_paths.count("/orders") >= before + 5, "the copies at v2"
    )
    status, body = _get(mesh.web_upstream, {"x-fault": "abort"}, "/aborted")
    assert (status, body) == (418, b"fault filter abort")
    status, _ = _get(mesh.web_upstream, {}, "/after")  # on its way after the aborted one
    assert status == 200
    wait_status(mesh.web_admin, lambda _: "/after" in v2_paths, "the last copy at v2")
    # The aborted request reached neither app, nor was it mirrored.
    assert "/aborted" not in mesh.api_app.paths + v2_paths  # type: ignore[attr-defined]
