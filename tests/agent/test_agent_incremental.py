"""The watcher's incremental path gives exactly what a full decode gives.

`decode_answer` decodes the answer's bytes into lean typed entries and reuses the endpoints of
entries equal to the previous answer's; these tests drive random sequences of Consul-like
changes (every write bumps the written object's ModifyIndex, as Consul does) and compare each
answer's result, accepted or rejected, with `json.loads` + `ServiceEntry.from_json` +
`build_snapshot` of the whole answer (an independent decoder).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import subprocess
import sys
import time
from typing import Any

from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.catalog import (
    EMPTY_MEMO,
    Diff,
    Endpoint,
    Memo,
    Snapshot,
    SnapshotRejected,
    WatchKey,
    build_snapshot,
    decode_answer,
    diff,
    hash_key_is_secret,
    snapshot_of,
)
from agent.connectivity import Connectivity
from agent.consul import ConsulClient
from agent.consul_config import ConsulConfig
from agent.consul_json import ShapeError
from agent.consul_results import ServiceEntry
from agent.consul_services import CheckDefinition, ProxyConfig, ServiceRegistration
from agent.watch import UpstreamWatcher, WatchSettings
from devstack.server import DevServer

KEY = WatchKey("api")


class Cluster:
    """A tiny model of Consul's catalog that renders `/v1/health/connect/api` entries."""

    def __init__(self) -> None:
        self.index = 10
        self.nodes: dict[str, dict[str, Any]] = {}
        self.services: dict[tuple[str, str], dict[str, Any]] = {}
        self.checks: dict[tuple[str, str], dict[str, Any]] = {}
        self.duplicate: tuple[str, str] | None = None
        self.reverse = False
        """List this answer's instances in reverse order (Consul never does; a proxy might)."""

    def bump(self) -> int:
        self.index += 1
        return self.index

    def node(self, name: str, address: str) -> None:
        old = self.nodes.get(name)
        if old is None or old["Address"] != address:
            self.nodes[name] = {"Node": name, "Address": address, "Datacenter": "dc1"}
            self.nodes[name]["ModifyIndex"] = self.bump()

    def service(self, node: str, sid: str, **fields: Any) -> None:
        body = {
            "ID": sid,
            "Service": "api-sidecar-proxy",
            "Kind": "connect-proxy",
            "Port": 21000,
            "Address": "",
            "Proxy": {"DestinationServiceName": "api"},
            "Weights": {"Passing": 1, "Warning": 1},
        }
        body.update(self.services.get((node, sid), {}))
        body.update(fields)
        body["ModifyIndex"] = self.bump()
        self.services[(node, sid)] = body
        self.checks.setdefault((node, sid), {})

    def check(self, node: str, sid: str, check_id: str, status: str) -> None:
        self.checks[(node, sid)][check_id] = {
            "CheckID": check_id,
            "Status": status,
            "ServiceID": sid,
            "ModifyIndex": self.bump(),
        }

    def render(self, *, indexes: bool = True) -> list[dict[str, Any]]:
        out = []
        order = sorted(self.services)
        if self.duplicate in self.services:
            order.append(self.duplicate)
        if self.reverse:
            order.reverse()
        for node, sid in order:
            entry = {
                "Node": self.nodes[node],
                "Service": self.services[(node, sid)],
                "Checks": list(self.checks[(node, sid)].values()),
            }
            entry = copy.deepcopy(entry)
            if not indexes:
                for part in (entry["Node"], entry["Service"], *entry["Checks"]):
                    part.pop("ModifyIndex", None)
            out.append(entry)
        return out


NODES = ["n1", "n2", "n3"]
SIDS = ["a", "b", "c", "d"]
node_st = st.sampled_from(NODES)
sid_st = st.sampled_from(SIDS)

change = st.one_of(
    st.tuples(st.just("add"), node_st, sid_st),
    st.tuples(st.just("remove"), node_st, sid_st),
    st.tuples(st.just("port"), node_st, sid_st, st.sampled_from([0, 21000, 21001, 21002])),
    st.tuples(st.just("port-shape"), node_st, sid_st, st.sampled_from(["21000", None, True])),
    st.tuples(st.just("service-address"), node_st, sid_st, st.sampled_from(["", "10.9.0.1"])),
    st.tuples(st.just("node-address"), node_st, st.sampled_from(["10.0.0.1", "10.0.0.2", ""])),
    st.tuples(st.just("dest"), node_st, sid_st, st.sampled_from(["api", "db"])),
    st.tuples(
        st.just("check"),
        node_st,
        sid_st,
        st.sampled_from(["ready", "alive", "_service_maintenance:x"]),
        st.sampled_from(["passing", "critical", "warning", "bogus"]),
    ),
    st.tuples(st.just("drop-checks"), node_st, sid_st),
    st.tuples(st.just("duplicate"), node_st, sid_st),
    st.tuples(st.just("reverse")),
    st.tuples(st.just("no-indexes")),
    st.tuples(st.just("nothing")),
)


def apply(cluster: Cluster, op: tuple[Any, ...]) -> bool:
    """Apply one change; returns whether this answer is rendered without indexes."""
    kind, *args = op
    for name in NODES:
        if name not in cluster.nodes:
            cluster.node(name, "10.0.0.1")
    cluster.reverse = kind == "reverse"
    if kind == "no-indexes":
        return True
    if kind in ("nothing", "reverse"):
        return False
    if kind == "node-address":
        cluster.node(args[0], args[1])
        return False
    node, sid = args[0], args[1]
    exists = (node, sid) in cluster.services
    cluster.duplicate = None
    if kind == "add" or not exists:
        cluster.service(node, sid)
    elif kind == "remove":
        del cluster.services[(node, sid)]
        del cluster.checks[(node, sid)]
    elif kind in ("port", "port-shape"):
        cluster.service(node, sid, Port=args[2])
    elif kind == "service-address":
        cluster.service(node, sid, Address=args[2])
    elif kind == "dest":
        cluster.service(node, sid, Proxy={"DestinationServiceName": args[2]})
    elif kind == "check":
        cluster.check(node, sid, args[2], args[3])
    elif kind == "drop-checks":
        cluster.checks[(node, sid)] = {}
        cluster.bump()
    elif kind == "duplicate":
        cluster.duplicate = (node, sid)
    return False


def full(raw: list[dict[str, Any]], index: int) -> Snapshot | type[Exception]:
    try:
        return build_snapshot(KEY, [ServiceEntry.from_json(e) for e in raw], index, 0.0)
    except (ShapeError, SnapshotRejected) as exc:
        return type(exc)


def incremental(
    raw: list[dict[str, Any]], index: int, memo: Memo
) -> tuple[Snapshot | type[Exception], Memo]:
    try:
        decoded = decode_answer(KEY, _body(raw), memo)
        snapshot = snapshot_of(KEY, decoded.endpoints, index, 0.0, in_order=decoded.in_order)
        return snapshot, decoded.memo
    except (ShapeError, SnapshotRejected) as exc:
        return type(exc), memo


def _body(raw: object) -> bytes:
    return json.dumps(raw).encode()


def reference_diff(old: Snapshot, new: Snapshot) -> Diff:
    """`diff` as it was before identity shortcuts: every endpoint compared by key."""
    before = {e.key: e for e in old.endpoints}
    after = {e.key: e for e in new.endpoints}
    return Diff(
        added=tuple(e for k, e in after.items() if k not in before),
        removed=tuple(e for k, e in before.items() if k not in after),
        changed=tuple((before[k], e) for k, e in after.items() if k in before and before[k] != e),
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(change, min_size=1, max_size=40))
def test_incremental_path_equals_full_rebuild(changes: list[tuple[Any, ...]]) -> None:
    cluster = Cluster()
    memo: Memo = EMPTY_MEMO
    last_full: Snapshot | None = None
    last_inc: Snapshot | None = None
    for op in changes:
        bare = apply(cluster, op)
        raw = cluster.render(indexes=not bare)
        expected = full(copy.deepcopy(raw), cluster.index)
        got, memo = incremental(raw, cluster.index, memo)
        assert got == expected, op
        if isinstance(got, Snapshot) and isinstance(expected, Snapshot):
            if last_full is not None and last_inc is not None:
                assert diff(last_inc, got) == reference_diff(last_full, expected)
                assert diff(last_inc, got) == diff(last_full, expected)
            last_full, last_inc = expected, got


def _entry(sid: str, port: object, *, index: int | None = 7) -> dict[str, Any]:
    service: dict[str, Any] = {
        "ID": sid,
        "Service": "api-sidecar-proxy",
        "Kind": "connect-proxy",
        "Port": port,
        "Proxy": {"DestinationServiceName": "api"},
    }
    node: dict[str, Any] = {"Node": "n1", "Address": "10.0.0.1"}
    if index is not None:
        service["ModifyIndex"] = node["ModifyIndex"] = index
    return {"Node": node, "Service": service, "Checks": []}


def test_unchanged_entries_reuse_their_endpoint_object() -> None:
    first = decode_answer(KEY, _body([_entry("a", 21000), _entry("b", 21000)]), EMPTY_MEMO)
    assert first.reused == 0
    moved = _entry("b", 21001, index=8)
    second = decode_answer(KEY, _body([_entry("a", 21000), moved]), first.memo)
    assert second.reused == 1
    assert second.endpoints[0] is first.endpoints[0]
    assert second.endpoints[1].port == 21001
    # The memo holds only the last answer's entries: b's old version is gone.
    assert len(second.memo.prints) == 2
    # Moved in the answer (another instance listed first): still found by value.
    third = decode_answer(KEY, _body([_entry("c", 21000), _entry("a", 21000), moved]), second.memo)
    assert third.reused == 2
    assert third.endpoints[1] is first.endpoints[0]


def test_entries_are_compared_by_value_not_by_index() -> None:
    # Without ModifyIndexes an unchanged entry is still reused; a changed one never is, even
    # when Consul's indexes claim nothing moved.
    first = decode_answer(KEY, _body([_entry("a", 21000, index=None)]), EMPTY_MEMO)
    again = decode_answer(KEY, _body([_entry("a", 21000, index=None)]), first.memo)
    assert again.reused == 1 and again.endpoints[0] is first.endpoints[0]
    moved = decode_answer(KEY, _body([_entry("a", 21001, index=7)]), first.memo)
    assert moved.reused == 0 and moved.endpoints[0].port == 21001


def test_a_malformed_entry_is_rejected_whatever_the_memo_holds() -> None:
    first = decode_answer(KEY, _body([_entry("a", 21000, index=1)]), EMPTY_MEMO)
    for port in ("21000", True, 21000.0):
        try:
            decode_answer(KEY, _body([_entry("a", port, index=1)]), first.memo)
        except ShapeError as exc:
            assert "$[0].Service.Port" in str(exc), exc
            continue
        raise AssertionError(f"Port {port!r} was accepted")


def test_an_entry_is_named_by_its_position_when_only_it_changed() -> None:
    entries = [_entry("a", 21000), _entry("b", 21000)]
    first = decode_answer(KEY, _body(entries), EMPTY_MEMO)
    for bad, where in (
        (_entry("b", "21000"), "`$[1].Service.Port`"),
        ([_entry("b", 21000)], "`$[1]`"),  # not an object at all
        ({**_entry("b", 21000), "Node": None}, "`$[1].Node`"),
    ):
        try:
            decode_answer(KEY, _body([entries[0], bad]), first.memo)
        except ShapeError as exc:
            assert where in str(exc), exc
            continue
        raise AssertionError(f"{bad!r} was accepted")


def test_a_large_answer_reports_a_shape_error_before_any_content_error() -> None:
    # Past a few changed entries, shapes are checked in a pass of their own: the answer's
    # result must still be what checking every shape first gives.
    entries = [_entry(f"s{i:03d}", 21000) for i in range(200)]
    good = decode_answer(KEY, _body(entries), EMPTY_MEMO)
    expected = full(entries, 1)
    assert snapshot_of(KEY, good.endpoints, 1, 0.0, in_order=good.in_order) == expected
    foreign = copy.deepcopy(entries)
    foreign[10]["Service"]["Proxy"]["DestinationServiceName"] = "db"
    try:
        decode_answer(KEY, _body(foreign), EMPTY_MEMO)
    except SnapshotRejected as exc:
        assert "n1/s010" in str(exc), exc
    else:
        raise AssertionError("a proxy for db was accepted")
    foreign[180]["Service"]["Port"] = "21000"
    for memo in (EMPTY_MEMO, good.memo):
        try:
            decode_answer(KEY, _body(foreign), memo)
        except ShapeError as exc:
            assert "$[180].Service.Port" in str(exc), exc
        else:
            raise AssertionError("a string port was accepted")


def test_a_key_taking_warning_instances_leaves_critical_ones_out_incrementally_too() -> None:
    key = WatchKey("api", warning=True)

    def answer(port_b: int) -> list[dict[str, Any]]:
        out = []
        for sid, status, port in (("a", "passing", 21000), ("b", "critical", port_b)):
            entry = _entry(sid, port)
            entry["Checks"] = [{"CheckID": "ready", "Status": status}]
            out.append(entry)
        warned = _entry("c", 21000)
        warned["Checks"] = [{"CheckID": "ready", "Status": "warning"}]
        return [*out, warned]

    memo: Memo = EMPTY_MEMO
    for port_b in (21000, 21001, 21001):
        raw = answer(port_b)
        decoded = decode_answer(key, _body(raw), memo)
        got = snapshot_of(key, decoded.endpoints, 1, 0.0, in_order=decoded.in_order)
        want = build_snapshot(key, [ServiceEntry.from_json(e) for e in raw], 1, 0.0)
        assert got == want and [e.service_id for e in got.endpoints] == ["a", "c"]
        memo = decoded.memo


def test_fingerprints_are_the_bytes_when_pythonhashseed_fixes_the_hash_key() -> None:
    # A known hash key would let whoever registers an instance make its entry collide with
    # another's: the memo then compares bytes.
    assert hash_key_is_secret({}, ignore_environment=False)
    assert hash_key_is_secret({"PYTHONHASHSEED": "random"}, ignore_environment=False)
    assert not hash_key_is_secret({"PYTHONHASHSEED": "0"}, ignore_environment=False)
    assert not hash_key_is_secret({"PYTHONHASHSEED": "4"}, ignore_environment=False)
    assert hash_key_is_secret({"PYTHONHASHSEED": "4"}, ignore_environment=True)
    check = f"""
import json
from agent.catalog import EMPTY_MEMO, WatchKey, decode_answer
body = {_body([_entry("a", 21000), _entry("b", 21000)])!r}
first = decode_answer(WatchKey("api"), body, EMPTY_MEMO)
again = decode_answer(WatchKey("api"), body.replace(b"21000", b"21001", 1), first.memo)
print(json.dumps([type(p).__name__ for p in first.memo.prints] + [again.reused]))
"""
    for seed, kind in (("0", "bytes"), ("random", "int")):
        out = subprocess.run(
            [sys.executable, "-c", check],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert json.loads(out) == [kind, kind, 1], (seed, out)


class ScriptedConsul:
    """A real HTTP server answering the health endpoint from a script, then parking."""

    def __init__(self, answers: list[tuple[int, list[dict[str, Any]]]]) -> None:
        self.answers = answers
        self.asked: list[str] = []
        self.done = asyncio.Event()
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.address = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.asked.append(request.query.get("index", "0"))
        if len(self.asked) > len(self.answers):
            self.done.set()
            await self._release.wait()
            return web.Response(status=503, text="going away")
        index, body = self.answers[len(self.asked) - 1]
        return web.Response(
            text=json.dumps(body),
            content_type="application/json",
            headers={"X-Consul-Index": str(index), "X-Consul-KnownLeader": "true"},
        )

    async def __aenter__(self) -> ScriptedConsul:
        app = web.Application()
        app.router.add_get("/v1/health/connect/{name}", self.handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.address = f"127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        self._release.set()
        await self._runner.cleanup()


async def test_index_going_backwards_drops_the_memo_and_reads_again() -> None:
    # At index 5 (after a restore) the same fingerprint carries other data; only a full
    # read at index 0 may be trusted, and it is what the snapshot must show.
    answers = [
        (10, [_entry("a", 21000)]),
        (5, [_entry("a", 21005)]),
        (5, [_entry("a", 21005)]),
    ]
    async with (
        ScriptedConsul(answers) as fake,
        ConsulClient(ConsulConfig(address=fake.address, timeout=5)) as client,
    ):
        watcher = UpstreamWatcher(
            client, KEY, lambda: WatchSettings(wait=30.0), Connectivity(time.time)
        )
        task = asyncio.ensure_future(watcher.run())
        try:
            await fake.done.wait()
            assert fake.asked == ["0", "10", "0", "5"]
            snap = watcher.latest.get()
            assert snap is not None and [e.port for e in snap.endpoints] == [21005]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _proxy(i: int, port: int = 21000) -> ServiceRegistration:
    return ServiceRegistration(
        name="api-sidecar-proxy",
        id=f"api-{i}-sidecar-proxy",
        port=port,
        kind="connect-proxy",
        proxy=ProxyConfig(destination_service_name="api", local_service_port=8000 + i),
        checks=(CheckDefinition(check_id=f"api-{i}-ready", ttl="10m", status="passing"),),
    )


async def test_watcher_on_devstack_matches_a_full_read_after_every_change(
    dev: DevServer, consul: ConsulClient
) -> None:
    watcher = UpstreamWatcher(
        consul, KEY, lambda: WatchSettings(wait=30.0), Connectivity(time.time)
    )
    task = asyncio.ensure_future(watcher.run())
    version = 0

    async def settled() -> tuple[Endpoint, ...]:
        nonlocal version
        got = await consul.health.connect("api", passing=True)
        want = build_snapshot(KEY, got.value, got.index, 0.0).endpoints
        async with asyncio.timeout(10):  # a deadline, not a measurement
            while True:
                snap = watcher.latest.get()
                if snap is not None and snap.endpoints == want:
                    return want
                version, _ = await watcher.latest.changed(version)

    async def catalog_node(name: str, address: str, i: int, port: int) -> None:
        await consul.catalog.register(
            {
                "Node": name,
                "Address": address,
                "Service": {
                    "ID": f"api-{i}-sidecar-proxy",
                    "Service": "api-sidecar-proxy",
                    "Kind": "connect-proxy",
                    "Port": port,
                    "Proxy": {"DestinationServiceName": "api", "LocalServicePort": 8080},
                },
            }
        )

    try:
        await settled()
        for i in range(5):
            await consul.agent.register_service(_proxy(i))
        assert len(await settled()) == 5
        await consul.agent.register_service(_proxy(2, port=21002))  # a changed port
        assert {e.port for e in await settled()} == {21000, 21002}
        await consul.agent.fail_check("api-3-ready")
        assert len(await settled()) == 4
        await consul.agent.pass_check("api-3-ready")
        await consul.agent.deregister_service("api-4-sidecar-proxy")
        assert len(await settled()) == 4
        # Another node's instances, then that node moves: the service's own ModifyIndex
        # stays, the node's moves, and the endpoints' address must follow.
        await catalog_node("far", "10.1.0.1", 10, 21010)
        await catalog_node("far", "10.1.0.1", 11, 21011)
        assert len(await settled()) == 6
        await consul.catalog.register({"Node": "far", "Address": "10.1.0.2"})
        far = [e for e in await settled() if e.node == "far"]
        assert {e.address for e in far} == {"10.1.0.2"}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await consul.agent.register_service(_proxy(99))


def test_an_instance_in_warning_weighs_its_warning_weight_and_zero_leaves_it_out() -> None:
    """Consul's calculateEndpointHealthAndWeight: Weights.Warning for an instance in warning,
    and a weight under 1 makes it unhealthy. Both decoders (the lean incremental one and
    ServiceEntry.from_json) agree."""
    key = WatchKey("api", warning=True)
    raw = []
    for sid, status, weights in (
        ("a", "passing", {"Passing": 5, "Warning": 2}),
        ("b", "warning", {"Passing": 5, "Warning": 2}),
        ("c", "warning", {"Passing": 5, "Warning": 0}),
        ("d", "warning", None),
    ):
        entry = _entry(sid, 21000)
        entry["Checks"] = [{"CheckID": "ready", "Status": status}]
        if weights is not None:
            entry["Service"]["Weights"] = weights
        raw.append(entry)
    decoded = decode_answer(key, _body(raw), EMPTY_MEMO)
    got = snapshot_of(key, decoded.endpoints, 1, 0.0, in_order=decoded.in_order)
    want = build_snapshot(key, [ServiceEntry.from_json(e) for e in raw], 1, 0.0)
    assert got == want
    assert [(e.service_id, e.weight) for e in got.endpoints] == [("a", 5), ("b", 2), ("d", 1)]
