"""The demo's steps. Each sends real traffic, shows it, and judges it by what really happened.

Every step returns a `Verdict`. The success criteria are measured at the apps behind the
sidecars (what they received and answered) and from the sidecars' own state, never taken from
the client's view alone:

    mtls            the identity each app received (XFCC) is its caller's SPIFFE ID; a caller
                    without a certificate gets no HTTP answer and the app sees nothing
    authorization   after the AuthorizationPolicy is applied, web's direct calls to
                    payment-service are answered 403 and never reach it, while order-service's
                    POST /process-payment does
    canary          (routing) x-canary: true always reaches api v2; the other requests split
                    90/10, counted at the v1 and v2 apps
    retry           (routing) payment-service fails every third try on purpose; order-service
                    still gets every payment through, and the app's failures were each retried
    metrics         (metrics) request rate and p99 per destination from the sidecars' /metrics:
                    the counts equal the requests sent, the p99 is one the requests could have
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp

from agent.demo import capabilities
from agent.demo.apps import ApiVersion, OrderService, PaymentService, service_of
from agent.demo.load import Answer, Load, call
from agent.demo.mesh import Sidecar, status
from agent.demo.output import Outcome, Output, Verdict
from agent.demo.scrape import Scrape, ScrapeError, bound_at_or_above, increase, parse, quantile
from agent.demo.table import Table, millis, percent

SETTLE = 10.0
"""How long a sidecar may take to act on config written to Consul (watches are blocking
queries: normally well under a second)."""

CANARY_SHARE = 0.10
DENIED = "RBAC: access denied"


@dataclass
class Scene:
    """The running mesh a step works on."""

    http: aiohttp.ClientSession
    out: Output
    web: Sidecar
    order: Sidecar
    payment: Sidecar
    api_v1: Sidecar
    api_v2: Sidecar
    intentions_index: int
    """ModifyIndex of payment-service's intentions as the AuthorizationPolicy wrote them."""
    trust_domain: str
    """Consul's Connect CA trust domain: every leaf's SPIFFE ID is in it."""

    @property
    def order_app(self) -> OrderService:
        assert isinstance(self.order.app, OrderService)
        return self.order.app

    @property
    def payment_app(self) -> PaymentService:
        assert isinstance(self.payment.app, PaymentService)
        return self.payment.app

    @property
    def versions(self) -> tuple[ApiVersion, ApiVersion]:
        v1, v2 = self.api_v1.app, self.api_v2.app
        assert isinstance(v1, ApiVersion) and isinstance(v2, ApiVersion)
        return v1, v2

    def url(self, upstream: str, path: str) -> str:
        """web's app calls `upstream` at web's sidecar's local port for it (plaintext)."""
        return self.web.upstream(upstream).url + path


Step = Callable[[Scene], Awaitable[Verdict]]


def _fail(step: str, problems: list[str]) -> Verdict | None:
    return Verdict(step, Outcome.FAIL, "; ".join(problems)) if problems else None


def _done(scene: Scene, verdict: Verdict) -> Verdict:
    scene.out.verdict(verdict)
    return verdict


def _skip(scene: Scene, step: str, why: str) -> Verdict:
    return _done(scene, Verdict(step, Outcome.SKIP, f"not available in this build: {why}"))


# ---- 1. mTLS identities ---------------------------------------------------------------------


async def _plaintext(port: int) -> bytes:
    """A request without TLS straight to a sidecar's public port: what comes back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /process-payment HTTP/1.1\r\nHost: payment\r\nContent-Length: 0\r\n\r\n"
        )
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(200), 5.0)
        except (TimeoutError, ConnectionError):
            return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def mtls(scene: Scene) -> Verdict:
    out = scene.out
    out.heading(
        "1. mTLS identities: each sidecar proves who it is with a leaf certificate from Consul's "
        "CA; the receiving sidecar verifies it and tells its app who called "
        "(X-Forwarded-Client-Cert)"
    )
    pay, order = scene.payment_app, scene.order_app
    placed = await call(scene.http, "GET", scene.url("order-service", "/order"))
    hello = await call(scene.http, "GET", scene.url("api", "/"))
    answered_by = next((v for v in scene.versions if v.callers["web"]), None)
    before = pay.callers.total()
    raw = await _plaintext(scene.payment.port)
    table = Table((("call", -34), ("answer", 6), ("the called app was told its caller is", -50)))
    out.table(table)
    hops = [
        ("web -> order-service", placed.status, order.caller_uris.get("web", "-"), "web"),
        (
            "order-service -> payment-service",
            order.last_payment,
            pay.caller_uris.get("order-service", "-"),
            "order-service",
        ),
        (
            "web -> api",
            hello.status,
            answered_by.caller_uris.get("web", "-") if answered_by else "-",
            "web",
        ),
    ]
    problems = []
    for label, code, uri, caller in hops:
        out.say(table.row(label, code, uri))
        if code != 200:
            problems.append(f"{label} answered {code}")
        domain = f"spiffe://{scene.trust_domain}/"
        if not uri.startswith(domain) or service_of(uri) != caller:
            problems.append(
                f"{label}: the app was told {uri!r}, not {caller}'s SPIFFE ID in {domain}"
            )
    refused = not raw.startswith(b"HTTP/")
    out.say(
        table.row(
            "no certificate -> payment-service",
            "none" if refused else raw[:12].decode(errors="replace"),
            "(nothing reached the app)"
            if pay.callers.total() == before
            else "the app received it!",
        )
    )
    if not refused:
        problems.append("a plaintext request to payment-service's sidecar got an HTTP answer")
    if pay.callers.total() != before:
        problems.append("a plaintext request reached payment-service's app")
    return _done(
        scene,
        _fail("mtls", problems)
        or Verdict(
            "mtls",
            Outcome.PASS,
            f"every app was told its caller's SPIFFE ID in trust domain {scene.trust_domain}, "
            "verified over mTLS; a caller without a certificate got nothing",
        ),
    )


# ---- 2. authorization -----------------------------------------------------------------------


async def _intentions_loaded(scene: Scene) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE
    while loop.time() < deadline:
        held = (await status(scene.http, scene.payment)).get("proxy") or {}
        if int((held.get("intentions") or {}).get("index") or 0) >= scene.intentions_index:
            return True
        await asyncio.sleep(0.1)
    return False


async def authorization(scene: Scene) -> Verdict:
    out = scene.out
    out.heading(
        "2. authorization: the AuthorizationPolicy, as Consul intentions, lets only "
        "order-service call payment-service, and only POST /process-payment"
    )
    if not await _intentions_loaded(scene):
        return _done(
            scene,
            Verdict(
                "authorization",
                Outcome.FAIL,
                f"payment-service's sidecar did not load the intentions within {SETTLE:.0f}s",
            ),
        )
    pay = scene.payment_app
    received = pay.received.copy()
    denied_bodies: set[str] = set()
    kinds = ("web POST", "order-service POST", "order-service GET")

    async def request(n: int) -> tuple[str, Answer]:
        kind = kinds[n % 3]
        if kind == "web POST":
            answer = await call(
                scene.http, "POST", scene.url("payment-service", "/process-payment")
            )
        elif kind == "order-service POST":
            answer = await call(scene.http, "GET", scene.url("order-service", "/order"))
        else:
            # order-service's app GETs /process-payment: the policy allows it POST only.
            answer = await call(scene.http, "GET", scene.url("order-service", "/peek"))
        if answer.status == 403:
            denied_bodies.add(answer.body)
        await asyncio.sleep(0.1)
        return kind, answer

    load = Load(request, workers=1, limit=1_000, seconds=3.0)
    table = Table(
        (
            ("t", -4),
            ("web POST", 9),
            ("order-service POST", 18),
            ("order-service GET", 17),
            ("what reached payment-service's app", -36),
        )
    )
    out.say("    answers to each kind of call to POST or GET /process-payment:")
    out.table(table)

    def codes(kind: str) -> str:
        tally = load.statuses.get(kind)
        return ", ".join(f"{n}x {code}" for code, n in sorted(tally.items())) if tally else "-"

    def reached() -> dict[str, int]:
        return {kind: pay.received[kind] - received[kind] for kind in kinds}

    async def tick(label: str) -> None:
        got = ", ".join(f"{kind} {n}" for kind, n in reached().items())
        out.say(table.row(label, *(codes(kind) for kind in kinds), got))

    await load.run(tick)
    problems = []
    got = reached()
    for kind in kinds:
        sent = load.count(kind)
        want = 200 if kind == "order-service POST" else 403
        if not sent or load.count(kind, want) != sent:
            problems.append(f"{kind} was answered {codes(kind)}, not all {want}")
        if got[kind] != (sent if want == 200 else 0):
            problems.append(f"payment-service's app received {got[kind]} of {sent} {kind}")
    if any(DENIED not in body for body in denied_bodies):
        problems.append(f"a denial did not say {DENIED!r}: {sorted(denied_bodies)}")
    return _done(
        scene,
        _fail("authorization", problems)
        or Verdict(
            "authorization",
            Outcome.PASS,
            f"{load.count('web POST')} POSTs from web and {load.count('order-service GET')} "
            "GETs from order-service denied with 403 before reaching payment-service; "
            f"{load.count('order-service POST')} POSTs from order-service allowed and received",
        ),
    )


# ---- 3. canary ------------------------------------------------------------------------------


async def _routed(scene: Scene, side: Sidecar, upstream: str) -> bool:
    """Until the sidecar routes `upstream` by the chain the applied entries compile to."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE
    while loop.time() < deadline:
        if await capabilities.routed(scene.http, side, upstream):
            return True
        await asyncio.sleep(0.1)
    return False


def _not_routed(scene: Scene, step: str, side: Sidecar, upstream: str) -> Verdict:
    return _done(
        scene,
        Verdict(
            step,
            Outcome.FAIL,
            f"{side.label}'s sidecar did not route {upstream} by its discovery chain within "
            f"{SETTLE:.0f}s (/v1/status proxy.routing.upstreams.{upstream}.routed)",
        ),
    )


async def _canary_routed(scene: Scene) -> bool:
    """Until the routes applied at the start are in force: x-canary requests reach v2."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE
    in_a_row = 0
    while loop.time() < deadline and in_a_row < 5:
        answer = await call(scene.http, "GET", scene.url("api", "/"), {"x-canary": "true"})
        in_a_row = in_a_row + 1 if answer.body == "api v2" else 0
    return in_a_row >= 5


async def canary(scene: Scene) -> Verdict:
    out = scene.out
    out.heading(
        "3. canary: the VirtualService sends x-canary: true to api v2 and splits the rest "
        "90/10 between v1 and v2 (service-router and service-splitter in Consul)"
    )
    why = await capabilities.routing(scene.http, scene.web)
    if why:
        return _skip(scene, "canary", why)
    if not await _routed(scene, scene.web, "api"):
        return _not_routed(scene, "canary", scene.web, "api")
    if not await _canary_routed(scene):
        return _done(
            scene,
            Verdict(
                "canary",
                Outcome.FAIL,
                f"requests with x-canary: true did not reach v2 within {SETTLE:.0f}s",
            ),
        )
    v1, v2 = scene.versions
    start = {app.version: (app.plain, app.canary) for app in (v1, v2)}

    def got(app: ApiVersion) -> tuple[int, int]:
        plain, tagged = start[app.version]
        return app.plain - plain, app.canary - tagged

    async def request(n: int) -> tuple[str, Answer]:
        if n % 10 == 9:
            headers = {"x-canary": "true"}
            return "x-canary", await call(scene.http, "GET", scene.url("api", "/"), headers)
        return "plain", await call(scene.http, "GET", scene.url("api", "/"))

    # Paced so the split shows building up for a few seconds, not over in a blink.
    load = Load(request, workers=2, limit=2_000, seconds=6.0, pause=0.01)
    table = Table(
        (
            ("t", -4),
            ("sent", 6),
            ("at v1", 6),
            ("at v2", 6),
            ("v2 share", 9),
            ("x-canary at v2", 15),
        )
    )
    out.table(table)

    async def tick(label: str) -> None:
        (p1, c1), (p2, c2) = got(v1), got(v2)
        out.say(table.row(label, load.sent, p1, p2, percent(p2, p1 + p2), f"{c2}/{c1 + c2}"))

    await load.run(tick)
    (p1, c1), (p2, c2) = got(v1), got(v2)
    plain, tagged = p1 + p2, c1 + c2
    problems = []
    for kind in ("plain", "x-canary"):
        if load.count(kind, 200) != load.count(kind):
            problems.append(f"{kind} requests were not all answered 200: {load.statuses[kind]}")
    if plain != load.count("plain") or tagged != load.count("x-canary"):
        problems.append(
            f"the apps received {plain} plain and {tagged} x-canary requests, "
            f"{load.count('plain')} and {load.count('x-canary')} were sent"
        )
    if c1:
        problems.append(f"{c1} of {tagged} x-canary requests reached v1")
    # Four standard deviations of a 10 % binomial share (at least 3 points): a correct 90/10
    # split fails this about once in 30,000 runs.
    tolerance = max(0.03, 4 * math.sqrt(CANARY_SHARE * (1 - CANARY_SHARE) / max(plain, 1)))
    share = p2 / plain if plain else 0.0
    if plain < 100:
        problems.append(f"only {plain} plain requests: too few to judge a split")
    elif abs(share - CANARY_SHARE) > tolerance:
        problems.append(
            f"v2 received {share:.1%} of {plain} plain requests, not 10 % ± {tolerance:.1%}"
        )
    return _done(
        scene,
        _fail("canary", problems)
        or Verdict(
            "canary",
            Outcome.PASS,
            f"v2 received {share:.1%} of {plain} requests (10 % ± {tolerance:.1%}), "
            f"and all {tagged} with x-canary: true",
        ),
    )


# ---- 4. retry -------------------------------------------------------------------------------


async def retry(scene: Scene) -> Verdict:
    out = scene.out
    out.heading(
        "4. retry: payment-service now fails every third try (503); the VirtualService's "
        "retry policy (3 attempts on gateway-error) has order-service's sidecar try again"
    )
    why = await capabilities.routing(scene.http, scene.order)
    if why:
        return _skip(scene, "retry", why)
    if not await _routed(scene, scene.order, "payment-service"):
        return _not_routed(scene, "retry", scene.order, "payment-service")
    pay, order = scene.payment_app, scene.order_app
    tries, failures, answers = pay.tries, pay.failures, order.payments.copy()

    async def request(n: int) -> tuple[str, Answer]:
        return "order", await call(scene.http, "GET", scene.url("order-service", "/order"))

    # One order at a time: a failed try is then always followed by its own retry.
    load = Load(request, workers=1, limit=1_000, seconds=4.0, pause=0.02)
    table = Table(
        (
            ("t", -4),
            ("orders", 7),
            ("payment tries", 14),
            ("503s it sent", 13),
            ("order-service got 200", 22),
            ("got other", 10),
        )
    )
    out.table(table)

    def received() -> tuple[int, int]:
        ok = order.payments[200] - answers[200]
        return ok, order.payments.total() - answers.total() - ok

    async def tick(label: str) -> None:
        ok, other = received()
        out.say(table.row(label, load.sent, pay.tries - tries, pay.failures - failures, ok, other))

    pay.flaky = True
    try:
        await load.run(tick)
    finally:
        pay.flaky = False
    ok, other = received()
    sent_503 = pay.failures - failures
    problems = []
    if not sent_503:
        problems.append("payment-service never failed: nothing to retry")
    if other:
        problems.append(f"{other} of order-service's payments failed despite the retry policy")
    if load.count("order", 200) != load.count("order"):
        problems.append(f"orders were answered {load.statuses.get('order')}, not all 200")
    if pay.tries - tries != ok + sent_503:
        problems.append(
            f"payment-service saw {pay.tries - tries} tries for {ok} payments and "
            f"{sent_503} failures"
        )
    return _done(
        scene,
        _fail("retry", problems)
        or Verdict(
            "retry",
            Outcome.PASS,
            f"payment-service failed {sent_503} of {pay.tries - tries} tries; "
            f"order-service got all {ok} payments through",
        ),
    )


# ---- 5. metrics -----------------------------------------------------------------------------


async def _scrape(http: aiohttp.ClientSession, side: Sidecar) -> Scrape:
    async with http.get(f"http://{side.admin}/metrics") as resp:
        if resp.status != 200:
            raise ScrapeError(f"{side.label}'s /metrics answered {resp.status}")
        return parse(await resp.text(), "source")


async def _settled_scrape(http: aiohttp.ClientSession, side: Sidecar) -> Scrape:
    """The scrape once it stops moving: a sidecar's data plane reports its counters to the
    agent every 0.25 s, so a request just answered may not be in the next scrape yet."""
    before = await _scrape(http, side)
    for _ in range(10):
        await asyncio.sleep(0.6)
        now = await _scrape(http, side)
        if now == before:
            break
        before = now
    return before


def _rate_p99(new: Scrape, old: Scrape, dest: str, seconds: float) -> tuple[str, str]:
    count, buckets = increase(new, old, dest)
    return f"{count / seconds:.0f}/s", millis(quantile(0.99, buckets))


async def metrics(scene: Scene) -> Verdict:
    out = scene.out
    out.heading(
        "5. metrics: the request rate and p99 latency per destination, read from the "
        "sidecars' own /metrics (istio_requests_total, istio_request_duration_milliseconds)"
    )
    for side in (scene.web, scene.order):
        why = await capabilities.metrics(scene.http, side)
        if why:
            return _skip(scene, "metrics", why)
    order = scene.order_app
    payments = order.payments.total()
    try:
        first = {
            side.label: await _settled_scrape(scene.http, side) for side in (scene.web, scene.order)
        }
    except (ScrapeError, aiohttp.ClientError) as err:
        return _done(scene, Verdict("metrics", Outcome.FAIL, f"scrape failed: {err}"))
    last = dict(first)
    loop = asyncio.get_running_loop()
    last_at = loop.time()

    async def request(n: int) -> tuple[str, Answer]:
        if n % 2:
            return "order-service", await call(
                scene.http, "GET", scene.url("order-service", "/order")
            )
        return "api", await call(scene.http, "GET", scene.url("api", "/"))

    load = Load(request, workers=3, limit=10_000, seconds=5.0, pause=0.005)
    table = Table(
        (
            ("t", -4),
            ("web -> order-service", 20),
            ("p99", 9),
            ("web -> api", 10),
            ("p99", 9),
            ("order -> payment", 16),
            ("p99", 9),
        )
    )
    out.table(table)

    async def tick(label: str) -> None:
        nonlocal last_at
        now = {side.label: await _scrape(scene.http, side) for side in (scene.web, scene.order)}
        seconds = max(loop.time() - last_at, 1e-3)
        web, order_side = scene.web.label, scene.order.label
        out.say(
            table.row(
                label,
                *_rate_p99(now[web], last[web], "order-service", seconds),
                *_rate_p99(now[web], last[web], "api", seconds),
                *_rate_p99(now[order_side], last[order_side], "payment-service", seconds),
            )
        )
        last.update(now)
        last_at = loop.time()

    started = loop.time()
    try:
        await load.run(tick)
        # Counters move when a response is complete; the client has read every one by now.
        final = {
            side.label: await _settled_scrape(scene.http, side) for side in (scene.web, scene.order)
        }
    except (ScrapeError, aiohttp.ClientError) as err:
        return _done(scene, Verdict("metrics", Outcome.FAIL, f"scrape failed: {err}"))
    expected = {
        (scene.web.label, "order-service"): (load.count("order-service"), load.slowest),
        (scene.web.label, "api"): (load.count("api"), load.slowest),
        (scene.order.label, "payment-service"): (order.payments.total() - payments, None),
    }
    problems = []
    figures = []
    for (label, dest), (sent, slowest) in expected.items():
        count, buckets = increase(final[label], first[label], dest)
        p99 = quantile(0.99, buckets)
        if count != sent:
            problems.append(
                f"{label}'s sidecar counted {count:.0f} requests to {dest}, {sent} made"
            )
        if p99 is None or p99 <= 0:
            problems.append(f"{label}'s sidecar has no latency histogram for {dest}")
            continue
        if slowest is not None:
            ceiling = bound_at_or_above(slowest[dest] * 1000.0, buckets)
            if p99 > ceiling:
                problems.append(
                    f"p99 to {dest} reads {p99:.1f} ms, yet no request took over "
                    f"{slowest[dest] * 1000.0:.1f} ms"
                )
        figures.append(f"{dest} {count:.0f} requests, p99 {p99:.1f} ms")
    elapsed = loop.time() - started
    return _done(
        scene,
        _fail("metrics", problems)
        or Verdict(
            "metrics",
            Outcome.PASS,
            f"the sidecars counted every request of {elapsed:.1f}s: " + "; ".join(figures),
        ),
    )


STEPS: Mapping[str, Step] = {
    "mtls": mtls,
    "authorization": authorization,
    "canary": canary,
    "retry": retry,
    "metrics": metrics,
}
