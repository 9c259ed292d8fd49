"""Constant-rate (open-loop) HTTP/1.1 load generator: request k is due at k/rate.

    proxy_loadgen.py --port P --rate 2000 --conns 16 --duration 8 --warmup 2

Request k is due at start + k/rate and goes to connection k mod N; if that connection is
still busy the request waits, and the wait counts in its latency (no coordinated omission).
The sender busy-polls with `sleep(0)` because loop timers have millisecond granularity. The
run ends by itself after warmup + duration; samples from the warm-up are dropped. Prints one
JSON object: offered, completed, errors and latency percentiles in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import time
from collections import deque
from collections.abc import Callable
from typing import cast

import uvloop

REQUEST = b"GET / HTTP/1.1\r\nHost: api\r\n\r\n"
SLOW = 0.020
"""Latencies above this are also listed with their due time (when the stalls happen)."""


class _Conn(asyncio.Protocol):
    def __init__(
        self, samples: list[float], measure_from: float, slow: list[tuple[float, float, int]]
    ) -> None:
        self.samples = samples
        self.slow = slow
        self.measure_from = measure_from
        self.waiting: deque[float] = deque()
        self.busy = False
        self.buf = b""
        self.need = -1
        self.transport: asyncio.Transport | None = None
        self.errors = 0
        self.completed = 0
        self.on_idle: Callable[[], object] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast("asyncio.Transport", transport)
        self.transport = transport

    def submit(self, due: float) -> None:
        self.waiting.append(due)
        if not self.busy:
            self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.busy = True
        self.transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.need < 0:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = self.buf[:end].lower()
                pos = head.find(b"content-length:")
                length = 0
                if pos >= 0:
                    eol = head.find(b"\r\n", pos)
                    length = int(head[pos + 15 : eol if eol >= 0 else len(head)])
                if not head.startswith(b"http/1.1 200"):
                    self.errors += 1
                self.need = end + 4 + length
            if len(self.buf) < self.need:
                return
            self.buf = self.buf[self.need :]
            self.need = -1
            due = self.waiting.popleft()
            now = time.perf_counter()
            if due >= self.measure_from:
                self.samples.append(now - due)
                if now - due > SLOW:
                    self.slow.append((due, now - due, id(self)))
            self.completed += 1
            self.busy = False
            if self.waiting:
                self._send()
            elif self.on_idle is not None:
                self.on_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.errors += len(self.waiting)
        self.waiting.clear()


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    idx = min(len(sorted_values) - 1, int(q * len(sorted_values)))
    return sorted_values[idx]


async def run(
    port: int, rate: float, conns: int, duration: float, warmup: float
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    samples: list[float] = []
    slow: list[tuple[float, float, int]] = []
    start = time.perf_counter() + 0.2
    measure_from = start + warmup
    pool: list[_Conn] = []
    for _ in range(conns):
        _, proto = await loop.create_connection(
            lambda: _Conn(samples, measure_from, slow), "127.0.0.1", port
        )
        pool.append(proto)
    gc.disable()
    end = start + warmup + duration
    sent = 0
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        due_count = int((now - start) * rate) if now > start else 0
        while sent < due_count:
            pool[sent % conns].submit(start + sent / rate)
            sent += 1
        await asyncio.sleep(0)
    # Let in-flight requests finish (bounded), then report.
    drained = asyncio.Event()
    for c in pool:
        c.on_idle = lambda: drained.set() if not any(x.waiting for x in pool) else None
    if any(c.waiting for c in pool):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(drained.wait(), 2.0)
    gc.enable()
    for c in pool:
        if c.transport is not None:
            c.transport.close()
    lat = sorted(samples)
    offered = int(duration * rate)
    return {
        "offered": offered,
        "measured": len(lat),
        "completed": sum(c.completed for c in pool),
        "errors": sum(c.errors for c in pool),
        "p50_ms": percentile(lat, 0.50) * 1e3,
        "p90_ms": percentile(lat, 0.90) * 1e3,
        "p99_ms": percentile(lat, 0.99) * 1e3,
        "p999_ms": percentile(lat, 0.999) * 1e3,
        "max_ms": (lat[-1] if lat else float("nan")) * 1e3,
        "over_20ms": len(slow),
        # The stalls' "at" is from this instant (unix time): to match sidecars' lag logs.
        "start_unix": time.time() - (time.perf_counter() - start),
        # The first stalls: due time in s from the start, latency ms, connections involved.
        "stalls": _stalls(slow, start),
    }


def _stalls(slow: list[tuple[float, float, int]], start: float) -> list[list[float]]:
    """Slow samples grouped into episodes (due times under 50 ms apart): [at s, worst ms,
    requests, connections], the first ten."""
    episodes: list[list[float]] = []
    conns: list[set[int]] = []
    last = -1.0
    for due, latency, conn in sorted(slow):
        if episodes and due - last < 0.05:
            ep = episodes[-1]
            ep[1] = max(ep[1], latency * 1e3)
            ep[2] += 1
            conns[-1].add(conn)
            ep[3] = len(conns[-1])
        elif len(episodes) < 10:
            episodes.append([round(due - start, 3), latency * 1e3, 1, 1])
            conns.append({conn})
        else:
            break
        last = due
    return episodes


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rate", type=float, default=2000)
    p.add_argument("--conns", type=int, default=16)
    p.add_argument("--duration", type=float, default=8)
    p.add_argument("--warmup", type=float, default=2)
    a = p.parse_args()
    print(json.dumps(uvloop.run(run(a.port, a.rate, a.conns, a.duration, a.warmup))))
