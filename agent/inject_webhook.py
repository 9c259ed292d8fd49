"""`meshlet inject --webhook`: the mutating admission webhook over HTTPS (aiohttp).

    POST /mutate    AdmissionReview v1 in, AdmissionReview v1 out (agent/inject_admission.py)
    GET  /healthz   200 while the event loop answers (the webhook Deployment's probes)

The certificate and key files are re-read when they change (a Secret updated by cert-manager
or by hand reaches the mounted files within a minute), without dropping the listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
from pathlib import Path

from aiohttp import web

from agent.inject_admission import ReviewError, review
from agent.inject_template import InjectOptions

log = logging.getLogger("meshlet.inject")

# The API server's own limit on a request is 3 MiB; an AdmissionReview carries the object,
# and the old one on UPDATE, plus a little envelope.
MAX_BODY = 7 * 1024 * 1024
TLS_POLL = 30.0


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


class InjectWebhook:
    def __init__(self, options: InjectOptions, cert: Path, key: Path, host: str, port: int) -> None:
        self._options = options
        self._cert, self._key = cert, key
        self._host, self._port = host, port
        self.tls = server_context(cert, key)
        self._stamp = self._files_stamp()
        self._runner: web.AppRunner | None = None
        self._poll: asyncio.Task[None] | None = None
        self.address = ""
        """host:port actually bound."""

    def _files_stamp(self) -> tuple[int, int]:
        return (os.stat(self._cert).st_mtime_ns, os.stat(self._key).st_mtime_ns)

    def reload_tls(self) -> bool:
        """Load the files again when they changed; True when new ones are in use. A broken
        pair (half-written, mismatched) keeps the current one: the next poll retries."""
        try:
            stamp = self._files_stamp()
            if stamp == self._stamp:
                return False
            # Loaded into a scratch context first: a bad pair must not touch the live one.
            server_context(self._cert, self._key)
            self.tls.load_cert_chain(self._cert, self._key)
        except (OSError, ssl.SSLError) as exc:
            log.warning("webhook certificate not reloaded: %s", exc)
            return False
        self._stamp = stamp
        log.info("webhook certificate reloaded from %s", self._cert)
        return True

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/mutate", self._mutate)
        app.router.add_get("/healthz", self._healthz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port, ssl_context=self.tls)
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = runner.addresses[0]
        host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.address = f"{host}:{bound[1]}"
        self._poll = asyncio.create_task(self._watch_tls())

    async def close(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll
            self._poll = None
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _watch_tls(self) -> None:
        while True:
            await asyncio.sleep(TLS_POLL)
            self.reload_tls()

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _mutate(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            answer = review(body, self._options)
        except ReviewError as exc:
            log.warning("admission request refused: %s", exc)
            return web.Response(status=400, text=f"meshlet injection: {exc}\n")
        response = answer["response"]
        if not response["allowed"]:
            log.warning("pod refused: %s", response["status"]["message"])
        return web.Response(
            text=json.dumps(answer, separators=(",", ":")), content_type="application/json"
        )
