"""The access log's line formats (connect.access_format), compiled once per settings change:
the lines Envoy's documented operators give for fixed records, the default line as
json.dumps writes the record, a format read off a real request through the outbound proxy,
and the writer letting the event loop run while it formats a batch."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connect.access_format import OPERATORS, compile_format
from connect.access_log import AccessLog, AccessLogSettings, http_line, http_record
from connect.balancer import BalancerConfig, compile_balancer
from connect.cluster import fixed_endpoints
from connect.dial import Upstream
from connect.http1 import OutboundHTTP
from connect.observe import Telemetry
from connect.seams import PeerCache
from tests.connect.proxy_test_ca import ProxyTestCA, spiffe

HTTP = {
    "start_time": "2026-12-06T09:00:00.123Z",
    "duration_ms": 3.25,
    "protocol": "HTTP/1.1",
    "method": "GET",
    "authority": "api",
    "path": '/x?q=\u00e9"',
    "response_code": 200,
    "response_flags": "-",
    "bytes_received": 0,
    "bytes_sent": 2,
    "upstream_host": "127.0.0.1:8080",
    "upstream_cluster": "api",
    "reporter": "destination",
    "peer": "spiffe://t.consul/ns/default/dc/dc1/svc/web",
    "intention": "allow",
    "rule": "web => api permission 1",
    "request_id": "r-1",
    "trace_id": "",
    "_headers": {":host": "api", ":user-agent": "curl/8", ":x-tenant": "a\tb"},
}
LISTENER = {
    "start_time": "2026-12-06T09:00:01.000Z",
    "duration_ms": 0,
    "protocol": "TCP",
    "response_flags": "-",
    "bytes_received": 0,
    "bytes_sent": 0,
    "upstream_host": "",
    "upstream_cluster": "api",
    "reporter": "destination",
    "downstream_remote_address": "127.0.0.1:5555",
    "listener": True,
    "listener_refusal": "unknown_ca",
}
TEXT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL%" %RESPONSE_CODE% %RESPONSE_FLAGS% '
    '%BYTES_RECEIVED% %BYTES_SENT% %DURATION% "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" '
    '"%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER% %DOWNSTREAM_PEER_URI_SAN% '
    "%DOWNSTREAM_REMOTE_ADDRESS% %REQ(x-tenant)% %REQ(missing)% 100%% %NOT AN OPERATOR%\n"
)
"""Envoy's default text format's operators and more; `%%` and `%NOT AN OPERATOR%` are no
operators (text as it stands)."""
JSON_FORMAT = json.dumps(
    {
        "when": "%START_TIME%",
        "what": "%REQ(:METHOD)% %REQ(:PATH)%",
        "ua": "%REQ(User-Agent)%",
        "code": "%RESPONSE_CODE%",
        "none": "%REQ(x-none)%",
        "lit": "plain \u00fc",
        "\u00e9": "%DURATION%ms",
    }
)

# The lines the per-record renderer this replaced wrote for these records (captured from it,
# byte for byte): a value the record lacks is "-", as in Envoy.
EXPECTED = {
    ("http", "default"): (
        '{"start_time":"2026-12-06T09:00:00.123Z","duration_ms":3.25,"protocol":"HTTP/1.1",'
        '"method":"GET","authority":"api","path":"/x?q=\\u00e9\\"","response_code":200,'
        '"response_flags":"-","bytes_received":0,"bytes_sent":2,"upstream_host":"127.0.0.1:8080",'
        '"upstream_cluster":"api","reporter":"destination",'
        '"peer":"spiffe://t.consul/ns/default/dc/dc1/svc/web","intention":"allow",'
        '"rule":"web => api permission 1","request_id":"r-1","trace_id":""}\n'
    ),
    ("http", "text"): (
        '[2026-12-06T09:00:00.123Z] "GET /x?q=\u00e9" HTTP/1.1" 200 - 0 2 3.25 "curl/8" "r-1" '
        '"api" "127.0.0.1:8080" api spiffe://t.consul/ns/default/dc/dc1/svc/web - a\tb - '
        "100%% %NOT AN OPERATOR%\n"
    ),
    ("http", "text without newline"): "HTTP/1.1 api\n",
    ("http", "json"): (
        '{"when":"2026-12-06T09:00:00.123Z","what":"GET /x?q=\\u00e9\\"","ua":"curl/8",'
        '"code":"200","none":"-","lit":"plain \\u00fc","\\u00e9":"3.25ms"}\n'
    ),
    ("listener", "default"): (
        '{"start_time":"2026-12-06T09:00:01.000Z","duration_ms":0,"protocol":"TCP",'
        '"response_flags":"-","bytes_received":0,"bytes_sent":0,"upstream_host":"",'
        '"upstream_cluster":"api","reporter":"destination",'
        '"downstream_remote_address":"127.0.0.1:5555","listener":true,'
        '"listener_refusal":"unknown_ca"}\n'
    ),
    ("listener", "text"): (
        '[2026-12-06T09:00:01.000Z] "- - TCP" - - 0 0 0 "-" "-" "-" "-" api - 127.0.0.1:5555 - - '
        "100%% %NOT AN OPERATOR%\n"
    ),
    ("listener", "text without newline"): "TCP -\n",
    ("listener", "json"): (
        '{"when":"2026-12-06T09:00:01.000Z","what":"- -","ua":"-","code":"-","none":"-",'
        '"lit":"plain \\u00fc","\\u00e9":"0ms"}\n'
    ),
}
FORMATS = {
    "default": {},
    "text": {"text_format": TEXT},
    "text without newline": {"text_format": "%PROTOCOL% %REQ(host)%"},
    "json": {"json_format": JSON_FORMAT},
}


@pytest.mark.parametrize(("kind", "name"), sorted(EXPECTED))
def test_each_format_writes_the_documented_line(kind: str, name: str) -> None:
    record = HTTP if kind == "http" else LISTENER
    assert compile_format(**FORMATS[name]).line(record) == EXPECTED[kind, name]


def test_a_format_names_the_request_headers_it_reads() -> None:
    # Only these are decoded off a request for its record (plus host and traceparent, which
    # every HTTP record reads); `x-request-id` and the pseudo-headers are fields of their own.
    wanted = compile_format(text_format=TEXT).headers
    assert wanted == {b"host", b"traceparent", b"user-agent", b"x-tenant", b"missing"}
    assert compile_format(json_format=JSON_FORMAT).headers == {
        b"host",
        b"traceparent",
        b"user-agent",
        b"x-none",
    }
    assert compile_format().headers == {b"host", b"traceparent"}


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"text_format": "%BYTES%"}, "unknown access-log operator %BYTES%"),
        ({"text_format": "%REQ()%"}, "%REQ()% needs a header name"),
        ({"json_format": "{"}, "AccessLogs.JSONFormat: not JSON"),
        ({"json_format": '{"a": 1}'}, "expected an object of string values"),
    ],
)
def test_a_bad_format_is_refused_when_set_and_the_old_one_stays(
    kwargs: dict[str, str], error: str
) -> None:
    log = AccessLog(AccessLogSettings(enabled=True, text_format="%PROTOCOL%"))
    with pytest.raises(ValueError, match=error.replace("(", r"\(").replace(")", r"\)")):
        log.settings = AccessLogSettings(enabled=True, **kwargs)  # type: ignore[arg-type]
    assert log.settings.text_format == "%PROTOCOL%"
    log.listener(Telemetry("api", spiffe("api")).inbound("tcp"), "127.0.0.1:1", "closed")
    assert log.drain() == "TCP\n"


def test_a_settings_change_applies_to_the_records_queued_before_it() -> None:
    # As before the compiled formats: a record is formatted when written, with the settings
    # of that moment.
    log = AccessLog(AccessLogSettings(enabled=True))
    side = Telemetry("api", spiffe("api")).inbound("tcp")
    log.listener(side, "127.0.0.1:1", "closed")
    log.settings = AccessLogSettings(
        enabled=True, json_format='{"r": "%DOWNSTREAM_REMOTE_ADDRESS%"}'
    )
    log.listener(side, "127.0.0.1:2", "closed")
    assert log.drain() == '{"r":"127.0.0.1:1"}\n{"r":"127.0.0.1:2"}\n'


_json_scalars = (
    st.text()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.none()
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([*OPERATORS.values(), "listener", "é\n"]) | st.text(), _json_scalars
    )
)
def test_the_default_line_is_the_record_as_json_dumps_writes_it(record: dict[str, Any]) -> None:
    record.pop("_headers", None)
    expected = json.dumps(record, separators=(",", ":")) + "\n"
    assert compile_format().line({**record, "_headers": {":host": "h"}}) == expected


_literal = st.text(alphabet=st.characters(blacklist_characters="%"), max_size=8)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(_literal, st.sampled_from(sorted(OPERATORS))), max_size=6),
    _literal,
    st.dictionaries(st.sampled_from(sorted(OPERATORS.values())), _json_scalars),
    st.text(),
)
def test_a_template_is_its_literals_and_each_operators_value(
    pieces: list[tuple[str, str]], tail: str, record: dict[str, Any], key: str
) -> None:
    template = "".join(f"{literal}%{op}%" for literal, op in pieces) + tail

    def value(op: str) -> str:
        v = record.get(OPERATORS[op])
        return "-" if v is None or v == "" else str(v)

    want = "".join(literal + value(op) for literal, op in pieces) + tail
    line = compile_format(json_format=json.dumps({key: template})).line(record)
    assert json.loads(line) == {key: want}
    text = compile_format(text_format=template or "x").line(record)
    assert text == (want or "x") + ("" if (want or "x").endswith("\n") else "\n")


async def test_a_request_through_the_proxy_is_logged_in_the_text_format(tmp_path: Path) -> None:
    # A real request on a real socket: the outbound proxy has no endpoint and answers 503 UH
    # itself; its line reads the request's own headers, whatever their case on the wire.
    ca = ProxyTestCA(tmp_path)
    client_ctx = ca.client_context(ca.leaf("web"))
    upstream = Upstream(
        name="api",
        endpoints=fixed_endpoints(compile_balancer([], BalancerConfig())),
        client_ssl=lambda: client_ctx,
        verify_peer=PeerCache(ca.verifier()),
        expected_service="api",
        rng=random.Random(1),
    )
    outbound = OutboundHTTP(upstream)
    web = Telemetry("web", spiffe("web"))
    fmt = (
        '%REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% "%REQ(User-Agent)%" '
        "%REQ(X-TENANT)% %REQ(x-none)% %REQ(:AUTHORITY)%"
    )
    log = AccessLog(AccessLogSettings(enabled=True, text_format=fmt))
    web.access_log = log
    outbound.observer = web.http(web.upstream("api", "http"))
    await outbound.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port)
        writer.write(
            b"GET /a?b=1 HTTP/1.1\r\nHost: api\r\nUSER-AGENT: probe/1 (x)\r\nx-Tenant: t1\r\n\r\n"
        )
        head = await reader.readuntil(b"\r\n\r\n")
        writer.close()
    finally:
        await outbound.close(grace=0)
    assert head.startswith(b"HTTP/1.1 503")
    assert log.drain() == 'GET /a?b=1 503 UH "probe/1 (x)" t1 - api\n'


async def test_the_writer_lets_the_loop_run_between_slices_of_a_batch(tmp_path: Path) -> None:
    # Formatting a whole batch in one go held every request ready meanwhile for all of it.
    # Here, with slices of 3, a task running beside the writer sees the queue part-drained;
    # and every line reaches the file, in order.
    path = tmp_path / "access.log"
    log = AccessLog(AccessLogSettings(enabled=True, type="file", path=str(path)))
    log.batch_delay = 0
    log.slice = 3
    side = Telemetry("api", spiffe("api")).inbound("tcp")
    for n in range(10):
        log.listener(side, f"127.0.0.1:{n}", "closed")
    seen: set[int] = set()
    writer = asyncio.get_running_loop().create_task(log.run())
    try:
        for _ in range(10_000):  # bounded: the writer needs a few dozen turns
            seen.add(log.drain_pending())
            if path.exists() and path.read_bytes().count(b"\n") == 10:
                break
            await asyncio.sleep(0)
    finally:
        writer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writer
    assert {7, 4, 1} <= seen
    lines = path.read_text().splitlines()
    assert [json.loads(line)["downstream_remote_address"] for line in lines] == [
        f"127.0.0.1:{n}" for n in range(10)
    ]
    assert (log.written, log.dropped, log.write_failed) == (10, 0, 0)


class _Exchanges:
    """An AccessSink keeping what the access log is handed (connect.observe)."""

    def __init__(self) -> None:
        self.http_seen: list[tuple[Any, ...]] = []

    def http(self, *args: Any) -> None:
        self.http_seen.append(args)

    def tcp(self, *args: Any, **kw: Any) -> None:
        pass


async def test_the_default_line_of_real_requests_is_their_record_as_json(tmp_path: Path) -> None:
    # The default line is written without building the record (http_line): for requests off
    # a real socket, hostile bytes included, it is the record as json.dumps writes it.
    ca = ProxyTestCA(tmp_path)
    client_ctx = ca.client_context(ca.leaf("web"))
    upstream = Upstream(
        name="api",
        endpoints=fixed_endpoints(compile_balancer([], BalancerConfig())),
        client_ssl=lambda: client_ctx,
        verify_peer=PeerCache(ca.verifier()),
        expected_service="api",
        rng=random.Random(1),
    )
    outbound = OutboundHTTP(upstream)
    web = Telemetry("web", spiffe("web"))
    sink = _Exchanges()
    web.access_log = sink  # type: ignore[assignment]
    outbound.observer = web.http(web.upstream("api", "http"))
    heads = [
        b"GET /a HTTP/1.1\r\nhost: api\r\n\r\n",
        b"POST /q?x=%22&y=\\ HTTP/1.1\r\nHost: a\xe9pi\r\ncontent-length: 0\r\n"
        b'x-request-id: "id\\\xff\r\n'
        b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nhost: api\r\nX-Request-Id: \r\n\r\n",
    ]
    await outbound.start()
    try:
        for head in heads:
            reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port)
            writer.write(head)
            await reader.readuntil(b"\r\n\r\n")
            writer.close()
    finally:
        await outbound.close(grace=0)
    assert len(sink.http_seen) == len(heads)
    for side, ex, peer, duration in sink.http_seen:
        record = http_record(side, ex, peer, duration, 1.5e9)
        record.pop("_headers")
        line = http_line(side, ex, peer, duration, 1.5e9)
        assert line == json.dumps(record, separators=(",", ":")) + "\n"
        assert line == compile_format().line(record)


async def test_a_writer_cancelled_between_slices_still_writes_every_line(tmp_path: Path) -> None:
    # Cancelled (the sidecar stopping) while a batch is half formatted: the slices already
    # taken off the queue are written with the rest, not lost.
    path = tmp_path / "access.log"
    log = AccessLog(AccessLogSettings(enabled=True, type="file", path=str(path)))
    log.batch_delay = 0
    log.slice = 3
    side = Telemetry("api", spiffe("api")).inbound("tcp")
    for n in range(10):
        log.listener(side, f"127.0.0.1:{n}", "closed")
    writer = asyncio.get_running_loop().create_task(log.run())
    for _ in range(10_000):  # bounded: the writer takes its first slice within a few turns
        if log.drain_pending() in (7, 4):
            break
        await asyncio.sleep(0)
    assert log.drain_pending() in (7, 4)
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer
    lines = path.read_text().splitlines()
    assert [json.loads(line)["downstream_remote_address"] for line in lines] == [
        f"127.0.0.1:{n}" for n in range(10)
    ]
    assert (log.written, log.write_failed) == (10, 0)
