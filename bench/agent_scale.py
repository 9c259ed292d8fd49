"""Scale benchmark of the node agent: many upstreams, one huge upstream.

    .venv/bin/python bench/agent_scale.py [--upstreams 1000] [--instances 10] [--big 10000]

1. Starts `meshlet dev` and registers `--upstreams` services with `--instances` proxies each,
   plus one service with `--big` proxies (catalog registrations on many nodes).
2. Starts `meshlet agent` with every one of them as an upstream, waits for /ready, and
   reads the agent's RSS from /proc.
3. Moves instances (a port change is a changed endpoint) in small upstreams and in the big
   one, and reads the agent's own apply times (decode of the body's bytes, JSON included +
   snapshot + diff + publish; not the HTTP read) from /v1/status.
4. Measures in-process the whole cost of one update as the agent pays it, JSON decode included,
   for a 10-instance and a 10,000-instance answer shaped as Consul renders it: json.loads
   alone (the old floor), json.loads + the full decode of every entry, and the agent's path.

Targets (issue 15): a 10,000-instance update applied in <= 10 ms, <= 60 MB agent RSS with
1,000 upstreams. Figures are printed, not asserted. Every wait has a deadline; everything
listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from agent.catalog import (
    EMPTY_MEMO,
    Decoded,
    Snapshot,
    WatchKey,
    build_snapshot,
    decode_answer,
    diff,
    snapshot_of,
)
from agent.consul import ConsulClient
from agent.consul_config import ConsulConfig
from agent.consul_results import ServiceEntry
from agent.watch import Latest

MESHLET = shutil.which("meshlet", path=str(Path(sys.executable).parent)) or "meshlet"
DEADLINE = 1200.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def reg(service: str, i: int, port: int) -> dict[str, Any]:
    # The address is the node's (not the instance's): re-registering an instance must move
    # only its port, not the node's address and with it every instance on the node.
    n = i % 500
    return {
        "Node": f"node-{n}",
        "Address": f"10.{n // 250}.{n % 250}.1",
        "Service": {
            "ID": f"{service}-{i}-sidecar-proxy",
            "Service": f"{service}-sidecar-proxy",
            "Kind": "connect-proxy",
            "Port": port,
            "Proxy": {"DestinationServiceName": service, "LocalServicePort": 8080},
        },
    }


async def populate(consul: ConsulClient, regs: list[dict[str, Any]]) -> None:
    gate = asyncio.Semaphore(64)

    async def one(body: dict[str, Any]) -> None:
        async with gate:
            await consul.catalog.register(body)

    await asyncio.gather(*(one(r) for r in regs))


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as resp:
        return json.loads(resp.read())


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory (VmRSS), or its anonymous (RssAnon: the heap, Python's objects) or
    file-backed (RssFile: the interpreter's and the extensions' libraries) part."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_until(pred: Any, what: str, deadline: float) -> None:
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: gave up waiting for {what}")
        time.sleep(0.1)  # polling a separate process's admin API; this is a benchmark


def consul_entry(i: int) -> dict[str, Any]:
    """One `/v1/health/connect/big` entry with every field Consul (and devstack) renders."""
    node = f"node-{i % 500}"
    return {
        "Node": {
            "ID": "",
            "Node": node,
            "Address": f"10.0.{i % 250}.1",
            "Datacenter": "dc1",
            "TaggedAddresses": {"lan": f"10.0.{i % 250}.1", "wan": f"10.0.{i % 250}.1"},
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": 5,
            "ModifyIndex": 5,
        },
        "Service": {
            "Kind": "connect-proxy",
            "ID": f"big-{i}-sidecar-proxy",
            "Service": "big-sidecar-proxy",
            "Tags": [],
            "Address": "",
            "Meta": {},
            "Port": 21000,
            "Weights": {"Passing": 1, "Warning": 1},
            "EnableTagOverride": False,
            "Proxy": {
                "Mode": "",
                "MeshGateway": {},
                "Expose": {},
                "DestinationServiceName": "big",
                "LocalServicePort": 8080,
            },
            "Connect": {},
            "CreateIndex": 100 + i,
            "ModifyIndex": 100 + i,
        },
        "Checks": [
            {
                "Node": node,
                "CheckID": "serfHealth",
                "Name": "Serf Health Status",
                "Status": "passing",
                "Notes": "",
                "Output": "Agent alive and reachable",
                "ServiceID": "",
                "ServiceName": "",
                "ServiceTags": [],
                "Type": "",
                "Interval": "",
                "Timeout": "",
                "ExposedPort": 0,
                "Definition": {},
                "CreateIndex": 3,
                "ModifyIndex": 3,
            }
        ],
    }


def in_process_apply(n: int, rounds: int) -> dict[str, tuple[float, float, float]]:
    """p50 and p99 wall time and p50 CPU time (ms) of one update of an n-instance answer in
    which one instance moved (CPU time is the steadier figure on a shared box):

    - "json": `json.loads` of the body alone, the floor of the old decode;
    - "full": json + `ServiceEntry.from_json` of every entry + `build_snapshot` + diff + publish
      (every entry decoded and validated);
    - "agent": `decode_answer` of the body's bytes (after a large answer only the span of
      blocks that changed is parsed; only entries whose bytes are new are decoded into lean
      typed entries) with the
      previous answer's memo + `snapshot_of` + diff + publish (what `UpstreamWatcher` does).
    """
    # In Consul's order: the health endpoints list instances by node, then service ID.
    raw = sorted(
        (consul_entry(i) for i in range(n)), key=lambda e: (e["Node"]["Node"], e["Service"]["ID"])
    )
    key = WatchKey("big")
    latest: Latest[Any] = Latest(None)
    first = decode_answer(key, json.dumps(raw).encode(), EMPTY_MEMO)
    old_full = old_agent = snapshot_of(key, first.endpoints, 1, 0.0)
    memo = first.memo
    wall: dict[str, list[float]] = {"json": [], "full": [], "agent": []}
    cpu: dict[str, list[float]] = {"json": [], "full": [], "agent": []}

    def timed(what: str, step: Any) -> Any:
        w, c = time.perf_counter(), time.process_time()
        got = step()
        cpu[what].append(time.process_time() - c)
        wall[what].append(time.perf_counter() - w)
        return got

    def full_path(body: bytes, index: int) -> Snapshot:
        entries = [ServiceEntry.from_json(e) for e in json.loads(body)]
        full = build_snapshot(key, entries, index, 0.0)
        if diff(old_full, full):
            latest.publish(full)
        return full

    def agent_path(body: bytes, index: int) -> tuple[Decoded, Snapshot]:
        decoded = decode_answer(key, body, memo)
        snap = snapshot_of(key, decoded.endpoints, index, 0.0, in_order=decoded.in_order)
        if diff(old_agent, snap):
            latest.publish(snap)
        return decoded, snap

    for r in range(rounds):
        moved = raw[r % n]["Service"]
        moved["Port"] = 22000 + r
        moved["ModifyIndex"] = 100 + n + r  # Consul bumps it on every write
        body = json.dumps(raw).encode()
        timed("json", lambda: json.loads(body))  # noqa: B023
        old_full = full = timed("full", lambda: full_path(body, r + 2))  # noqa: B023
        decoded, snap = timed("agent", lambda: agent_path(body, r + 2))  # noqa: B023
        memo, old_agent = decoded.memo, snap
        assert snap.endpoints == full.endpoints and decoded.reused == n - 1
    out = {}
    for what, ts in wall.items():
        ts.sort()
        out[what] = (
            statistics.median(ts) * 1000,
            ts[int(0.99 * (len(ts) - 1))] * 1000,
            statistics.median(cpu[what]) * 1000,
        )
    return out


async def main_async(args: argparse.Namespace, figures: dict[str, float] | None = None) -> int:
    """Runs the benchmark and prints its figures; also stores them in `figures` if given."""
    fig: dict[str, float] = {} if figures is None else figures
    deadline = time.monotonic() + DEADLINE
    port, admin_port = free_port(), free_port()
    consul_addr = f"127.0.0.1:{port}"
    # A benchmark driver: starting the processes blocks the loop for a moment, nothing else runs.
    dev = subprocess.Popen(  # noqa: ASYNC220
        [MESHLET, "dev", "--http-addr", consul_addr, "--log-level", "warning"],
        stdout=subprocess.PIPE,
        text=True,
    )
    agent: subprocess.Popen[bytes] | None = None
    tmp = Path(tempfile.mkdtemp(prefix="meshlet-bench-"))
    try:
        assert dev.stdout is not None
        dev.stdout.readline()
        names = [f"svc{i:04d}" for i in range(args.upstreams)]
        regs = [
            reg(n, i * args.instances + k, 21000)
            for i, n in enumerate(names)
            for k in range(args.instances)
        ]
        regs += [reg("big", i, 21000) for i in range(args.big)]
        started = time.monotonic()
        async with ConsulClient(ConsulConfig(address=consul_addr, timeout=30)) as consul:
            await populate(consul, regs)
            print(f"registered {len(regs)} instances in {time.monotonic() - started:.1f}s")

            ups = [*names, "big"]
            lines = [f"  - {{name: {n}, local_bind_port: {20000 + i}}}" for i, n in enumerate(ups)]
            cfg = tmp / "agent.yaml"
            cfg.write_text(
                f"consul: {{address: '{consul_addr}'}}\n"
                "service: {name: bench, port: 8080}\n"
                "sidecar:\n  port: 19999\n  upstreams:\n" + "\n".join(lines) + "\n"
                f"admin: {{address: '127.0.0.1:{admin_port}'}}\n"
                "log_level: warning\n"
                "shutdown: {drain_period: 0s}\n"
            )
            admin = f"http://127.0.0.1:{admin_port}"
            started = time.monotonic()
            agent = proc = subprocess.Popen(  # noqa: ASYNC220
                [MESHLET, "agent", "-c", str(cfg)],
                env={**os.environ, "PYTHONSAFEPATH": "1"},
            )

            def ready() -> bool:
                try:
                    return bool(get_json(f"{admin}/ready")["ready"])
                except OSError:
                    return False

            wait_until(ready, "the agent to be ready", deadline)
            fig["ready_s"] = time.monotonic() - started
            fig["rss_mb_ready"] = rss_mb(agent.pid)
            fig["rss_anon_mb_ready"] = rss_mb(agent.pid, "RssAnon")
            fig["upstreams"] = len(ups)
            print(
                f"agent ready with {len(ups)} upstreams ({len(regs)} endpoints) "
                f"in {time.monotonic() - started:.1f}s; RSS {rss_mb(proc.pid):.1f} MB "
                f"(anonymous {rss_mb(proc.pid, 'RssAnon'):.1f}, "
                f"files {rss_mb(proc.pid, 'RssFile'):.1f})"
            )

            def applied() -> int:
                return int(get_json(f"{admin}/v1/status?upstream=-")["apply"]["count"])

            rng = random.Random(4)
            for label, targets, count in (
                (f"{args.instances}-instance upstreams", names, args.updates),
                (f"the {args.big}-instance upstream", ["big"], args.big_updates),
            ):
                before = applied()
                for u in range(count):
                    name = rng.choice(targets)
                    width = args.big if name == "big" else args.instances
                    base = 0 if name == "big" else names.index(name) * args.instances
                    i = base + rng.randrange(width)
                    await consul.catalog.register(reg(name, i, 22000 + u))
                    # Let each update land separately so every one is applied on its own.
                    target = before + u + 1
                    wait_until(lambda t=target: applied() >= t, "an update to apply", deadline)
                summary = get_json(f"{admin}/v1/status?upstream=-")["apply"]
                # These updates' own applies (newest last), not the first snapshots at start.
                mine = sorted(summary["recent_ms"][-count:])
                p50 = statistics.median(mine)
                p99 = mine[int(0.99 * (len(mine) - 1))]
                which = "big" if targets == ["big"] else "small"
                fig[f"apply_{which}_p50_ms"], fig[f"apply_{which}_p99_ms"] = p50, p99
                fig["rss_mb_after_updates"] = rss_mb(agent.pid)
                print(
                    f"{count} updates to {label}: agent apply (decode of the body + "
                    f"snapshot + diff + publish) p50 {p50:.3f} ms, p99 {p99:.3f} ms over the "
                    f"last {len(mine)}; all {summary['count']} applies incl. start: "
                    f"p99 {summary['p99_ms']:.3f} ms; RSS {rss_mb(proc.pid):.1f} MB"
                )
        for n in (args.instances, args.big):
            got = in_process_apply(n, 200 if n <= 1000 else args.big_rounds)
            for what, label in (
                ("json", "json.loads alone (floor)"),
                ("full", "json.loads + full decode + validation of every entry"),
                ("agent", "agent path (changed span parsed, unchanged entries reused)"),
            ):
                p50, p99, cpu50 = got[what]
                fig[f"in_process_{n}_{what}_p50_ms"] = p50
                print(
                    f"in-process, one update of a {n}-instance answer incl. JSON decode, "
                    f"{label}: p50 {p50:.3f} ms, p99 {p99:.3f} ms (CPU p50 {cpu50:.3f} ms)"
                )
        print("goals: <= 10 ms per 10,000-instance update, <= 60 MB agent RSS at 1,000 upstreams")
        return 0
    finally:
        for child in (agent, dev):
            if child is not None and child.poll() is None:
                child.terminate()
                try:
                    child.wait(20)
                except subprocess.TimeoutExpired:
                    child.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def measure(**overrides: int) -> dict[str, float]:
    """Runs the benchmark with the defaults (or `overrides`) and returns its figures.

    Keys: ready_s, rss_mb_ready, rss_anon_mb_ready, rss_mb_after_updates, upstreams,
    apply_{small,big}_{p50,p99}_ms (the agent's own apply times),
    in_process_{n}_{json,full,agent}_p50_ms (one update of an n-instance answer, JSON decode
    included). `make bench` (bench/run.py) calls this.
    """
    args = _parser().parse_args([])
    for name, value in overrides.items():
        setattr(args, name, value)
    figures: dict[str, float] = {}
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main_async(args, figures))
    return figures


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstreams", type=int, default=1000)
    parser.add_argument("--instances", type=int, default=10)
    parser.add_argument("--big", type=int, default=10000)
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--big-updates", type=int, default=20)
    parser.add_argument(
        "--big-rounds", type=int, default=30, help="in-process updates of the big answer"
    )
    return parser


def main() -> int:
    args = _parser().parse_args()
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
