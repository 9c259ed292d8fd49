"""Issue 11 "Done when", end to end: the Istio canary example applied with `meshlet routes
apply` to `meshlet dev`, then real requests from web's app through web's `meshlet sidecar` to
two api instances (v1, v2), each behind its own sidecar with its own app server.

`x-canary: true` always reaches v2; everything else splits 90/10 within ±2 % over 10,000
requests (keep-alive connections, several at once). Waits are on the sidecars' /v1/status.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.mesh import (
    Mesh,
    put_intentions,
    routes_apply,
    running,
    start_app,
    tcp_exchange,
    wait_status,
)

EXAMPLES = Path(__file__).parent.parent / "traffic" / "istio-examples"


class CanaryMesh(Mesh):
    """api v1 and api v2 (service ids api-v1, api-v2, Meta version), web calling api."""

    def start(
        self, web_args: tuple[str, ...] = (), web_sidecar: str = "", api_sidecar: str = ""
    ) -> None:
        self.v2_app = start_app("api-v2")
        self.start_instances(
            {"v1": self.api_app, "v2": self.v2_app},
            # No protocol: the upstream takes its chain's (api's service-defaults say http).
            upstream_protocol='""',
            meta={"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        )


@pytest.fixture
def canary_mesh(tmp_path: Path) -> Iterator[CanaryMesh]:
    with running(CanaryMesh(tmp_path, "http")) as mesh:
        yield mesh


def _routes_apply(consul: str, *files: str) -> None:
    routes_apply(consul, *(EXAMPLES / f for f in files))


def _apps(port: int, n: int, headers: dict[str, str]) -> Counter[str]:
    """`n` GETs over one keep-alive connection; which app answered each."""
    got: Counter[str] = Counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for _ in range(n):
            conn.request("GET", "/", headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            got[json.loads(body)["app"] if resp.status == 200 else f"status {resp.status}"] += 1
    finally:
        conn.close()
    return got


def _many(port: int, total: int, workers: int, headers: dict[str, str]) -> Counter[str]:
    counts: list[Counter[str]] = []
    threads = [
        threading.Thread(target=lambda: counts.append(_apps(port, total // workers, headers)))
        for _ in range(workers)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    out: Counter[str] = Counter()
    for c in counts:
        out += c
    return out


def _routed(st: Any) -> bool:
    api = st["proxy"].get("routing", {}).get("upstreams", {}).get("api", {})
    # The catch-all goes to the splitter: the chain's targets are the two subsets.
    return api.get("targets") == ["v1.api.default.default.dc1", "v2.api.default.default.dc1"]


@pytest.mark.timeout(240)
def test_canary_header_and_90_10_split_through_real_sidecars(canary_mesh: CanaryMesh) -> None:
    mesh = canary_mesh
    put_intentions(mesh.consul, "api", "allow")
    _routes_apply(mesh.consul, "canary-virtualservice.yaml", "api-destinationrule.yaml")
    st = wait_status(mesh.web_admin, _routed, "web's api routed by the canary chain")
    assert st["proxy"]["upstreams"]["api"]["protocol"] == "http"
    # Both subsets have their instance (the target watches' first answers came in).
    seen: list[Counter[str]] = []

    def v1_answers(_: Any) -> bool:
        seen.append(_many(mesh.web_upstream, 40, 1, {}))
        return seen[-1]["api"] > 0

    try:
        wait_status(mesh.web_admin, v1_answers, "v1 reachable")
    except AssertionError:
        raise AssertionError(f"answers: {seen[-3:]}") from None

    canary = _many(mesh.web_upstream, 200, 4, {"x-canary": "true"})
    assert canary == Counter({"api-v2": 200})

    total = 10_000
    split = _many(mesh.web_upstream, total, 8, {})
    assert sum(split.values()) == total, split
    assert set(split) == {"api", "api-v2"}, split  # v1's app is the mesh's "api" app
    share_v1 = split["api"] / total
    assert abs(share_v1 - 0.90) <= 0.02, split


@pytest.fixture
def tcp_mesh(tmp_path: Path) -> Iterator[Mesh]:
    with running(Mesh(tmp_path, "tcp")) as mesh:
        yield mesh


def _resolver(filter_: str) -> dict[str, Any]:
    return {
        "Kind": "service-resolver",
        "Name": "api",
        "DefaultSubset": "picked",
        "Subsets": {"picked": {"Filter": filter_}},
        "Failover": {"*": {"Targets": [{"Service": "api-spare"}]}},
    }


def test_a_tcp_upstream_follows_its_chains_target_and_failover(tcp_mesh: Mesh) -> None:
    mesh = tcp_mesh
    put_intentions(mesh.consul, "api", "allow")
    mesh.write_entry(_resolver('Service.Service == "api-sidecar-proxy"'))
    st = wait_status(
        mesh.web_admin,
        lambda s: (
            s["proxy"]["routing"]["upstreams"]["api"]["targets"]
            == ["api-spare.default.default.dc1", "picked.api.default.default.dc1"]
        ),
        "web's tcp upstream routed by the resolver",
    )
    assert st["proxy"]["upstreams"]["api"]["protocol"] == "tcp"
    reply = tcp_exchange(mesh.web_upstream)
    assert b'"app": "api"' in reply
    # A subset that selects no instance, and a failover service without any: nothing to
    # relay to, so the connection is closed (the chain decides, not the upstream's own watch).
    mesh.write_entry(_resolver('Service.Service == "nope"'))

    def closed(_: Any) -> bool:
        return tcp_exchange(mesh.web_upstream) == b""

    wait_status(mesh.web_admin, closed, "the empty subset applied")
