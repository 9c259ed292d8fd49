"""The demo's applications: small real HTTP services behind the sidecars, on 127.0.0.1.

Each records what it really received, so the demo's steps judge the mesh by what reached the
app, not by what the client was told: who called (the SPIFFE URI in the X-Forwarded-Client-Cert
header the inbound sidecar adds), how many requests, how many answered with a failure.

    web              only a health endpoint: the demo itself plays web's app, calling its
                     upstreams through web's sidecar
    order-service    GET /order places an order: it calls payment-service's POST
                     /process-payment (the order in headers, no body) through its own
                     sidecar, and answers 200 when that did; GET /peek GETs
                     /process-payment instead (which the policy does not allow)
    payment-service  POST (and GET) /process-payment; when `flaky` it answers every third try 503 (a
                     gateway error the mesh's retry policy may retry)
    api v1, api v2   GET / answers its version; counts requests with and without x-canary
"""

from __future__ import annotations

from collections import Counter

import aiohttp
from aiohttp import web

XFCC = "X-Forwarded-Client-Cert"


def caller_uri(xfcc: str) -> str:
    """The URI element of the last X-Forwarded-Client-Cert element: the peer's SPIFFE ID."""
    last = xfcc.rpartition(",")[2]
    for part in last.split(";"):
        key, _, value = part.partition("=")
        if key.strip() == "URI":
            return value.strip().strip('"')
    return ""


def service_of(uri: str) -> str:
    """spiffe://<domain>/ns/<ns>/dc/<dc>/svc/<name> -> name ("" when not a service URI)."""
    return uri.rpartition("/svc/")[2] if "/svc/" in uri else ""


class DemoApp:
    """A real HTTP server on an OS-chosen loopback port."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.callers: Counter[str] = Counter()
        """Requests by the caller's service name, from the XFCC the sidecar added."""
        self.caller_uris: dict[str, str] = {}
        """The full SPIFFE URI last seen per caller service."""
        self._runner: web.AppRunner | None = None

    def routes(self, app: web.Application) -> None:
        """Add the app's own routes."""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def record(self, request: web.Request) -> str:
        uri = caller_uri(request.headers.get(XFCC, ""))
        caller = service_of(uri) or "(no identity)"
        self.callers[caller] += 1
        if uri:
            self.caller_uris[caller] = uri
        return caller

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")


class PaymentService(DemoApp):
    def __init__(self) -> None:
        super().__init__("payment-service")
        self.flaky = False
        self.tries = 0
        """POST /process-payment requests received (each retry is one more)."""
        self.failures = 0
        """Of those, answered 503 on purpose."""
        self.received: Counter[str] = Counter()
        """Requests by "<caller> <method>", e.g. "order-service POST"."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/process-payment", self._pay)
        app.router.add_get("/process-payment", self._look)

    async def _look(self, request: web.Request) -> web.Response:
        self.received[f"{self.record(request)} GET"] += 1
        return web.Response(text="nothing to see")

    async def _pay(self, request: web.Request) -> web.Response:
        caller = self.record(request)
        self.received[f"{caller} POST"] += 1
        self.tries += 1
        if self.flaky and self.tries % 3 == 0:
            self.failures += 1
            return web.Response(status=503, text="payment backend unavailable (flaky on purpose)")
        return web.Response(text=f"paid; caller {caller}")


class OrderService(DemoApp):
    def __init__(self, payment_url: str) -> None:
        super().__init__("order-service")
        self._payment_url = payment_url
        self.payments: Counter[int] = Counter()
        """Status codes of the answers this app got from payment-service (0: no answer)."""
        self._client: aiohttp.ClientSession | None = None
        self.orders = 0
        self.last_payment = 0
        """Status of payment-service's last answer to an order."""

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/order", self._order)
        app.router.add_get("/peek", self._peek)

    async def _peek(self, request: web.Request) -> web.Response:
        """GET payment-service's /process-payment and pass on what came back."""
        self.record(request)
        assert self._client is not None
        try:
            async with self._client.get(self._payment_url) as resp:
                return web.Response(status=resp.status, text=await resp.text())
        except aiohttp.ClientError as err:
            return web.Response(status=502, text=f"no answer: {err}")

    async def start(self) -> None:
        self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        if self._client is not None:
            await self._client.close()

    async def _order(self, request: web.Request) -> web.Response:
        caller = self.record(request)
        assert self._client is not None
        self.orders += 1
        # The order travels in headers, the body stays empty: meshlet's proxy retries only a
        # request it can replay, and it keeps no request body to replay.
        headers = {"x-order-id": str(self.orders), "x-amount": "42.00"}
        try:
            async with self._client.post(self._payment_url, headers=headers) as resp:
                body = (await resp.text()).strip()
                status = resp.status
        except aiohttp.ClientError as err:
            body, status = f"no answer: {err}", 0
        self.payments[status] += 1
        self.last_payment = status
        if status != 200:
            return web.Response(status=502, text=f"order failed: payment said {status} {body}")
        return web.Response(text=f"order placed for {caller}; payment-service: {body}")


class ApiVersion(DemoApp):
    def __init__(self, version: str) -> None:
        super().__init__("api")
        self.version = version
        self.plain = 0
        self.canary = 0
        """Requests that carried x-canary: true."""

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._hello)

    async def _hello(self, request: web.Request) -> web.Response:
        self.record(request)
        if request.headers.get("x-canary") == "true":
            self.canary += 1
        else:
            self.plain += 1
        return web.Response(text=f"api {self.version}")
