"""Access logs: one line per HTTP request or relayed TCP connection, configured as Consul
configures Envoy's (the proxy-defaults entry's `AccessLogs` block: Enabled, Type
file/stdout/stderr, Path, JSONFormat/TextFormat, DisableListenerLogs).

The proxy never waits for the log: `AccessLog.http`/`tcp` (connect.observe.AccessSink) put the
finished exchange on a bounded queue (a full queue drops it and counts the drop), and a writer
task formats what has queued up (in slices, letting the event loop run between them) and
writes it from a worker thread. A write that fails (disk full, a file made read-only) loses
its lines, counted in `write_failed`; the failure is logged once when it starts and once when
writing works again, never per line, and each batch tries afresh, so logging resumes as soon
as there is space. A line is JSON by default:

    {"start_time": "2026-12-06T09:00:00.123Z", "duration_ms": 3, "protocol": "HTTP/1.1",
     "method": "GET", "authority": "api", "path": "/x", "response_code": 200,
     "response_flags": "-", "bytes_received": 0, "bytes_sent": 2, "upstream_host": "api",
     "upstream_cluster": "api", "reporter": "destination", "peer": "spiffe://.../svc/web",
     "intention": "allow", "rule": "web => api (allow)", "request_id": "...",
     "trace_id": "..."}

`JSONFormat` (a JSON object whose string values are Envoy command operators) and `TextFormat`
(a string of them) choose fields and names; the operators known here are listed in
`OPERATORS` and `%REQ(name)%` reads a request header (`:method`, `:authority`, `:path` too).
An unknown operator is refused when the settings are read, naming it; a format is compiled
once per settings change (connect.access_format), not read per record.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Any, Literal

from connect.access_format import (
    HEADERS_KEY,
    OPERATORS,
    RECORD_HEADERS,
    LineFormat,
    compile_format,
    json_value,
)
from connect.http1_headers import REQUEST_ID
from connect.observe import Side, verdict_rule

if TYPE_CHECKING:
    from connect.http1.exchange import Exchange
    from connect.seams import Peer

log = logging.getLogger("meshlet.access")

__all__ = [
    "OPERATORS",
    "AccessLog",
    "AccessLogSettings",
    "effective_settings",
    "parse_access_logs",
]

LogType = Literal["file", "stdout", "stderr"]


@dataclass(frozen=True, slots=True)
class AccessLogSettings:
    enabled: bool = False
    type: LogType = "stdout"
    path: str = ""
    json_format: str = ""
    text_format: str = ""
    disable_listener_logs: bool = False
    """Consul's: no logs for connections the listener rejects before any filter chain (in
    Envoy: no matching filter chain, a failed TLS handshake). meshlet's inbound gate refuses
    such connections itself (connect.inbound: failed handshakes, a peer that is not a service
    of the trust domain, a connection intention's deny) and logs each one as a listener log
    (`"listener": true`, the reason in `listener_refusal`) unless this is set."""


_KEYS = {
    "Enabled": "enabled",
    "Type": "type",
    "Path": "path",
    "JSONFormat": "json_format",
    "TextFormat": "text_format",
    "DisableListenerLogs": "disable_listener_logs",
}


def parse_access_logs(raw: Mapping[str, Any]) -> AccessLogSettings:
    """The `AccessLogs` block (Consul's field names, or the snake_case ones of agent.yaml).
    Raises ValueError naming what is wrong."""
    values: dict[str, Any] = {}
    names = {**_KEYS, **{v: v for v in _KEYS.values()}}
    for key, value in raw.items():
        name = names.get(key)
        if name is None:
            raise ValueError(f"AccessLogs: unknown field {key!r}")
        if name in ("enabled", "disable_listener_logs"):
            if not isinstance(value, bool):
                raise ValueError(f"AccessLogs.{key}: expected true or false, got {value!r}")
        elif not isinstance(value, str):
            raise ValueError(f"AccessLogs.{key}: expected a string, got {value!r}")
        values[name] = value
    kind = values.get("type") or "stdout"
    if kind not in ("file", "stdout", "stderr"):
        raise ValueError(f"AccessLogs.Type: expected file, stdout or stderr, got {kind!r}")
    values["type"] = kind
    if kind == "file" and not values.get("path"):
        raise ValueError("AccessLogs.Path: required when Type is file")
    if values.get("json_format") and values.get("text_format"):
        raise ValueError("AccessLogs: JSONFormat and TextFormat cannot both be set")
    compile_format(values.get("json_format", ""), values.get("text_format", ""))
    return AccessLogSettings(**values)


@functools.lru_cache(maxsize=4)
def _second(s: int) -> str:
    # A batch's records mostly share their second: format it once, not per record.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s))


def _iso(t: float) -> str:
    ms = int(t * 1000) % 1000
    return _second(math.floor(t)) + f".{ms:03d}Z"


def _head_fields(ex: Exchange, wanted: frozenset[bytes]) -> dict[str, str]:
    """Method, target and the headers a record needs: `wanted` (lower-case names, what the
    line format reads) as `:name`. The target and the request id are read from the head as
    it was sent on (normalized; the id added when the client sent none); the rest from the
    client's fields as parsed."""
    head = ex.head
    line_end = head.find(b"\r\n")
    first = head[:line_end]
    target = first[len(ex.method) + 1 : first.rfind(b" ")]
    out = {"method": ex.method.decode("latin-1"), "path": target.decode("latin-1")}
    for name, value in ex.headers:
        key = name.lower()
        if key in wanted:
            out[":" + key.decode("latin-1")] = value.decode("latin-1")
    out["authority"] = out.get(":host", "")
    at = head.find(b"\r\n" + REQUEST_ID + b":")
    if at >= 0:
        start = at + len(REQUEST_ID) + 3
        out["request_id"] = head[start : head.find(b"\r\n", start)].strip().decode("latin-1")
    # The traceparent sent on: the sidecar's own when tracing is on (it starts the trace when
    # the client brought none), else the client's as it came.
    at = head.find(b"\r\ntraceparent:")
    sent = head[at + 14 : head.find(b"\r\n", at + 14)] if at >= 0 else b""
    parts = (sent.strip().decode("latin-1") or out.get(":traceparent", "")).split("-")
    if len(parts) == 4:
        out["trace_id"] = parts[1]
    return out


def _peer(side: Side, peer: Peer | None) -> str:
    """The caller's SPIFFE URI inbound (`plaintext` for a caller without TLS, MutualTLSMode
    permissive); the upstream's outbound."""
    if peer is None:
        return side.remote_principal
    return "plaintext" if peer.plaintext else peer.uri


HTTP_FIELDS = (
    "start_time",
    "duration_ms",
    "protocol",
    "method",
    "authority",
    "path",
    "response_code",
    "response_flags",
    "bytes_received",
    "bytes_sent",
    "upstream_host",
    "upstream_cluster",
    "reporter",
    "peer",
    "intention",
    "rule",
    "request_id",
    "trace_id",
)
"""An HTTP record's fields, in the order its line has them."""
_HTTPValues = tuple[
    str, float, str, str, str, str, int, str, int, int, str, str, str, str, str, str, str, str
]
_HTTP_LINE = "{" + ",".join(encode_basestring_ascii(k) + ":%s" for k in HTTP_FIELDS) + "}\n"
"""The default line of an HTTP record, each field's JSON value to fill in."""


def _http_values(
    side: Side,
    ex: Exchange,
    peer: Peer | None,
    duration: float,
    now: float,
    *,
    wanted: frozenset[bytes],
) -> tuple[_HTTPValues, dict[str, str]]:
    """The values of HTTP_FIELDS, and the request headers `wanted` as `:name`."""
    head = _head_fields(ex, wanted)
    verdict = ex.verdict
    values = (
        _iso(now - duration),
        round(duration * 1000.0, 3),
        "HTTP/1.1",
        head.get("method", ""),
        head.get("authority", ""),
        head.get("path", ""),
        ex.status,
        ex.flags,
        ex.rx,
        ex.tx,
        ex.upstream,
        ex.cluster or side.remote_service or side.local_service,
        side.reporter,
        _peer(side, peer),
        ("deny" if ex.denied else "allow") if verdict is not None else "",
        verdict_rule(verdict) if verdict is not None else "",
        head.get("request_id", ""),
        head.get("trace_id", ""),
    )
    return values, head


def http_record(
    side: Side,
    ex: Exchange,
    peer: Peer | None,
    duration: float,
    now: float,
    *,
    wanted: frozenset[bytes] = RECORD_HEADERS,
) -> dict[str, Any]:
    values, head = _http_values(side, ex, peer, duration, now, wanted=wanted)
    record: dict[str, Any] = dict(zip(HTTP_FIELDS, values, strict=True))
    record[HEADERS_KEY] = head
    return record


def http_line(side: Side, ex: Exchange, peer: Peer | None, duration: float, now: float) -> str:
    """The default line (no format set) of `http_record`: what `LineFormat().line` writes for
    it, without building the record (the line of nearly every request)."""
    (
        (
            start,
            ms,
            protocol,
            method,
            authority,
            path,
            status,
            flags,
            rx,
            tx,
            host,
            cluster,
            reporter,
            uri,
            intention,
            rule,
            request_id,
            trace_id,
        ),
        _,
    ) = _http_values(side, ex, peer, duration, now, wanted=RECORD_HEADERS)
    esc, number = encode_basestring_ascii, json_value
    return _HTTP_LINE % (
        esc(start),
        number(ms),
        esc(protocol),
        esc(method),
        esc(authority),
        esc(path),
        number(status),
        esc(flags),
        number(rx),
        number(tx),
        esc(host),
        esc(cluster),
        esc(reporter),
        esc(uri),
        esc(intention),
        esc(rule),
        esc(request_id),
        esc(trace_id),
    )


def tcp_record(
    side: Side,
    peer: Peer | None,
    *,
    received: int,
    sent: int,
    flags: str,
    start: float,
    upstream: str,
    now: float,
) -> dict[str, Any]:
    return {
        "start_time": _iso(start),
        "duration_ms": round((now - start) * 1000.0, 3),
        "protocol": "TCP",
        "response_flags": flags,
        "bytes_received": received,
        "bytes_sent": sent,
        "upstream_host": upstream,
        "upstream_cluster": side.remote_service or side.local_service,
        "reporter": side.reporter,
        "peer": _peer(side, peer),
        # An inbound connection was relayed, so its intention allowed it (refusals end at
        # the handshake: meshlet_tls_handshake_failures_total{reason="denied"}).
        "intention": "allow" if side.reporter == "destination" else "",
    }


def listener_record(side: Side, address: str, reason: str, now: float) -> dict[str, Any]:
    """A connection refused before it carried anything: no bytes, no upstream."""
    return {
        "start_time": _iso(now),
        "duration_ms": 0,
        "protocol": "TCP",
        "response_flags": "-",
        "bytes_received": 0,
        "bytes_sent": 0,
        "upstream_host": "",
        "upstream_cluster": side.local_service,
        "reporter": side.reporter,
        "downstream_remote_address": address,
        "listener": True,
        "listener_refusal": reason,
    }


class AccessLog:
    """An `AccessSink`: queues records, a writer task writes them (`run`). `settings` can be
    replaced at any time (a proxy-defaults change); `denials_only`: log nothing but denied
    requests (what happens while access logs are off: a denial is always logged)."""

    def __init__(
        self,
        settings: AccessLogSettings,
        *,
        limit: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._format = compile_format(settings.json_format, settings.text_format)
        self.limit = limit
        self.dropped = 0
        """Records dropped because the queue was full (the writer fell behind)."""
        self.written = 0
        """Lines formatted and handed to the writer (`write_failed` of them did not make it)."""
        self.write_failed = 0
        """Lines lost because writing them failed."""
        self._queue: deque[Any] = deque()
        self._wake = asyncio.Event()
        self._clock = clock
        self._fd: int | None = None
        self._fd_path = ""
        self._partial = False
        """The last failed write ended inside a line (the file holds its first bytes)."""
        self._failing = ""
        """The error of the failure under way ("" while writes succeed)."""
        self._failed_before = 0
        self.batch_delay = 0.05
        """How long the writer lets records gather before formatting and writing them."""
        self.slice = 64
        """How many records the writer formats before it lets the event loop run again: a
        batch's formatting would otherwise hold every request that is ready meanwhile."""

    @property
    def settings(self) -> AccessLogSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: AccessLogSettings) -> None:
        # The line format is compiled here, once per change, not per record. A format this
        # log cannot write raises (ValueError) and leaves the settings as they were.
        line_format = compile_format(settings.json_format, settings.text_format)
        self._settings, self._format = settings, line_format

    @property
    def denials_only(self) -> bool:
        return not self.settings.enabled

    def _put(self, item: Any) -> None:
        if len(self._queue) >= self.limit:
            self.dropped += 1
            return
        self._queue.append(item)
        self._wake.set()

    def http(self, side: Side, ex: Exchange, peer: Peer | None, duration: float) -> None:
        if self.denials_only and not ex.denied:
            return
        self._put(("http", side, ex, peer, duration, self._clock()))

    def tcp(
        self,
        side: Side,
        peer: Peer | None,
        *,
        received: int,
        sent: int,
        flags: str,
        start: float,
        upstream: str,
    ) -> None:
        if self.denials_only:
            return
        self._put(("tcp", side, peer, received, sent, flags, start, upstream, self._clock()))

    def listener(self, side: Side, address: str, reason: str) -> None:
        s = self.settings
        if not s.enabled or s.disable_listener_logs:
            return
        self._put(("listener", side, address, reason, self._clock()))

    def drain_pending(self) -> int:
        """Records queued and not yet written."""
        return len(self._queue)

    def drain(self, limit: int | None = None) -> str:
        """Format the queued records, at most `limit` of them (the writer's step; also for
        tests)."""
        lines = []
        queue = self._queue
        line_format: LineFormat = self._format
        wanted = line_format.headers
        plain = line_format.plain
        n = len(queue) if limit is None else min(limit, len(queue))
        for _ in range(n):
            item = queue.popleft()
            if item[0] == "http":
                _, side, ex, peer, duration, now = item
                if plain:
                    lines.append(http_line(side, ex, peer, duration, now))
                    continue
                record = http_record(side, ex, peer, duration, now, wanted=wanted)
            elif item[0] == "listener":
                _, side, address, reason, now = item
                record = listener_record(side, address, reason, now)
            else:
                _, side, peer, received, sent, flags, start, upstream, now = item
                record = tcp_record(
                    side,
                    peer,
                    received=received,
                    sent=sent,
                    flags=flags,
                    start=start,
                    upstream=upstream,
                    now=now,
                )
            lines.append(line_format.line(record))
        self.written += len(lines)
        return "".join(lines)

    def _where(self) -> str:
        s = self.settings
        if s.enabled and s.type == "file":
            return s.path
        return "stdout" if s.enabled and s.type == "stdout" else "stderr"

    def _file(self, path: str) -> int:
        if self._fd is None or self._fd_path != path:
            self._close_file()
            # Unbuffered, appending: each batch is one write(2), and after a failed one we
            # know how much of it the file holds (a buffered file would keep the rest and
            # write it later, or not, out of our count).
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            self._fd, self._fd_path, self._partial = os.open(path, flags, 0o644), path, False
        return self._fd

    def _close_file(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _write(self, text: str) -> tuple[int, OSError | None]:
        """Write whole lines (from a worker thread); returns how many of them did not reach
        the target, and the error that stopped them (None when all did)."""
        s = self.settings
        if not (s.enabled and s.type == "file"):
            stream = sys.stdout if s.enabled and s.type == "stdout" else sys.stderr
            try:
                stream.write(text)
                stream.flush()
            except OSError as exc:
                return text.count("\n"), exc
            return 0, None
        data = text.encode("utf-8")
        skip = 0
        if self._partial:
            # The last failure cut a line short: end it, so that every line from here parses.
            data, skip = b"\n" + data, 1
        done = 0
        try:
            fd = self._file(s.path)
            view = memoryview(data)
            while done < len(data):
                done += os.write(fd, view[done:])
        except OSError as exc:
            if done:
                self._partial = data[done - 1] != 0x0A
            return data.count(b"\n", max(done, skip)), exc
        self._partial = False
        return 0, None

    def _account(self, lost: int, error: OSError | None) -> None:
        """Count what a write lost; log a failure when it starts and when it ends."""
        if error is None:
            if self._failing:
                log.warning(
                    "access log: writing to %s again; %d lines were lost while it failed (%s)",
                    self._where(),
                    self.write_failed - self._failed_before,
                    self._failing,
                )
                self._failing = ""
            return
        if not self._failing:
            self._failing = str(error) or type(error).__name__
            self._failed_before = self.write_failed
            log.error(
                "access log: cannot write to %s: %s; lines are lost (counted in "
                "meshlet_access_log_write_failed) until a write succeeds again, which is logged",
                self._where(),
                self._failing,
            )
        self.write_failed += lost

    async def run(self) -> None:
        """Write what queues up, until cancelled (then once more: nothing queued is lost)."""
        # The batch's slices formatted so far: off the queue and not yet written, so a cancel
        # between two slices writes them in `finally` with the rest.
        formatted: list[str] = []
        try:
            while True:
                await self._wake.wait()
                # Gather a batch: one hand-off to the writer thread per batch, not per line
                # (each hand-off costs the event loop a GIL switch).
                await asyncio.sleep(self.batch_delay)
                self._wake.clear()
                # This batch, in slices with the loop running between them; what queues up
                # meanwhile waits for the next batch (the queue's bound still holds).
                for _ in range(0, len(self._queue), self.slice):
                    formatted.append(self.drain(self.slice))
                    await asyncio.sleep(0)
                text = "".join(formatted)
                formatted.clear()
                if text:
                    self._account(*await asyncio.to_thread(self._write, text))
        finally:
            text = "".join(formatted) + self.drain()
            if text:
                self._account(*self._write(text))
            self._close_file()


def effective_settings(
    consul: Mapping[str, Any] | None, overrides: Mapping[str, Any]
) -> AccessLogSettings:
    """The proxy-defaults entry's AccessLogs block (Consul's names; None: no entry) with the
    agent.yaml overrides (snake_case names) on top. Raises ValueError naming what is wrong."""
    merged: dict[str, Any] = {}
    for key, value in (consul or {}).items():
        merged[_KEYS.get(key, key)] = value
    merged.update(overrides)
    return parse_access_logs(merged)
