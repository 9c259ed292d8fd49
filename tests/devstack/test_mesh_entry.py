"""The `mesh` config entry and what it gates: MutualTLSMode permissive in service-defaults and
proxy-defaults, over devstack's real HTTP API, with Consul's texts and status codes.

Consul's rule (agent/consul/state/config_entry.go, checkMutualTLSMode): *changing* an entry's
MutualTLSMode to permissive needs the mesh entry's AllowEnablingPermissiveMutualTLS; an entry
already permissive stays writable as permissive after the flag is turned off (and the flag,
or the whole mesh entry, can be turned off or deleted at any time: the mesh kind takes no part
in the service-graph checks).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Http

NOT_ALLOWED = (
    "cannot set MutualTLSMode=permissive because AllowEnablingPermissiveMutualTLS=false "
    "in the mesh config entry"
)


def mesh(allow: bool, **more: Any) -> dict[str, Any]:
    return {"Kind": "mesh", "AllowEnablingPermissiveMutualTLS": allow, **more}


def service_defaults(name: str, mode: str, **more: Any) -> dict[str, Any]:
    return {"Kind": "service-defaults", "Name": name, "MutualTLSMode": mode, **more}


async def mode_of(http: Http, kind: str, name: str) -> str | None:
    status, entry, _ = await http.get(f"/v1/config/{kind}/{name}")
    return str(entry.get("MutualTLSMode", "")) if status == 200 else None


@pytest.mark.parametrize("mesh_entry", [None, mesh(False)])
async def test_permissive_is_refused_unless_the_mesh_entry_allows_it(
    http: Http, mesh_entry: dict[str, Any] | None
) -> None:
    if mesh_entry is not None:
        assert (await http.put("/v1/config", json=mesh_entry))[:2] == (200, True)
    _, _, before = await http.get("/v1/config/service-defaults")
    for body in (
        service_defaults("api", "permissive"),
        {"Kind": "proxy-defaults", "Name": "global", "MutualTLSMode": "permissive"},
    ):
        status, message, _ = await http.put("/v1/config", json=body)
        assert (status, message) == (500, NOT_ALLOWED)
    assert await mode_of(http, "service-defaults", "api") is None
    assert await mode_of(http, "proxy-defaults", "global") is None
    _, _, after = await http.get("/v1/config/service-defaults")
    assert after["X-Consul-Index"] == before["X-Consul-Index"]
    # strict and "" never need the mesh entry.
    for mode in ("strict", ""):
        assert (await http.put("/v1/config", json=service_defaults("api", mode)))[:2] == (
            200,
            True,
        )


async def test_the_mesh_entry_round_trips_as_consul_marshals_it(http: Http) -> None:
    body = {
        "kind": "mesh",
        "allow_enabling_permissive_mutual_tls": True,
        "transparent_proxy": {"mesh_destinations_only": True},
        "Meta": {"owner": "platform"},
    }
    assert (await http.put("/v1/config", json=body))[:2] == (200, True)
    status, entry, headers = await http.get("/v1/config/mesh/mesh")
    assert status == 200
    assert entry == {
        "Kind": "mesh",
        "TransparentProxy": {"MeshDestinationsOnly": True},
        "AllowEnablingPermissiveMutualTLS": True,
        "Meta": {"owner": "platform"},
        "CreateIndex": entry["CreateIndex"],
        "ModifyIndex": int(headers["X-Consul-Index"]),
    }
    _, listed, _ = await http.get("/v1/config/mesh")
    assert listed == [entry]
    # The defaults: TransparentProxy (not a pointer) always shown, the flags omitted.
    assert (await http.put("/v1/config", json={"Kind": "mesh"}))[:2] == (200, True)
    _, entry, _ = await http.get("/v1/config/mesh/mesh")
    assert {k: v for k, v in entry.items() if not k.endswith("Index")} == {
        "Kind": "mesh",
        "TransparentProxy": {"MeshDestinationsOnly": False},
    }


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        (
            {"Kind": "mesh", "Name": "mesh"},
            400,
            'Request decoding failed: 1 error occurred:\n\t* invalid config key "Name"\n\n',
        ),
        (
            {"Kind": "mesh", "AllowEnablingPermissiveMutualTLS": "yes"},
            400,
            "Request decoding failed: 1 error occurred:\n\t* 'AllowEnablingPermissiveMutualTLS' "
            "expected type 'bool'",
        ),
        (
            {"Kind": "mesh", "TLS": {"Incoming": {"TLSMinVersion": "TLSv1_9"}}},
            500,
            "error in incoming TLS configuration: no matching TLS version found for TLSv1_9, "
            "please specify one of [TLS_AUTO, TLSv1_0, TLSv1_1, TLSv1_2, TLSv1_3]",
        ),
        (
            {
                "Kind": "mesh",
                "TLS": {"Outgoing": {"TLSMinVersion": "TLSv1_3", "TLSMaxVersion": "TLSv1_2"}},
            },
            500,
            "error in outgoing TLS configuration: configuring max version TLSv1_2 less than "
            "the configured min version TLSv1_3 is invalid",
        ),
        (
            {
                "Kind": "mesh",
                "TLS": {
                    "Incoming": {
                        "TLSMinVersion": "TLSv1_3",
                        "CipherSuites": ["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"],
                    }
                },
            },
            500,
            "error in incoming TLS configuration: configuring CipherSuites is only applicable "
            "to connections negotiated with TLS 1.2 or earlier, TLSMinVersion is set to TLSv1_3",
        ),
    ],
)
async def test_bad_mesh_entries_are_refused_and_change_nothing(
    http: Http, body: dict[str, Any], status: int, text: str
) -> None:
    got, message, _ = await http.put("/v1/config", json=body)
    assert got == status
    assert message.startswith(text), message
    assert (await http.get("/v1/config/mesh/mesh"))[0] == 404


async def test_turning_the_flag_off_keeps_permissive_services_but_allows_no_new_one(
    http: Http,
) -> None:
    assert (await http.put("/v1/config", json=mesh(True)))[:2] == (200, True)
    assert (await http.put("/v1/config", json=service_defaults("api", "permissive")))[:2] == (
        200,
        True,
    )
    # Turned off: accepted, and api stays permissive (Consul does not touch it).
    assert (await http.put("/v1/config", json=mesh(False)))[:2] == (200, True)
    assert await mode_of(http, "service-defaults", "api") == "permissive"
    # api may be written again as permissive (its mode is not being changed)...
    again = service_defaults("api", "permissive", Protocol="http")
    assert (await http.put("/v1/config", json=again))[:2] == (200, True)
    # ...but no other entry may become permissive, nor api once it has left permissive.
    status, message, _ = await http.put("/v1/config", json=service_defaults("web", "permissive"))
    assert (status, message) == (500, NOT_ALLOWED)
    assert (await http.put("/v1/config", json=service_defaults("api", "strict")))[:2] == (
        200,
        True,
    )
    status, message, _ = await http.put("/v1/config", json=service_defaults("api", "permissive"))
    assert (status, message) == (500, NOT_ALLOWED)
    # The mesh entry itself can go at any time.
    assert (await http.put("/v1/config", json=mesh(True)))[:2] == (200, True)
    assert (await http.put("/v1/config", json=service_defaults("api", "permissive")))[:2] == (
        200,
        True,
    )
    assert (await http.call("DELETE", "/v1/config/mesh/mesh"))[0] == 200
    assert await mode_of(http, "service-defaults", "api") == "permissive"
