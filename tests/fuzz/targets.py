"""Fuzz targets over the parsers that take input from outside: one function per target, bytes
in, and an exception out only when a property is broken.

Each target decodes its bytes the way the input really arrives (YAML or filter text as UTF-8,
Consul bodies and answers as JSON), calls the public entry point, and lets through only the
error types that entry point documents; anything else (a KeyError, a RecursionError, a
TypeError) propagates and is a finding. Where there is an encoder, the decoded value must
survive a round trip. The same functions run under atheris (tests/fuzz/run.py, `make fuzz`)
and over the seed corpus in CI (tests/fuzz/test_fuzz_corpus.py).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.catalog import (
    EMPTY_MEMO,
    SnapshotRejected,
    WatchKey,
    build_snapshot,
    decode_answer,
    snapshot_of,
)
from agent.config import ConfigError, load, parse, to_raw
from agent.consul_json import ShapeError, as_list
from agent.consul_results import (
    AgentSelf,
    AgentService,
    CatalogNode,
    CatalogService,
    HealthCheck,
    KVPair,
    LocalServiceHealth,
    Member,
    ServiceEntry,
)
from devstack.bexpr import FilterError, check_syntax, compile_filter
from devstack.filter_schemas import HEALTH_ENTRY
from intentions.engine import Identity, compile_snapshot, http_request
from intentions.entries import DEFAULT, entry_to_json, load_entry, read_entry
from intentions.errors import EntryError, PolicyError
from intentions.policy import load_policies
from intentions.translate import ServiceRef, TranslateOptions, translate
from traffic.chain import ChainEntries, CompileRequest, compile_chain
from traffic.entries import entry_from_json
from traffic.entries import load_entry as load_routing_entry
from traffic.errors import TrafficError

Target = Callable[[bytes], None]

TRUST_DOMAIN = "11111111-2222-3333-4444-555555555555.consul"


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _json(data: bytes) -> Any:
    """The JSON value the bytes hold, or a sentinel when they hold none (a body Consul's own
    decoder refuses before ours is reached)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return _NOT_JSON


_NOT_JSON = object()


_named_input = b""


def _named(err: Exception) -> None:
    """An error must say what was wrong: never an empty message, and never one out of all
    proportion to the input (a YAML alias bomb quoted in full is gigabytes)."""
    text = str(err)
    assert text.strip(), f"{type(err).__name__} with an empty message"
    assert len(text) <= 64 * len(_named_input) + 4096, (
        f"{type(err).__name__} of {len(text)} characters for {len(_named_input)} bytes of input"
    )


def _input(data: bytes) -> bytes:
    global _named_input  # noqa: PLW0603 - one input at a time; read by _named
    _named_input = data
    return data


# ---- (2) AuthorizationPolicy parser and translator -------------------------------------------


_INVENTORY = (
    ServiceRef("api", "default"),
    ServiceRef("web", "default"),
    ServiceRef("db", "prod", protocol="tcp"),
    ServiceRef("ratings", "prod", labels=(("app", "ratings"), ("version", "v1"))),
)


def policy(data: bytes) -> None:
    """YAML text -> load_policies -> translate: PolicyError or a translation, deterministic."""
    try:
        policies = load_policies(_text(data), origin="fuzz.yaml")
    except PolicyError as err:
        _named(err)
        assert err.problems, "PolicyError without problems"
        return
    services = _INVENTORY
    for options in (TranslateOptions(), TranslateOptions(single_namespace="default")):
        try:
            first = translate(policies, services, options)
        except PolicyError as err:
            _named(err)
            continue
        again = translate(policies, services, options)
        assert first == again, "translation is not deterministic"
        for entry in first.entries:
            # What the translator emits is what Consul would accept, and reads back the same.
            body = entry_to_json(entry, for_write=True)
            assert load_entry(body) == load_entry(entry_to_json(load_entry(body), for_write=True))


# ---- (3) config-entry decoders and validators ------------------------------------------------


# Requests the engine decides for every entry that loads: long values of the characters a
# pattern is likely to repeat (a backtracking matcher takes for ever on them; libFuzzer's
# -timeout reports it), a lone surrogate, an empty path.
_LONG = "a" * 64 + "!"
_REQUESTS = [
    http_request("GET", "/" + _LONG, "api", {"x-user": [_LONG], "x-a": ["1"]}, normalize=False),
    http_request("POST", "/admin/x?y=1", "API", {"x-user": ["a b", "\udcff"]}, normalize=False),
    http_request("GET", "/", "", {}, normalize=False),
]
_SOURCES = [Identity("web"), Identity("db", namespace="prod"), Identity("x", peer="other")]


def intentions_entry(data: bytes) -> None:
    """A `service-intentions` body -> load_entry / read_entry: EntryError or an entry that
    round-trips through its JSON, and that the engine compiles and decides with (or marks
    broken, which denies): never an exception."""
    body = _json(data)
    if body is _NOT_JSON:
        return
    for decode in (load_entry, read_entry):
        try:
            entry = decode(body)
        except EntryError as err:
            _named(err)
            continue
        assert read_entry(entry_to_json(entry)) == entry, "entry_to_json does not round-trip"
        snapshot = compile_snapshot([entry], default_allow=True)
        policy = snapshot.for_destination(
            entry.name, entry.namespace or DEFAULT, entry.partition or DEFAULT
        )
        for source in _SOURCES:
            policy.decide_connection(source)
            for request in _REQUESTS:
                policy.decide_request(source, request)


def _filter_check(expression: str) -> str | None:
    try:
        compile_filter(expression, HEALTH_ENTRY)
    except FilterError as err:
        return str(err)
    return None


def traffic_entry(data: bytes) -> None:
    """A routing entry body -> traffic.entries.load_entry: TrafficError or an entry that
    round-trips through to_json."""
    body = _json(data)
    if not isinstance(body, dict):
        return
    try:
        entry = load_routing_entry(body, check_filter=_filter_check)
    except TrafficError as err:
        _named(err)
        return
    assert entry_from_json(entry.to_json()) == entry, "to_json does not round-trip"


def traffic_chain(data: bytes) -> None:
    """A JSON list of routing entries -> every chain they touch compiles or is a GraphError."""
    bodies = _json(data)
    if not isinstance(bodies, list):
        return
    entries = []
    for body in bodies:
        if not isinstance(body, dict):
            continue
        try:
            entries.append(load_routing_entry(body))
        except TrafficError:
            continue
    chains = ChainEntries.of(entries)
    names = {e.name for e in entries} | {"web"}
    for name in sorted(names):
        try:
            compile_chain(CompileRequest(name, TRUST_DOMAIN), chains)
        except TrafficError as err:
            _named(err)


# ---- (4) filter expressions ------------------------------------------------------------------

_HEALTH_ENTRY_SAMPLE: Mapping[str, Any] = {
    "Node": {
        "ID": "",
        "Node": "n1",
        "Address": "127.0.0.1",
        "Datacenter": "dc1",
        "TaggedAddresses": {"lan": "127.0.0.1"},
        "Meta": {"rack": "a"},
    },
    "Service": {
        "ID": "api-1",
        "Service": "api",
        "Tags": ["v1", "canary"],
        "Meta": {"version": "1"},
        "Port": 8080,
        "Address": "10.0.0.1",
        "Weights": {"Passing": 1, "Warning": 1},
        "Kind": "",
    },
    "Checks": [{"CheckID": "serfHealth", "Status": "passing", "ServiceTags": []}],
}


def filter_expression(data: bytes) -> None:
    """Text -> check_syntax / compile_filter against the health entry schema -> matches."""
    text = _text(data)
    try:
        check_syntax(text)
    except FilterError as err:
        _named(err)
    try:
        compiled = compile_filter(text, HEALTH_ENTRY)
    except FilterError as err:
        _named(err)
        return
    assert compiled.matches(_HEALTH_ENTRY_SAMPLE) in (True, False)
    assert compiled.matches({}) in (True, False)


# ---- (5) the agent's config loader -----------------------------------------------------------

_ENV = {"CONSUL_HTTP_TOKEN": "fuzz-token"}


_CONFIG_FILE = Path(tempfile.gettempdir()) / f"meshlet-fuzz-{os.getpid()}.yaml"


def agent_config(data: bytes) -> None:
    """A settings file -> agent.config.load: ConfigError or a config with
    parse(to_raw(cfg)) == cfg."""
    _CONFIG_FILE.write_bytes(data)
    try:
        cfg = load(_CONFIG_FILE, _ENV)
    except ConfigError as err:
        _named(err)
        assert err.problems, "ConfigError without problems"
        for problem in err.problems:
            assert problem.message.strip(), f"a problem at {problem.path!r} says nothing"
        return
    assert parse(to_raw(cfg), _ENV, source=str(_CONFIG_FILE)) == cfg, "to_raw does not round-trip"


# ---- (6) Consul answer decoders --------------------------------------------------------------

_DECODERS: tuple[Callable[[object], object], ...] = (
    HealthCheck.from_json,
    AgentService.from_json,
    CatalogNode.from_json,
    CatalogService.from_json,
    ServiceEntry.from_json,
    KVPair.from_json,
    Member.from_json,
    AgentSelf.from_json,
    LocalServiceHealth.from_json,
)


def consul_results(data: bytes) -> None:
    """The first byte picks a decoder, the rest is the JSON answer: ShapeError or a value."""
    if not data:
        return
    decode = _DECODERS[data[0] % len(_DECODERS)]
    value = _json(data[1:])
    if value is _NOT_JSON:
        return
    try:
        decode(value)
    except ShapeError as err:
        _named(err)


def _names_a_field_twice(data: bytes) -> bool:
    twice = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal twice
        twice = twice or len({k for k, _ in items}) < len(items)
        return dict(items)

    json.loads(data, object_pairs_hook=pairs)
    return twice


def catalog(data: bytes) -> None:
    """A `/v1/health/connect/api?passing` answer's bytes -> decode_answer then snapshot_of, as
    the watch does: ShapeError or SnapshotRejected or a snapshot. When the full decode of every
    field (ServiceEntry.from_json) accepts the answer too, both give the same snapshot (the
    watch's decode reads only what a snapshot needs, so it may accept answers whose unread
    fields the full decode refuses). Decoding again with the memo the answer left gives the
    same snapshot and validates nothing again (a memo never changes an answer's meaning)."""
    raw = _json(data)
    if raw is _NOT_JSON:
        return
    key = WatchKey("api")
    try:
        full: Any = build_snapshot(
            key, [ServiceEntry.from_json(i) for i in as_list(raw, "r")], 1, 0.0
        )
    except (ShapeError, SnapshotRejected):
        full = None
    try:
        first = decode_answer(key, data, EMPTY_MEMO)
        snapshot = snapshot_of(key, list(first.endpoints), 1, 0.0)
    except (ShapeError, SnapshotRejected) as err:
        _named(err)
        # An object naming a field twice (which Consul never sends): json.loads keeps the last
        # value unread, msgspec validates every one, so the watch may refuse what the full
        # decode reads. Refusing is the closed side; where both accept they must agree.
        if full is not None and not _names_a_field_twice(data):
            raise AssertionError("decode_answer refused an answer build_snapshot accepts") from err
        return
    if full is not None:
        assert full == snapshot, "the watch's decode and the full decode disagree"
    again = decode_answer(key, data, first.memo)
    assert snapshot_of(key, list(again.endpoints), 1, 0.0) == snapshot, "the memo changed it"
    assert again.reused == len(again.endpoints), "an unchanged entry was validated again"


def _checked(target: Target) -> Target:
    def run(data: bytes) -> None:
        target(_input(data))

    run.__doc__ = target.__doc__
    return run


TARGETS: dict[str, Target] = {
    "policy": _checked(policy),
    "intentions_entry": _checked(intentions_entry),
    "traffic_entry": _checked(traffic_entry),
    "traffic_chain": _checked(traffic_chain),
    "filter_expression": _checked(filter_expression),
    "agent_config": _checked(agent_config),
    "consul_results": _checked(consul_results),
    "catalog": _checked(catalog),
}
