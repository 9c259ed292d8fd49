"""Running the agent's health checks: TTL timers, HTTP, TCP, UDP, script and alias checks.

Each interval check is one task that sleeps a random stagger inside its first interval (as
Consul does, so checks registered together do not fire together), then runs every interval.
Results go through the store, which wakes blocking queries only when status or output change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

from devstack.store import CRITICAL, PASSING, WARNING, Check

if TYPE_CHECKING:
    from devstack.server import DevServer

log = logging.getLogger("devstack.checks")

MIN_INTERVAL = 1.0  # Consul's checks.MinInterval
DEFAULT_TIMEOUT = 10.0
SCRIPT_TIMEOUT = 30.0
OUTPUT_MAX = 4096  # Consul's DefaultBufSize for check output
USER_AGENT = "Consul Health Check"
UNSUPPORTED = {
    "grpc": "gRPC",
    "h2ping": "H2PING",
    "docker": "Docker",
    "os_service": "OSService",
}


@dataclass
class _Counters:
    """Consul's SuccessBeforePassing / FailuresBeforeWarning / FailuresBeforeCritical."""

    success_before_passing: int
    failures_before_warning: int
    failures_before_critical: int
    successes: int = 0
    failures: int = 0

    def apply(self, status: str, current: str) -> str:
        if status == PASSING:
            self.failures = 0
            self.successes += 1
            return PASSING if self.successes >= self.success_before_passing else current
        self.successes = 0
        self.failures += 1
        if status == WARNING:
            return WARNING
        if self.failures >= self.failures_before_critical:
            return CRITICAL
        if self.failures >= self.failures_before_warning:
            return WARNING
        return current


@dataclass
class CheckRunner:
    server: DevServer
    _tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _ttl: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    _critical_since: dict[str, float] = field(default_factory=dict)
    _http: aiohttp.ClientSession | None = None

    def start(self, chk: Check) -> None:
        self.stop(chk.check_id)
        spec = chk.runner or {}
        if chk.type == "ttl" and spec.get("TTL"):
            self._arm_ttl(chk.check_id, spec["TTL"] / 1e9)
            return
        if chk.type == "alias":
            self._start_alias(chk)
            return
        probe = self._probe_for(chk)
        if probe is None:
            return
        task = asyncio.get_running_loop().create_task(
            self._interval_loop(chk, probe), name=f"check {chk.check_id}"
        )
        self._tasks[chk.check_id] = task

    def stop(self, check_id: str) -> None:
        task = self._tasks.pop(check_id, None)
        if task is not None:
            task.cancel()
        timer = self._ttl.pop(check_id, None)
        if timer is not None:
            timer.cancel()
        self._critical_since.pop(check_id, None)

    async def close(self) -> None:
        for check_id in list(self._tasks) + list(self._ttl):
            self.stop(check_id)
        if self._http is not None:
            await self._http.close()

    # ---- TTL -----------------------------------------------------------------------------

    def _arm_ttl(self, check_id: str, ttl: float) -> None:
        loop = asyncio.get_running_loop()
        self._ttl[check_id] = loop.call_later(ttl, self._expire_ttl, check_id)

    def ttl_touched(self, chk: Check) -> None:
        """A pass/warn/fail/update resets the TTL timer."""
        timer = self._ttl.pop(chk.check_id, None)
        if timer is not None:
            timer.cancel()
        ttl = (chk.runner or {}).get("TTL", 0)
        if ttl:
            self._arm_ttl(chk.check_id, ttl / 1e9)

    def _expire_ttl(self, check_id: str) -> None:
        self._ttl.pop(check_id, None)
        chk = self.server.local_check(check_id)
        if chk is None:
            return
        output = "TTL expired"
        if chk.output:
            output = f"TTL expired (last output before timeout follows): {chk.output}"
        self.report(chk, CRITICAL, output)

    # ---- interval checks ------------------------------------------------------------------

    def _probe_for(self, chk: Check) -> Callable[[], Any] | None:
        spec = chk.runner or {}
        timeout = spec.get("Timeout", 0) / 1e9 or DEFAULT_TIMEOUT
        if chk.type == "http":
            return lambda: self._http_probe(spec, timeout)
        if chk.type == "tcp":
            return lambda: _tcp_probe(spec["TCP"], timeout, bool(spec.get("TCPUseTLS")), spec)
        if chk.type == "udp":
            return lambda: _udp_probe(spec["UDP"], timeout)
        if chk.type == "script":
            args = spec.get("Args") or spec.get("ScriptArgs") or []
            return lambda: _script_probe(args, spec.get("Timeout", 0) / 1e9 or SCRIPT_TIMEOUT)
        return None

    async def _interval_loop(self, chk: Check, probe: Callable[[], Any]) -> None:
        spec = chk.runner or {}
        interval = max(spec.get("Interval", 0) / 1e9, MIN_INTERVAL)
        counters = _Counters(
            spec.get("SuccessBeforePassing", 0),
            spec.get("FailuresBeforeWarning", 0) or spec.get("FailuresBeforeCritical", 0),
            spec.get("FailuresBeforeCritical", 0),
        )
        max_output = spec.get("OutputMaxSize", 0) or OUTPUT_MAX
        await asyncio.sleep(random.uniform(0, interval))
        while True:
            try:
                status, output = await probe()
            except Exception as err:  # a probe must never kill its loop
                status, output = CRITICAL, f"check failed: {err}"
            current = self.server.local_check(chk.check_id)
            if current is None:
                return
            self.report(current, counters.apply(status, current.status), output[:max_output])
            await asyncio.sleep(interval)

    def report(self, chk: Check, status: str, output: str) -> None:
        if status == CRITICAL:
            self._critical_since.setdefault(chk.check_id, time.monotonic())
        else:
            self._critical_since.pop(chk.check_id, None)
        self.server.store.update_check_status(chk.node, chk.check_id, status, output)

    def critical_for(self, check_id: str) -> float:
        since = self._critical_since.get(check_id)
        return 0.0 if since is None else time.monotonic() - since

    async def _http_probe(self, spec: dict[str, Any], timeout: float) -> tuple[str, str]:
        if self._http is None:
            self._http = aiohttp.ClientSession(headers={"User-Agent": USER_AGENT})
        method = spec.get("Method") or "GET"
        url = spec["HTTP"]
        headers = {k: ", ".join(v) for k, v in (spec.get("Header") or {}).items()}
        verify: ssl.SSLContext | bool = True
        if spec.get("TLSSkipVerify"):
            verify = False
        try:
            async with self._http.request(
                method,
                url,
                headers=headers,
                data=spec.get("Body") or None,
                allow_redirects=not spec.get("DisableRedirects"),
                timeout=aiohttp.ClientTimeout(total=timeout),
                ssl=verify,
            ) as resp:
                body = (await resp.content.read(OUTPUT_MAX)).decode(errors="replace")
                result = f"HTTP {method} {url}: {resp.status} {resp.reason} Output: {body}"
                if 200 <= resp.status < 300:
                    return PASSING, result
                if resp.status == 429:
                    return WARNING, result
                return CRITICAL, result
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            return CRITICAL, f"Get {url!r}: {type(err).__name__}: {err}"

    # ---- alias ----------------------------------------------------------------------------

    def _start_alias(self, chk: Check) -> None:
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._alias_loop(chk), name=f"alias {chk.check_id}")
        self._tasks[chk.check_id] = task

    async def _alias_loop(self, chk: Check) -> None:
        spec = chk.runner or {}
        target_service = spec.get("AliasService", "")
        target_node = spec.get("AliasNode") or chk.node
        store = self.server.store
        while True:
            current = store.checks.get((chk.node, chk.check_id))
            if current is None:
                return
            status, output = _alias_status(self.server, target_node, target_service)
            self.report(current, status, output)
            await store.wait_for_change(3600)


def _alias_status(server: DevServer, node: str, service_id: str) -> tuple[str, str]:
    store = server.store
    if service_id and (node, service_id) not in store.services:
        return CRITICAL, f"Service {service_id} could not be found on node {node}"
    checks = [
        c
        for c in store.checks.values()
        if c.node == node and (not service_id or c.service_id == service_id)
    ]
    if not checks:
        return PASSING, "No checks found."
    for status in (CRITICAL, WARNING):
        if any(c.status == status for c in checks):
            return status, f"Aliased check is {status}"
    return PASSING, "All checks passing."


async def _tcp_probe(
    addr: str, timeout: float, use_tls: bool, spec: dict[str, Any]
) -> tuple[str, str]:
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    tls: ssl.SSLContext | None = None
    if use_tls:
        tls = ssl.create_default_context()
        if spec.get("TLSSkipVerify"):
            tls.check_hostname = False
            tls.verify_mode = ssl.CERT_NONE
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, int(port), ssl=tls), timeout
        )
    except (OSError, TimeoutError, ValueError) as err:
        return CRITICAL, f"dial tcp {addr}: {err or 'i/o timeout'}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return PASSING, f"TCP connect {addr}: Success"


async def _udp_probe(addr: str, timeout: float) -> tuple[str, str]:
    host, _, port = addr.rpartition(":")
    loop = asyncio.get_running_loop()
    refused = loop.create_future()

    class _Protocol(asyncio.DatagramProtocol):
        def error_received(self, exc: Exception) -> None:
            if not refused.done():
                refused.set_result(exc)

    try:
        transport, _ = await loop.create_datagram_endpoint(
            _Protocol, remote_addr=(host.strip("[]"), int(port))
        )
    except (OSError, ValueError) as err:
        return CRITICAL, f"dial udp {addr}: {err}"
    try:
        transport.sendto(b"Consul UDP health check")
        # Like Consul: no ICMP error within the timeout counts as success.
        exc = await asyncio.wait_for(asyncio.shield(refused), min(timeout, 1.0))
        return CRITICAL, f"read udp {addr}: {exc}"
    except TimeoutError:
        return PASSING, f"UDP message sent to {addr}: Success"
    finally:
        transport.close()


async def _script_probe(args: list[str], timeout: float) -> tuple[str, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
    except OSError as err:
        return CRITICAL, f"Check failed to start: {err}"
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return CRITICAL, f"Timed out ({timeout}s) running check"
    text = out.decode(errors="replace")
    if proc.returncode == 0:
        return PASSING, text
    if proc.returncode == 1:
        return WARNING, text
    return CRITICAL, text
