"""`make bench`: the project's one benchmark. One run, under 5 minutes on 2 cores.

    .venv/bin/python bench/run.py [--smoke] [--out bench/results]

Data plane (topology and tools: bench/README.md). The load generators run on CPU 0; every
sidecar and the nginx app on CPU 1 (taskset). Variants: direct (nginx alone), meshlet-http,
meshlet-l4, haproxy-http (`http-reuse always`), haproxy-tcp, each pair with the same mTLS hop.
Workloads, in this order so that a slow spell of the shared box hits every variant alike:

1. open loop at 1,000 / 2,000 / 5,000 RPS (proxy_loadgen.py; latency from the intended send
   time; the direct variant shows the generator's own noise), with CPU per request per
   sidecar from schedstat over each run;
2. max RPS (wrk, closed loop), then RSS per sidecar;
3. new connections per second (wrk, `Connection: close`) on the L4 pairs: full handshakes
   (meshlet `--no-resume`, haproxy `no-ssl-reuse`) and with resumption (both defaults);
4. bulk download through the L4 pairs (bulk_client.py reads the whole file);
5. 100 MB upload through the HTTP pairs;
6. metrics and access logs on: a second meshlet HTTP pair, measured when connect exposes
   the switch (proxy_sidecar.telemetry_switch), "not available" otherwise.

Control plane: intentions_engine.measure() and agent_scale.measure() (issue 15 item 3).

Writes `<out>/latest.json` (raw figures per variant plus the summary objects `ratios`,
`added_p99_ms`, `rss_mb`, `cpu_us_per_req`) and `<out>/latest.md`, and prints the table.
`--smoke` runs every workload for a moment (under 30 s) and fails unless every variant
produced every figure (bench/report.py's shape check); it measures nothing worth reading.
Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import agent_scale
import intentions_engine
import proxy_bench as pb
import proxy_loadgen
import proxy_sidecar
import report
import uvloop

HERE = Path(__file__).resolve().parent
_all_cpus = os.sched_getaffinity(0)
RATES = (1000, 2000, 5000)
CONNS = {1000: 16, 2000: 16, 5000: 32}


@dataclass(frozen=True)
class Plan:
    warmup_s: float
    open_loop_s: float
    wrk_s: int
    wrk_warmup: bool
    conn_s: int
    bulk_bytes: int
    upload_bytes: int
    intention_rounds: int
    agent: dict[str, int]


FULL = Plan(
    warmup_s=1.0,
    open_loop_s=4.0,
    wrk_s=5,
    wrk_warmup=True,
    conn_s=4,
    bulk_bytes=1 << 30,
    upload_bytes=100 << 20,
    intention_rounds=50_000,
    agent={"updates": 20, "big_updates": 5, "big_rounds": 10},
)
SMOKE = Plan(
    warmup_s=0.05,
    open_loop_s=0.2,
    wrk_s=1,
    wrk_warmup=False,
    conn_s=1,
    bulk_bytes=16 << 20,
    upload_bytes=16 << 20,
    intention_rounds=500,
    agent={"upstreams": 10, "instances": 2, "big": 20, "updates": 3, "big_updates": 2},
)


def best_bulk(mode: str, port: int, path: str, size: int) -> dict[str, float]:
    """The faster of two transfers: one slow spell of the shared box must not be the figure."""
    runs = [bulk(mode, port, path, size) for _ in range(2)]
    best = max(runs, key=lambda r: r["gbit_s"])
    return {**best, "runs_gbit_s": [r["gbit_s"] for r in runs]}  # type: ignore[dict-item]


def bulk(mode: str, port: int, path: str, size: int) -> dict[str, float]:
    argv = [
        "taskset", "-c", pb.LOAD_CPU, pb.PY, str(HERE / "bulk_client.py"), mode,
        "--port", str(port), "--path", path, "--bytes", str(size),
    ]  # fmt: skip
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"bulk {mode} on port {port} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def open_loop(port: int, rate: int, plan: Plan) -> dict[str, float]:
    """proxy_loadgen's run in this process (pinned to the load core): no interpreter start."""
    return uvloop.run(proxy_loadgen.run(port, rate, CONNS[rate], plan.open_loop_s, plan.warmup_s))


def phase(what: str, started: float) -> None:
    print(f"bench: {what} done at {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)


def mb(kb: int) -> float:
    return kb / 1024


def data_plane(
    plan: Plan, out: Path, base: int, diagnose: bool = False
) -> tuple[dict[str, dict[str, object]], dict]:
    ports = {
        "direct": base,
        "mh_out": base + 1, "mh_in": base + 11, "ml_out": base + 2, "ml_in": base + 12,
        "hh_out": base + 3, "hh_in": base + 13, "ht_out": base + 4, "ht_in": base + 14,
        "htn_out": base + 5, "mln_out": base + 6, "mt_out": base + 7, "mt_in": base + 17,
    }  # fmt: skip
    telemetry_on = proxy_sidecar.telemetry_switch() is not None
    # This process runs the open-loop generator: on the load generator's core.
    os.sched_setaffinity(0, {int(pb.LOAD_CPU)})
    t0 = time.monotonic()
    procs: list[pb.Proc] = []
    results: dict[str, dict[str, object]] = {}
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="meshlet-bench-") as tmp:
        d = Path(tmp)
        pb.make_certs(d)
        with (d / "bulk.bin").open("wb") as f:
            f.truncate(plan.bulk_bytes)  # sparse: nginx sends zeros from the page cache
        with (d / "bulk.bin").open("rb") as f:
            # Read once so the page cache holds it: else the first variant pays for filling it.
            while f.read(1 << 22):
                pass
        try:
            nginx = pb.nginx_conf(d, base)
            procs.append(
                pb.spawn("nginx", ["nginx", "-p", str(d), "-c", str(nginx)], pb.SUT_CPU,
                         logs / "nginx.log")
            )  # fmt: skip
            variants = [pb.Variant("direct", ports["direct"])]

            def ours(kind: str, *extra: str):  # type: ignore[no-untyped-def]
                if diagnose:
                    extra = (*extra, "--diagnose")
                return lambda side, listen, target: [
                    *pb.meshlet(kind, side, listen, target, d),
                    *extra,
                ]

            def theirs(mode: str):  # type: ignore[no-untyped-def]
                def argv(side: str, listen: int, target: int) -> list[str]:
                    conf = pb.haproxy_conf(
                        d, f"{mode}-{side}", mode=mode, listen=listen, target=target, side=side
                    )
                    return ["haproxy", "-db", "-f", str(conf)]

                return argv

            layout = [
                ("meshlet-http", "mh", ours("http")),
                ("meshlet-l4", "ml", ours("l4")),
                ("haproxy-http", "hh", theirs("http")),
                ("haproxy-tcp", "ht", theirs("tcp")),
            ]
            if telemetry_on:
                layout.append(("meshlet-http-telemetry", "mt", ours("http", "--telemetry")))
            for name, key, argv in layout:
                server = pb.spawn(f"{name}-in", argv("in", ports[f"{key}_in"], base), pb.SUT_CPU,
                                  logs / f"{name}-in.log")  # fmt: skip
                client = pb.spawn(
                    f"{name}-out", argv("out", ports[f"{key}_out"], ports[f"{key}_in"]),
                    pb.SUT_CPU, logs / f"{name}-out.log",
                )  # fmt: skip
                procs += [server, client]
                variants.append(pb.Variant(name, ports[f"{key}_out"], [client, server]))
            noreuse = pb.haproxy_conf(
                d, "tcpn-out", mode="tcp", listen=ports["htn_out"], target=ports["ht_in"],
                side="out", reuse=False,
            )  # fmt: skip
            procs.append(
                pb.spawn("haproxy-tcp-noreuse-out", ["haproxy", "-db", "-f", str(noreuse)],
                         pb.SUT_CPU, logs / "haproxy-tcp-noreuse.log")
            )  # fmt: skip
            procs.append(
                pb.spawn(
                    "meshlet-l4-noresume-out",
                    [*pb.meshlet("l4", "out", ports["mln_out"], ports["ml_in"], d), "--no-resume"],
                    pb.SUT_CPU, logs / "meshlet-l4-noresume-out.log",
                )
            )  # fmt: skip
            for name, port in ports.items():
                if name.startswith("mt_") and not telemetry_on:
                    continue
                # Eight sidecars start at once on the SUT core: on a busy box 10 s was short.
                pb.wait_port(port, timeout=30.0)
            for v in variants:
                results[v.name] = {
                    "rss_idle_mb": [mb(pb.rss_kb(p.pid)[0]) for p in v.sidecars],
                    "open_loop": {},
                }

            phase("start", t0)
            # 1. Open loop, rates outermost: each rate sees every variant back to back.
            for rate in RATES:
                for v in variants:
                    before = sum(pb.cpu_ns(p.pid) for p in v.sidecars)
                    lg = open_loop(v.port, rate, plan)
                    cpu = sum(pb.cpu_ns(p.pid) for p in v.sidecars) - before
                    if v.sidecars:
                        # Every request of the window (warm-up too), per sidecar.
                        lg["cpu_us_per_req_per_sidecar"] = (
                            cpu / 1e3 / max(1, lg["completed"]) / len(v.sidecars)
                        )
                    results[v.name]["open_loop"][str(rate)] = lg  # type: ignore[index]

            phase("open loop", t0)
            # 2. Max RPS, closed loop; RSS after it.
            for v in variants:
                if plan.wrk_warmup:
                    pb.wrk(v.port, 1)  # warm-up: pools, TLS sessions
                results[v.name]["max_rps"] = pb.wrk(v.port, plan.wrk_s)
                rss = [pb.rss_kb(p.pid) for p in v.sidecars]
                results[v.name]["rss_mb"] = [mb(r) for r, _ in rss]
                results[v.name]["hwm_mb"] = [mb(h) for _, h in rss]

            phase("max RPS", t0)

            # 3. New connections per second on the L4 pairs.
            def fresh(port: int) -> dict[str, float]:
                return pb.wrk(port, plan.conn_s, conns=16, close=True)

            results["meshlet-l4"]["handshakes"] = {
                "full": fresh(ports["mln_out"]),
                "resumed": fresh(ports["ml_out"]),
            }
            results["haproxy-tcp"]["handshakes"] = {
                "full": fresh(ports["htn_out"]),
                "resumed": fresh(ports["ht_out"]),
            }

            phase("handshakes", t0)
            # 4. Bulk download through the L4 pairs; 5. upload through the HTTP pairs.
            for name in ("direct", "meshlet-l4", "haproxy-tcp"):
                port = next(v.port for v in variants if v.name == name)
                results[name]["bulk"] = best_bulk("download", port, "/bulk", plan.bulk_bytes)
            for name in ("direct", "meshlet-http", "haproxy-http"):
                port = next(v.port for v in variants if v.name == name)
                results[name]["upload"] = best_bulk("upload", port, "/upload", plan.upload_bytes)
            phase("bulk and upload", t0)
            for v in variants:
                results[v.name]["hwm_end_mb"] = [mb(pb.rss_kb(p.pid)[1]) for p in v.sidecars]
        finally:
            pb.stop_all(procs)
    telemetry: dict[str, object] = {"available": telemetry_on}
    if not telemetry_on:
        telemetry["note"] = (
            "not available: connect exposes no metrics/access-log switch yet "
            "(bench/proxy_sidecar.py telemetry_switch)"
        )
    return results, telemetry


def control_plane(plan: Plan) -> dict[str, dict[str, float]]:
    # The agent and devstack are not part of the pinned data-plane topology: both cores.
    os.sched_setaffinity(0, _all_cpus)
    return {
        "intentions": intentions_engine.measure(plan.intention_rounds),
        "agent": agent_scale.measure(**plan.agent),
    }


def _nulls(obj: object) -> object:
    """NaN (a figure that could not be computed) as JSON null: NaN is not JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nulls(x) for k, x in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nulls(x) for x in obj]
    return obj


def sidecar_build(python: str) -> str:
    """ "mypyc" when the sidecars' interpreter imports the compiled hot modules, else "pure"."""
    probe = "import connect.http1.downstream as m; print(m.__file__)"
    done = subprocess.run(
        [python, "-c", probe], check=False, capture_output=True, text=True, cwd="/"
    )
    if done.returncode != 0:
        raise RuntimeError(f"{python} cannot import connect: {done.stderr[-500:]}")
    return "mypyc" if done.stdout.strip().endswith(".so") else "pure"


def git(*argv: str) -> str:
    done = subprocess.run(["git", *argv], check=False, capture_output=True, text=True, cwd=HERE)
    return done.stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="seconds, not minutes; shape check")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--base-port", type=int, default=24000)
    ap.add_argument(
        "--diagnose",
        action="store_true",
        help="meshlet sidecars log loop lags and slow GCs to <out>/logs (issue 15 item 5)",
    )
    ap.add_argument(
        "--sidecar-python",
        help="the interpreter the meshlet sidecars run on: `make bench` passes the venv with "
        "the hot modules compiled by mypyc (setup.py); default this one, pure Python",
    )
    args = ap.parse_args()
    if args.sidecar_python:
        pb.PY = os.path.abspath(args.sidecar_python)  # not resolved: a venv python is a link
    os.environ["PATH"] += ":/usr/sbin"
    for tool in ("nginx", "haproxy", "wrk", "taskset"):
        if shutil.which(tool) is None:
            print(f"missing {tool}: `make bench-tools` installs it", file=sys.stderr)
            return 2
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        pb.LOAD_CPU, pb.SUT_CPU = str(cpus[0]), str(cpus[1])
    elif args.smoke:
        # The smoke measures nothing worth reading: one core will do for a shape check.
        pb.LOAD_CPU = pb.SUT_CPU = str(cpus[0])
        print("bench: one core: load generator and SUT share it (smoke only)", file=sys.stderr)
    else:
        print("bench: needs 2 cores (load generator and SUT apart)", file=sys.stderr)
        return 2
    plan = SMOKE if args.smoke else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    variants, telemetry = data_plane(plan, args.out, args.base_port, args.diagnose)
    data_plane_s = time.monotonic() - started
    control = control_plane(plan)
    raw = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "--short", "HEAD")
        + ("-dirty" if git("status", "--porcelain") else ""),
        "mode": "smoke" if args.smoke else "full",
        "seconds": {"data_plane": data_plane_s, "total": time.monotonic() - started},
        "env": {
            "cpu": pb.cpu_model(),
            "cores": os.cpu_count(),
            "loadavg_at_end": os.getloadavg(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "openssl": pb.version(["openssl", "version"]),
            "haproxy": pb.version(["haproxy", "-v"]),
            "nginx": pb.version(["nginx", "-v"]),
            "wrk": pb.version(["wrk", "-v"]),
            "sidecar_build": sidecar_build(pb.PY),
        },
        "variants": variants,
        "telemetry": telemetry,
        "control_plane": control,
    }
    full = report.summarize(raw)
    table = report.render(full)
    (args.out / "latest.json").write_text(json.dumps(_nulls(full), indent=2, default=str) + "\n")
    (args.out / "latest.md").write_text(table + "\n")
    print(table)
    missing = report.check_shape(full)
    if missing:
        print("bench: figures missing:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 1
    print(f"\nwrote {args.out / 'latest.json'} in {full['seconds']['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
