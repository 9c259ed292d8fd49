"""Issue 10, item 8, as reported: the CA's roots replaced under two running `meshlet sidecar`s.

`meshlet dev` replaces its CA through `PUT /v1/connect/ca/configuration` with a new ClusterID
(a new trust domain, the old root dropped, nothing cross-signed) and a shorter LeafCertTTL, and,
as Consul's agent does after a root change, keeps serving the old leaves for a while before
re-signing (`--ca-change-delay`, Consul's random 0-30 s made fixed).

Before the fix the sidecars logged a new generation, kept their old leaves for good (the
re-signed ones expire earlier and were ignored), refused each other, and still said ready with
nothing counted. Now: for a grace (connect.ca_switch, 30 s) the old roots stay trusted with the
new ones and traffic flows on the old leaves; the agent here re-signs only after the grace
(Consul's own delay is up to 30 s, so it can), and while a sidecar then holds no leaf that
chains to the current roots it is not ready (its /ready, /v1/status and Consul check say why),
the dials its peer refuses are counted per upstream and kind, and once the agent re-signs, the
new leaves are taken and traffic flows.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.status_cli import render
from connect.dial_failures import KINDS
from tests.integration.mesh import (
    DEADLINE,
    Mesh,
    put_intentions,
    running,
    status,
    tcp_exchange,
    wait_status,
)
from tests.integration.test_agent_process import wait_catalog

CHANGE_DELAY = "40"
"""Past the grace (30 s) during which the replaced roots are still trusted."""
NEW_CLUSTER = "5f1d2c3b-0000-4000-8000-00000000cafe"
NEW_TD = f"{NEW_CLUSTER}.consul"


@pytest.fixture
def slow_resign_mesh(tmp_path: Path) -> Iterator[Mesh]:
    with running(Mesh(tmp_path, "tcp", dev_args=("--ca-change-delay", CHANGE_DELAY))) as mesh:
        yield mesh


def _ready(admin: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://{admin}/ready", timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _refusals(st: Any, upstream: str) -> dict[str, int]:
    refusals: dict[str, int] = (st["proxy"]["stats"].get("upstream_refusals") or {}).get(
        upstream, {}
    )
    return refusals


def _chains_to_new_roots(st: Any) -> bool:
    leaf = st["proxy"]["leaf"]
    return (
        leaf["uri"].startswith(f"spiffe://{NEW_TD}/")
        and not leaf.get("problem")
        and bool(st["ready"])
    )


def test_replaced_roots_make_the_sidecar_unready_until_a_chaining_leaf_arrives(
    slow_resign_mesh: Mesh,
) -> None:
    mesh = slow_resign_mesh
    mesh.wait_intentions(put_intentions(mesh.consul, "api", "allow"))
    assert b'"app": "api"' in tcp_exchange(mesh.web_upstream)
    old_uri = status(mesh.web_admin)["proxy"]["leaf"]["uri"]
    assert not old_uri.startswith(f"spiffe://{NEW_TD}/")

    replace = {
        "Provider": "consul",
        "ClusterID": NEW_CLUSTER,
        "ForceWithoutCrossSigning": True,
        "Config": {"LeafCertTTL": "1h"},
    }
    req = urllib.request.Request(
        f"http://{mesh.consul}/v1/connect/ca/configuration",
        data=json.dumps(replace).encode(),
        method="PUT",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200

    # The grace: both CAs' roots trusted, the old leaves still presented, nothing refused.
    st = wait_status(
        mesh.web_admin, lambda s: s["proxy"]["leaf"]["old_roots_trusted_until"] > 0, "grace"
    )
    assert st["proxy"]["leaf"]["ca_switches"] == 1 and st["ready"]
    assert b'"app": "api"' in tcp_exchange(mesh.web_upstream)
    assert not _refusals(status(mesh.web_admin), "api")

    # The grace over and the agent not re-signed yet, both sidecars hold old leaves that the
    # new roots do not vouch for: every dial from web to api fails its handshake, and web
    # counts it under api.
    deadline = time.monotonic() + DEADLINE
    while not _refusals(st := status(mesh.web_admin), "api"):
        assert st["proxy"]["upstreams"]["api"]["endpoints"] == 1, "api left before a dial"
        assert time.monotonic() < deadline, f"no refused dial counted: {json.dumps(st)[:2000]}"
        tcp_exchange(mesh.web_upstream)
    assert set(_refusals(st, "api")) <= set(KINDS)

    # Not ready, saying why, on every channel: /v1/status, /ready, and web's Consul check.
    st = wait_status(mesh.web_admin, lambda s: bool(s["proxy"]["leaf"].get("problem")), "problem")
    problem = st["proxy"]["leaf"]["problem"]
    assert old_uri in problem and NEW_TD in problem, problem
    assert not st["ready"]
    assert f"proxy: {problem}" in st["reasons"], st["reasons"]
    code, body = _ready(mesh.web_admin)
    assert code == 503 and f"proxy: {problem}" in body["reasons"], body
    wait_catalog(
        mesh.consul,
        "/v1/health/checks/web-sidecar-proxy",
        lambda checks: any(
            c["Status"] == "critical" and problem[:80] in c["Output"] for c in checks
        ),
    )
    text = render(status(mesh.web_admin), time.time())
    assert "leaf problem" in text and "DIALS FAILED" in text
    assert any(line.startswith("api ") for line in text.splitlines()[-5:]), text

    # The agent re-signs: both sidecars take leaves of the new trust domain, become ready,
    # and traffic flows again.
    for admin in (mesh.web_admin, mesh.api_admin):
        st = wait_status(admin, _chains_to_new_roots, "a leaf that chains to the new roots")
        assert st["proxy"]["leaf"]["trust_domain"] == NEW_TD
        assert st["proxy"]["leaf"]["chain_breaks"] == 1
    wait_status(
        mesh.web_admin,
        lambda s: s["proxy"]["upstreams"]["api"]["endpoints"] == 1,
        "api passing again",
    )
    reply = tcp_exchange(mesh.web_upstream)
    assert b'"app": "api"' in reply, reply
    web_log = "".join(mesh.sidecars["web"].lines)
    assert web_log.index("after the roots changed") < web_log.index("no longer chained")
