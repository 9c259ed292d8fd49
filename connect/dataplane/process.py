"""One data-plane process of `meshlet sidecar --workers N`: listeners fed by the agent.

    python -m connect.dataplane --index K --control-socket /run/meshlet-sidecar/web/dp.sock

It dials the agent's unix socket, says hello, and applies each `Snapshot` the agent pushes
(connect/dataplane/snapshot.py): the listeners follow the spec by diff (connect.sidecar), the
TLS contexts follow the pushed leaf and roots, intentions are compiled here from their
source, and each upstream's balancer and routing follow its pushed endpoints and chain. It
reports readiness and its counters back; it never talks to Consul or Vault.

Losing the agent (its socket closes: killed, restarting, upgraded) changes nothing it
serves: it keeps the last snapshot, says so (a log line, and `agent: "lost"` in its status
file `dataplane-K.json` next to the socket), and dials again with a capped backoff. The
agent that comes back finds it by that status file, adopts it (agent/dataplanes.py) and
pushes a fresh snapshot, applied like a reload: unchanged listeners and their connections
are not touched. With no agent, the leaf cannot be renewed: once it expires the process
closes its listeners and exits (fail closed) instead of serving with a dead certificate.

Signals: SIGTERM/SIGINT drain (a second one stops at once), SIGHUP is ignored (reloads come
from the agent as snapshots).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from connect.access_log import AccessLog
from connect.authz import intentions_authorizers
from connect.balancer import Target
from connect.chain_routes import RoutingSnapshot
from connect.counters import proxy_counters
from connect.dataplane.snapshot import (
    MAX_LINE,
    IntentionsSource,
    PushedMaterial,
    Snapshot,
    decode_message,
    decode_snapshot,
    encode_message,
    endpoints_key,
)
from connect.heap_trim import HeapTrimmer, keep_read_buffers_on_heap, settle_garbage_collector
from connect.latest import Latest, backoff
from connect.observe import Telemetry
from connect.sidecar import Sidecar, UpstreamSpec
from connect.stats import ProxyStats
from connect.tls import DynamicTLS
from intentions.engine import Identity
from intentions.engine import Snapshot as IntentionsSnapshot
from intentions.stored import compile_stored

log = logging.getLogger("meshlet.connect.dataplane")

Endpoints = tuple[Target, ...] | None
EXIT_LEAF_EXPIRED = 3
"""Exit status when the leaf expired with no agent to bring a new one."""
EXIT_NEVER_FED = 4
"""Exit status when no agent came to give a first snapshot."""
NEVER_FED_WAIT = 60.0
REPORT_EVERY = 0.25
"""Seconds between looks at the counters and what it serves (sent to the agent when they
changed): /v1/status is the agent's, and a caller reading it just after a request expects
it counted."""


def status_path(control_socket: Path, index: int) -> Path:
    """Where data plane `index` says how it is (the agent reads it to adopt it)."""
    return control_socket.parent / f"dataplane-{index}.json"


def _targets(value: Endpoints) -> tuple[Target, ...]:
    return value if value is not None else ()


class DataPlane:
    def __init__(
        self,
        index: int,
        control_socket: Path,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.index = index
        self.control_socket = control_socket
        self.status_file = status_path(control_socket, index)
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._born = clock()
        self.snapshot: Snapshot | None = None
        self.tls: DynamicTLS[PushedMaterial] | None = None
        self.proxy: Sidecar[Endpoints] | None = None
        self.stats = ProxyStats()
        self.telemetry: Telemetry | None = None
        self.access_log: AccessLog | None = None
        self.intentions: Latest[IntentionsSnapshot] | None = None
        self._intentions_source: IntentionsSource | None = None
        self.endpoints: dict[tuple[str, str, str, str], Latest[Endpoints]] = {}
        self.routing: dict[str, Latest[RoutingSnapshot | None]] = {}
        self.heap = HeapTrimmer(lambda: self.proxy.listeners() if self.proxy is not None else [])
        self.attached = False
        self.detached = asyncio.Event()
        """Set while an agent that was attached is gone."""
        self.lost_since: float | None = None
        self.losses = 0
        self.refused = 0
        self.last_refusal = ""
        self.bind_error = ""
        self._writer: asyncio.StreamWriter | None = None
        self._stop = asyncio.Event()
        self._now = asyncio.Event()
        self._exit_code = 0
        self._applying = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- what it says about itself -------------------------------------------------------------

    def problems(self) -> list[str]:
        snap, proxy = self.snapshot, self.proxy
        if snap is None or proxy is None:
            return ["no snapshot from the agent yet"]
        reasons = []
        for spec in snap.spec.listeners().values():
            running = proxy.listener(spec)
            if running is None:
                why = f": {self.bind_error}" if self.bind_error else ""
                reasons.append(f"listener {spec.label}: not started{why}")
            elif not running.serving:
                reasons.append(f"listener {spec.label}: not serving")
        reasons += [
            f"no endpoints yet for {key[0]}"
            for key, latest in self.endpoints.items()
            if latest.get() is None
        ]
        if snap.material.leaf.not_after <= self._clock():
            reasons.append("leaf certificate expired")
        return reasons

    def counters(self) -> dict[str, Any]:
        """What a worker reported (connect.counters, as the in-process proxy), summed by the
        agent."""
        return proxy_counters(self.stats, self.proxy, self.telemetry, self.access_log)

    def serving(self) -> dict[str, Any]:
        """What it serves now, for the agent's /v1/status `proxy` section (agent/
        dataplane_status.py merges the data planes'): each listener and its open connections,
        each upstream's endpoints, and the snapshot parts it applied."""
        snap, proxy = self.snapshot, self.proxy
        if snap is None or proxy is None:
            return {}
        pushed = {endpoints_key(e): e.index for e in snap.endpoints}
        upstreams = {}
        for r in proxy.running.values():
            if isinstance(r.spec, UpstreamSpec) and r.endpoints is not None:
                upstreams[r.spec.name] = {
                    "index": pushed.get(endpoints_key(r.spec)),
                    "endpoints": len(r.endpoints.current.targets),
                    "protocol": r.spec.protocol,
                    "bind": r.spec.bind,
                }
        source = self._intentions_source
        return {
            "version": snap.version,
            "listeners": {
                spec.label: proxy.listener(spec) is not None
                for spec in snap.spec.listeners().values()
            },
            "connections": {
                r.spec.label: {
                    "open": r.listener.open_connections,
                    "handshaking": r.listener.pending_handshakes,
                }
                for r in proxy.running.values()
            },
            "upstreams": upstreams,
            "intentions_index": source.index if source is not None else 0,
            "mutual_tls_mode": snap.spec.inbound.mutual_tls_mode if snap.spec.inbound else "",
            "routing": {
                name: {"applied": routing.index, "targets": sorted(routing.routing.targets)}
                for name, latest in self.routing.items()
                if (routing := latest.get()) is not None
            },
            "heap_trims": self.heap.trims,
        }

    def status(self) -> dict[str, Any]:
        snap = self.snapshot
        return {
            "index": self.index,
            "pid": os.getpid(),
            "control_socket": str(self.control_socket),
            "agent": "attached" if self.attached else "lost" if self.losses else "not yet",
            "agent_lost_since": self.lost_since,
            "agent_losses": self.losses,
            "snapshot_version": snap.version if snap is not None else 0,
            "leaf_not_after": snap.material.leaf.not_after if snap is not None else None,
            "refused": self.refused,
            "last_refusal": self.last_refusal,
            "problems": self.problems(),
            "modules": sorted({name.partition(".")[0] for name in list(sys.modules)}),
        }

    def _write_status(self) -> None:
        """The status file: what `meshlet status` and an agent that starts again read while
        no agent is attached. Written whole (rename), 0600."""
        tmp = self.status_file.with_suffix(".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(self.status(), f)
            os.replace(tmp, self.status_file)
        except OSError as exc:
            log.warning("status file %s not written: %s", self.status_file, exc)

    # ---- applying snapshots ------------------------------------------------------------------

    async def apply(self, raw: Any) -> None:
        """One pushed snapshot: decoded and checked whole (TLS contexts built, intentions
        compiled) before anything changes; refused whole otherwise, the previous one kept."""
        async with self._applying:
            try:
                snap = decode_snapshot(raw)
                material = self._material(snap)
                tls = self.tls
                if tls is None:
                    assert material is not None  # no current material: never "unchanged"
                    tls = DynamicTLS(material)
                elif material is not None:
                    tls.update(material)  # builds first: a bad leaf leaves the old contexts
            except (ValueError, OSError) as exc:  # ssl.SSLError is an OSError
                version = raw.get("version") if isinstance(raw, dict) else None
                self.refused += 1
                self.last_refusal = str(exc)
                log.error("snapshot %s refused, keeping the previous one: %s", version, exc)
                self._send(refused={"version": version, "error": str(exc)})
                self._write_status()
                return
            first = self.snapshot is None
            self.snapshot, self.tls = snap, tls
            logging.getLogger("meshlet").setLevel(snap.log_level.upper())
            self._apply_intentions(snap)
            self._apply_endpoints(snap)
            if self.proxy is None:
                self._build(snap, tls)
            assert self.proxy is not None and self.access_log is not None
            self.access_log.settings = snap.access_log
            try:
                plan = await self.proxy.apply(snap.spec)
                self.bind_error = ""
            except OSError as exc:
                self.bind_error = str(exc)
                log.error("snapshot %d: a listener could not be started: %s", snap.version, exc)
            else:
                if not plan.empty:
                    log.info("snapshot %d: %s", snap.version, plan.describe())
            self._send(applied=snap.version)
            self._send(serving=self.serving())  # what /v1/status shows follows at once
            problems = self.problems()  # said again: an agent may have just attached
            self._send(ready=not problems, problems=problems)
            if first:
                settle_garbage_collector()
                keep_read_buffers_on_heap()  # no mmap/munmap per TLS read (connect.heap_trim)
                log.info("serving snapshot %d", snap.version)
            self._write_status()

    def _material(self, snap: Snapshot) -> PushedMaterial | None:
        """The pushed leaf and roots numbered after the current ones; None when unchanged."""
        pushed = snap.material
        current = self.tls.material if self.tls is not None else None
        if current is not None and (current.leaf, current.bundle) == (pushed.leaf, pushed.bundle):
            return None
        generation = current.generation + 1 if current is not None else 1
        return dataclasses.replace(pushed, generation=generation)

    def _apply_intentions(self, snap: Snapshot) -> None:
        source = snap.intentions
        if self._intentions_source == source and self.intentions is not None:
            return
        compiled = compile_stored(
            source.entries, default_allow=source.default_allow, default_reason=source.default_reason
        )
        for broken in compiled.broken.values():
            log.error(
                "intentions: %s cannot be enforced, denying: %s", broken.display, broken.reason
            )
        self._intentions_source = source
        if self.intentions is None:
            self.intentions = Latest(compiled)
        else:
            self.intentions.publish(compiled)
            if self.proxy is not None:
                self.proxy.recheck_connections()

    def _apply_endpoints(self, snap: Snapshot) -> None:
        for up in snap.endpoints:
            latest = self.endpoints.get(endpoints_key(up))
            if latest is None:
                self.endpoints[endpoints_key(up)] = Latest(up.targets)
            elif latest.get() != up.targets:
                latest.publish(up.targets)
        for name, routing in snap.routing.items():
            current = self.routing.get(name)
            if current is None:
                self.routing[name] = Latest(routing)
            elif current.get() != routing:
                current.publish(routing)
        wanted = {endpoints_key(up) for up in snap.spec.upstreams}
        for key in [k for k in self.endpoints if k not in wanted]:
            del self.endpoints[key]

    def _build(self, snap: Snapshot, tls: DynamicTLS[PushedMaterial]) -> None:
        assert self.intentions is not None
        intentions = self.intentions
        self.telemetry = Telemetry(snap.service, snap.material.leaf.service_uri)
        self.access_log = AccessLog(snap.access_log)
        self.telemetry.access_log = self.access_log
        self._spawn(self.access_log.run(), "access log writer")
        self._spawn(self.heap.run(), "heap trimmer")

        def endpoints_of(spec: UpstreamSpec) -> Latest[Endpoints] | None:
            return self.endpoints.get(endpoints_key(spec))

        def routing_of(spec: UpstreamSpec) -> Latest[RoutingSnapshot | None] | None:
            # As in the agent: an upstream that picks its own instances is not chain-routed.
            if spec.filter or spec.datacenter or spec.peer:
                return None
            return self.routing.setdefault(spec.name, Latest(None))

        self.proxy = Sidecar(
            tls,
            intentions_authorizers(intentions.get, Identity(snap.service)),
            endpoints=endpoints_of,
            targets=_targets,
            routing=routing_of,
            stats=self.stats,
            rng=self._rng,
            reuse_port=True,
            telemetry=self.telemetry,
        )

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- the channel ---------------------------------------------------------------------------

    def _send(self, **message: Any) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(encode_message(**message))

    async def _attach(self) -> None:
        """Dial the agent, follow its messages; on loss, keep serving and dial again."""
        failures = 0
        while not self._stop.is_set():
            try:
                reader, writer = await asyncio.open_unix_connection(
                    str(self.control_socket), limit=MAX_LINE
                )
            except OSError as exc:
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    log.info("agent not reachable at %s: %s", self.control_socket, exc)
                await asyncio.sleep(backoff(failures, 0.1, 2.0, self._rng.random()))
                continue
            self._writer, self.attached = writer, True
            self.detached.clear()
            applied = self.snapshot.version if self.snapshot is not None else 0
            self._send(
                hello={
                    "index": self.index,
                    "pid": os.getpid(),
                    "applied": applied,
                    "losses": self.losses,
                }
            )
            self._write_status()
            try:
                answered = await self._follow(reader)
            finally:
                self._writer, self.attached = None, False
                writer.close()
            if self._stop.is_set():
                return
            if not answered:
                # Closed before the agent said a word: a dial that did not take, not an agent
                # lost. A killed agent's listening socket outlives its connections for a
                # moment and queues the redial, then drops it; a starting agent drops a pid
                # it has not recorded yet. Counted as a loss, one kill counted twice.
                failures += 1
                self.detached.set()
                self._write_status()
                await asyncio.sleep(backoff(failures, 0.1, 2.0, self._rng.random()))
                continue
            failures = 0
            self.losses += 1
            self.lost_since = self._clock()
            self.detached.set()
            log.warning(
                "agent lost: serving the last snapshot (%s) until it comes back or the leaf "
                "expires",
                self.snapshot.version if self.snapshot is not None else "none",
            )
            self._write_status()

    async def _follow(self, reader: asyncio.StreamReader) -> bool:
        """Apply the agent's messages until the channel closes; whether any came."""
        answered = False
        with contextlib.suppress(ConnectionError):
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than MAX_LINE: the channel is out of step
                    log.error("control message over %d bytes: reconnecting", MAX_LINE)
                    return True
                if not line:
                    return answered
                if not answered:
                    answered = True
                    if self.lost_since is not None:
                        log.warning(
                            "agent back after %.1fs without it", self._clock() - self.lost_since
                        )
                        self.lost_since = None
                        self._write_status()
                try:
                    message = decode_message(line)
                except ValueError as exc:
                    log.error("bad control message ignored: %s", exc)
                    continue
                if "snapshot" in message:
                    await self.apply(message["snapshot"])
                stop = message.get("stop")
                if stop in ("drain", "now"):
                    self.request_stop(now=stop == "now")
        return answered  # reset by the agent's side

    async def _report(self) -> None:
        last: tuple[str, ...] | None = None
        last_stats: dict[str, Any] = {}
        last_serving: dict[str, Any] = {}
        last_attached = False
        while True:
            problems = tuple(self.problems())
            stats = self.counters()
            serving = self.serving()
            if self.attached and not last_attached:
                last, last_stats, last_serving = None, {}, {}  # a new agent knows nothing yet
            last_attached = self.attached
            if problems != last:
                self._send(ready=not problems, problems=list(problems))
                if self.attached or last is None:
                    self._write_status()
                last = problems
            if stats != last_stats:
                self._send(stats=stats)
                last_stats = stats
            if serving != last_serving:
                self._send(serving=serving)
                last_serving = serving
            await asyncio.sleep(REPORT_EVERY)

    async def _guard_leaf(self) -> None:
        """Fail closed: no agent and an expired leaf -> stop serving and exit. And a data
        plane that never got a snapshot (it serves nothing) gives up on an agent that does
        not come within NEVER_FED_WAIT seconds, rather than linger for ever."""
        while True:
            await asyncio.sleep(1.0)
            snap = self.snapshot
            if snap is None and not self.attached and not self.losses:
                if self._clock() - self._born >= NEVER_FED_WAIT:
                    log.error("no agent in %gs and nothing to serve: exiting", NEVER_FED_WAIT)
                    self._exit_code = EXIT_NEVER_FED
                    self.request_stop(now=True)
                    return
                continue
            if snap is None or self.attached:
                continue
            if snap.material.leaf.not_after <= self._clock():
                log.error("the leaf expired and no agent brought a new one: closing the listeners")
                self._exit_code = EXIT_LEAF_EXPIRED
                self.request_stop(now=True)
                return

    # ---- the process ---------------------------------------------------------------------------

    def request_stop(self, *, now: bool = False) -> None:
        if self._stop.is_set() or now:
            self._now.set()
        self._stop.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)

    async def run(self) -> int:
        self._write_status()
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(self._attach(), name="agent channel"),
                tg.create_task(self._report(), name="report"),
                tg.create_task(self._guard_leaf(), name="leaf guard"),
            ]
            await self._stop.wait()
            if not self._now.is_set() and self.proxy is not None and self.snapshot is not None:
                period = self.snapshot.spec.drain_grace
                log.info("draining for %gs", period)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._now.wait(), period)
            if self.proxy is not None:
                await self.proxy.close(grace=1.0)
            for task in [*tasks, *self._tasks]:
                task.cancel()
        with contextlib.suppress(OSError):
            self.status_file.unlink()
        log.info("data plane stopped")
        return self._exit_code


USAGE = "usage: python -m connect.dataplane --index K --control-socket PATH"


def parse_args(argv: list[str]) -> tuple[int, Path]:
    """(index, control socket) from the command line the agent writes; `ValueError` naming
    what is wrong. (Not argparse: it and gettext are 0.3 MB of a 30 MB process.)"""
    if len(argv) != 4 or argv[0] != "--index" or argv[2] != "--control-socket":
        raise ValueError(f"expected --index K --control-socket PATH, got {' '.join(argv)!r}")
    if not argv[1].isdigit() or int(argv[1]) < 1:
        raise ValueError(f"--index: expected a positive integer, got {argv[1]!r}")
    return int(argv[1]), Path(argv[3])


def main(argv: list[str] | None = None) -> int:
    try:
        index, control_socket = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"{USAGE}\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s [%(levelname)s] dataplane {index} (pid {os.getpid()}) "
        "%(name)s: %(message)s",
    )
    # Nothing of the agent's is inherited but stdout and stderr: the channel is dialled by
    # path, so that it survives the agent.
    dp = DataPlane(index, control_socket)

    async def run() -> int:
        dp.install_signal_handlers()
        return await dp.run()

    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run())
