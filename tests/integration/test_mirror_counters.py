"""Mirrored requests are counted where an operator looks: /v1/status
(`proxy.stats.mirrors.<upstream>`, summed over the data planes) and /metrics
(`meshlet_mirror_requests_total{upstream, outcome}`, `meshlet_mirror_requests_in_flight`),
through real `meshlet sidecar` processes on `meshlet dev`: web calls api v1, whose route
mirrors every request to api v2 (Istio's mirror, applied by `meshlet routes apply`).

v2's app holds the requests under /hold until released, so their copies stay in flight: once
64 are (the per-listener bound), further copies are dropped and counted, while the requests
themselves are answered by v1. Waits poll the sidecar's status; none measures time."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.mesh import (
    DEADLINE,
    _App,
    metrics,
    put_intentions,
    routes_apply,
    running,
    serve,
    wait_status,
)
from tests.integration.test_routing_extensions_mesh import V1, V2, VIRTUAL_SERVICE
from tests.integration.test_routing_mesh import EXAMPLES, CanaryMesh

CAP = 64
"""Copies in flight per listener (connect.http1.mirror.Mirrors.cap)."""


class _HoldingApp(_App):
    """api v2: a request under /hold is answered once the server's `release` is set."""

    name = "api-v2"

    def do_GET(self) -> None:
        if self.path.startswith("/hold"):
            self.server.held.append(self.path)  # type: ignore[attr-defined]
            self.server.release.wait(DEADLINE)  # type: ignore[attr-defined]
        super().do_GET()


class HeldMirrorMesh(CanaryMesh):
    """The canary mesh with v2's app holding /hold requests."""

    def start(
        self, web_args: tuple[str, ...] = (), web_sidecar: str = "", api_sidecar: str = ""
    ) -> None:
        self.v2_app = serve(_HoldingApp)
        self.v2_app.paths = []  # type: ignore[attr-defined]
        self.v2_app.held = []  # type: ignore[attr-defined]
        self.v2_app.release = threading.Event()  # type: ignore[attr-defined]
        # start_instances, with api's local app request timeout (Envoy's 15 s by default)
        # above anything the held copies could wait on a loaded machine.
        self.write_entry(
            {
                "Kind": "service-defaults",
                "Name": "api",
                "Protocol": "http",
                "LocalRequestTimeoutMs": 120_000,
            }
        )
        self.apps += [app for app in (self.api_app, self.v2_app) if app not in self.apps]
        self.start_api_instance("api-v1", self.api_app, "http", {"version": "v1"})
        v2_admin = self.start_api_instance("api-v2", self.v2_app, "http", {"version": "v2"})
        self.start_web('""')
        wait_status(
            v2_admin,
            lambda s: s["proxy"]["local_app"]["request_timeout"] == 120.0,
            "v2's local app request timeout",
        )

    def stop(self) -> None:
        self.v2_app.release.set()  # type: ignore[attr-defined]
        super().stop()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[HeldMirrorMesh]:
    with running(HeldMirrorMesh(tmp_path, "http")) as m:
        yield m


def _get(port: int, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _mirrors(st: Any) -> dict[str, int]:
    counts: dict[str, int] = st["proxy"]["stats"].get("mirrors", {}).get("api", {})
    return {k: counts.get(k, 0) for k in ("sent", "failed", "dropped_over_limit", "skipped")} | {
        "inflight": counts.get("inflight", 0)
    }


def _scraped(admin: str) -> dict[str, float]:
    """The api upstream's mirror series of one scrape, by outcome (and `inflight`)."""
    out: dict[str, float] = {}
    for line in metrics(admin).splitlines():
        if line.startswith("meshlet_mirror_requests_total{") and 'upstream="api"' in line:
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("meshlet_mirror_requests_in_flight{") and 'upstream="api"' in line:
            out["inflight"] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.timeout(300)
def test_mirror_counters_in_status_and_metrics_including_drops_over_the_bound(
    mesh: HeldMirrorMesh,
) -> None:
    put_intentions(mesh.consul, "api", "allow")
    vs = mesh.tmp / "vs.yaml"
    vs.write_text(VIRTUAL_SERVICE)
    routes_apply(mesh.consul, vs, EXAMPLES / "api-destinationrule.yaml")

    def routed(st: Any) -> bool:
        api = st["proxy"].get("routing", {}).get("upstreams", {}).get("api", {})
        return {V1, V2} <= set(api.get("targets", ()))

    wait_status(mesh.web_admin, routed, "web's api routed with its mirror")
    v2_paths: list[str] = mesh.v2_app.paths  # type: ignore[attr-defined]

    warm: list[int] = []

    def copies_arrive(_: Any) -> bool:
        # Until v2's target has its endpoints, copies fail: how many is not known.
        warm.append(_get(mesh.web_upstream, "/warm")[0])
        return "/warm" in v2_paths

    wait_status(mesh.web_admin, copies_arrive, "copies reaching v2")
    assert set(warm) == {200}

    def ended(s: Any) -> int:
        m = _mirrors(s)
        return m["sent"] + m["failed"] + m["dropped_over_limit"] + m["skipped"]

    # Every request was mirrored (100 %): each copy ends counted once, reported by the data
    # plane a moment later.
    base = wait_status(
        mesh.web_admin,
        lambda s: ended(s) == len(warm) and _mirrors(s)["inflight"] == 0,
        "the warm-up copies counted",
    )
    before = _mirrors(base)

    for i in range(5):
        assert _get(mesh.web_upstream, f"/sent/{i}")[0] == 200
    sent = wait_status(
        mesh.web_admin,
        lambda s: _mirrors(s)["sent"] == before["sent"] + 5,
        "five copies sent",
    )
    after_sent = {**before, "sent": before["sent"] + 5}
    assert _mirrors(sent) == after_sent
    assert _scraped(mesh.web_admin) == {k: float(v) for k, v in after_sent.items()}

    # CAP copies held at v2's app, then three more requests: answered, their copies dropped.
    for i in range(CAP):
        assert _get(mesh.web_upstream, f"/hold/{i}")[0] == 200
    wait_status(
        mesh.web_admin,
        lambda s: _mirrors(s)["inflight"] == CAP and len(mesh.v2_app.held) == CAP,  # type: ignore[attr-defined]
        f"{CAP} copies held at v2",
    )
    for i in range(3):
        status_code, body = _get(mesh.web_upstream, f"/hold/over/{i}")
        assert status_code == 200 and b'"app": "api"' in body  # v1's answer, not delayed
    held = {**after_sent, "dropped_over_limit": before["dropped_over_limit"] + 3, "inflight": CAP}
    # The data plane reports its counters to the agent now and then: wait for the report.
    dropped = wait_status(
        mesh.web_admin,
        lambda s: _mirrors(s)["dropped_over_limit"] == held["dropped_over_limit"],
        "three copies dropped",
    )
    assert _mirrors(dropped) == held
    assert _scraped(mesh.web_admin) == {k: float(v) for k, v in held.items()}
    assert not any(p.startswith("/hold/over") for p in v2_paths)

    mesh.v2_app.release.set()  # type: ignore[attr-defined]
    done = wait_status(
        mesh.web_admin, lambda s: _mirrors(s)["inflight"] == 0, "the held copies answered"
    )
    final = {**held, "sent": after_sent["sent"] + CAP, "inflight": 0}
    assert _mirrors(done) == final
    assert _scraped(mesh.web_admin) == {k: float(v) for k, v in final.items()}
