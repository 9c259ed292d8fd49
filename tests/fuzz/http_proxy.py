"""The sidecar's HTTP request path as a fuzz target: bytes from a mesh peer in, what reaches
the app behind api's sidecar checked against what the intentions engine authorized.

Real objects only: api's `InboundHTTP` on 127.0.0.1 with mTLS from a test CA
(tests/connect/proxy_test_ca.py), the real intentions engine behind `intentions_authorizers`
(wrapped only to write down each decision), and an app that parses what it receives with
llhttp on a raw socket and records every request head (tests/connect/test_http_attacks.py).
The caller is web: straight to the inbound port with its mesh leaf, or through its own
`OutboundHTTP` upstream listener. Only the documented constructors and `start`/`port`/`close`
of the two listeners are used (plus the seams the connect tests use to build them).

Each exchange checks, after the listeners have closed (so the app has read all it ever will):
* nothing raised inside the event loop, and closing finished (no hang, no stuck task);
* every request the app received was allowed by the engine for that exact method and target,
  and the app received no more of them than were allowed;
* each carries exactly one XFCC element, the inbound sidecar's own.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import ssl
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connect.authz import intentions_authorizers
from connect.balancer import BalancerConfig, Target, compile_balancer
from connect.cluster import fixed_endpoints
from connect.dial import Upstream
from connect.http1 import InboundHTTP, OutboundHTTP
from connect.inbound import InboundGate
from connect.seams import Peer, PeerCache, Verdict
from connect.stats import ProxyStats
from intentions.engine import Identity, Snapshot, compile_snapshot
from intentions.entries import load_entry
from tests.connect.proxy_test_ca import Leaf, ProxyTestCA, spiffe
from tests.connect.test_http_attacks import NaiveApp, Recorder

WAIT = 10.0
"""Bound on every wait: closing, the app seeing its connections close. A hang fails."""
QUIET = 0.2
"""How long the caller reads after its last byte before it hangs up (not asserted on)."""

VIAS = ("direct", "http-upstream")


def _policy() -> Snapshot:
    """web may reach anything but /private*, may not DELETE, and may not send `x-deny`;
    default deny, so a request that loses its way is refused rather than allowed."""
    entry = load_entry(
        {
            "Kind": "service-intentions",
            "Name": "api",
            "Sources": [
                {
                    "Name": "web",
                    "Permissions": [
                        {"Action": "deny", "HTTP": {"PathPrefix": "/private"}},
                        {"Action": "deny", "HTTP": {"Methods": ["DELETE"]}},
                        {
                            "Action": "deny",
                            "HTTP": {"Header": [{"Name": "x-deny", "Present": True}]},
                        },
                        {"Action": "allow", "HTTP": {"PathPrefix": "/"}},
                    ],
                }
            ],
        }
    )
    return compile_snapshot([entry], default_allow=False)


POLICY = _policy()


"""The Host the inbound gives an HTTP/1.0 request that has none: the service it serves."""


@dataclass(frozen=True)
class Received:
    method: bytes
    target: bytes
    hosts: list[bytes]
    xfccs: list[bytes]

    @property
    def key(self) -> tuple[bytes, bytes]:
        return (self.method, self.target)


@dataclass(frozen=True)
class Decision:
    method: bytes
    target: bytes
    host: bytes
    allowed: bool


@dataclass
class Outcome:
    """What one exchange produced: for the checks, and for a readable failure."""

    sent: bytes
    via: str
    answer: bytes
    decisions: list[Decision]
    received: list[Received]
    errors: list[str] = field(default_factory=list)

    def problems(self, xfcc: bytes) -> list[str]:
        found = list(self.errors)
        allowed = Counter((d.method, d.target, d.host) for d in self.decisions if d.allowed)
        got: Counter[tuple[bytes, bytes, bytes]] = Counter()
        for r in self.received:
            host = r.hosts[0] if len(r.hosts) == 1 else b"<%d Host fields>" % len(r.hosts)
            got[(*r.key, host)] += 1
        for key, count in got.items():
            if count > allowed[key]:
                found.append(
                    f"the app received {key[0]!r} {key[1]!r} with Host {key[2]!r} {count} "
                    f"time(s), the engine allowed it {allowed[key]} time(s)"
                )
        for r in self.received:
            if r.xfccs != [xfcc]:
                found.append(f"{r.key!r} reached the app with XFCC {r.xfccs!r}")
        return found

    def describe(self) -> str:
        return (
            f"via {self.via}, sent {self.sent!r}\n answer {self.answer[:600]!r}\n"
            f" decisions {self.decisions}\n app received {self.received}"
        )


class HTTPProxyHarness:
    """The CA, the app and the loop, made once; a fresh pair of listeners per exchange."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="meshlet-fuzz-")
        self.ca = ProxyTestCA(Path(self._dir.name))
        self.api: Leaf = self.ca.leaf("api")
        self.web: Leaf = self.ca.leaf("web")
        self.client_ctx: ssl.SSLContext = self.ca.client_context(self.web)
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[str] = []
        self.loop.set_exception_handler(self._loop_error)
        self.rec = Recorder()
        self.app = self.loop.run_until_complete(self._start_app())
        digest = hashlib.sha256(self.web.der).hexdigest()
        self.xfcc = f"By={spiffe('api')};Hash={digest};URI={spiffe('web')}".encode()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        self.loop_errors.append(f"{context.get('message')}: {exc!r}")

    async def _start_app(self) -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(
            lambda: NaiveApp(self.rec), "127.0.0.1", 0
        )

    def close(self) -> None:
        self.app.close()
        self.loop.run_until_complete(self.app.wait_closed())
        self.loop.close()
        self._dir.cleanup()

    def exchange(self, via: str, chunks: Sequence[bytes]) -> Outcome:
        return self.loop.run_until_complete(self._exchange(via, chunks))

    async def _exchange(self, via: str, chunks: Sequence[bytes]) -> Outcome:
        self.rec.requests.clear()
        self.loop_errors.clear()
        decisions: list[Decision] = []
        _, authorize = intentions_authorizers(lambda: POLICY, Identity("api"))

        def recording(
            peer: Peer,
            method: bytes,
            target: bytes,
            host: bytes,
            headers: Sequence[tuple[bytes, bytes]],
        ) -> Verdict:
            verdict = authorize(peer, method, target, host, headers)
            decisions.append(Decision(method, target, host, verdict.allowed))
            return verdict

        gate = InboundGate(
            self.ca.server_context(self.api), PeerCache(self.ca.verifier()), ProxyStats()
        )
        app_port = self.app.sockets[0].getsockname()[1]
        inbound = InboundHTTP(
            gate, "127.0.0.1", app_port, authorize=recording, local_uri=spiffe("api")
        )
        await inbound.start()
        outbound: OutboundHTTP | None = None
        errors: list[str] = []
        answer = b""
        try:
            if via == "direct":
                port, ctx = inbound.port, self.client_ctx
            else:
                target = Target("n0/api-sidecar", "127.0.0.1", inbound.port)
                outbound = OutboundHTTP(
                    Upstream(
                        name="api",
                        endpoints=fixed_endpoints(compile_balancer([target], BalancerConfig())),
                        client_ssl=lambda: self.client_ctx,
                        verify_peer=PeerCache(self.ca.verifier()),
                        expected_service="api",
                        rng=random.Random(7),
                    )
                )
                await outbound.start()
                port, ctx = outbound.port, None
            answer = await self._talk(port, ctx, chunks)
        finally:
            for listener in (outbound, inbound):
                if listener is None:
                    continue
                try:
                    await asyncio.wait_for(listener.close(grace=0), WAIT)
                except TimeoutError:
                    errors.append(f"{type(listener).__name__}.close did not finish in {WAIT}s")
        # The listeners are closed: every connection to the app must close too (nothing
        # leaked), and then the app has read everything it will ever get.
        if self.rec.open:
            try:
                await asyncio.wait_for(self.rec.all_closed.wait(), WAIT)
            except TimeoutError:
                errors.append(f"{self.rec.open} app connection(s) still open {WAIT}s after close")
        await asyncio.sleep(0)
        errors.extend(self.loop_errors)
        received = [
            Received(r.method, r.target, r.values(b"host"), r.values(b"x-forwarded-client-cert"))
            for r in self.rec.requests
        ]
        return Outcome(b"".join(chunks), via, answer, decisions, received, errors)

    async def _talk(self, port: int, ctx: ssl.SSLContext | None, chunks: Sequence[bytes]) -> bytes:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="" if ctx else None
        )
        answer = bytearray()
        try:
            for chunk in chunks:
                writer.write(chunk)
                await writer.drain()
            # Read what comes back until the sidecar closes or goes quiet.
            while True:
                try:
                    data = await asyncio.wait_for(reader.read(65536), QUIET)
                except TimeoutError:
                    break
                if not data:
                    break
                answer += data
        except (ConnectionError, ssl.SSLError):
            pass  # the sidecar may hang up mid-write on a request it refuses
        finally:
            writer.close()
        return bytes(answer)


_HARNESS: HTTPProxyHarness | None = None


def harness() -> HTTPProxyHarness:
    global _HARNESS  # noqa: PLW0603 - one TLS setup per fuzzing process, not per input
    if _HARNESS is None:
        _HARNESS = HTTPProxyHarness()
    return _HARNESS


def check(outcome: Outcome, h: HTTPProxyHarness) -> None:
    problems = outcome.problems(h.xfcc)
    assert not problems, "\n".join(problems) + "\n" + outcome.describe()


def http_target(data: bytes) -> None:
    """atheris: the first byte picks the way in and where the stream is cut into writes."""
    if not data:
        return
    h = harness()
    via = VIAS[data[0] & 1]
    stream = data[1:]
    cut = (data[0] >> 1) * 7
    chunks = [stream[:cut], stream[cut:]] if 0 < cut < len(stream) else [stream]
    check(h.exchange(via, [c for c in chunks if c]), h)
