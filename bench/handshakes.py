"""New-connection rate alone: meshlet's L4 pair against haproxy's TCP pair, same mTLS hop.

    .venv/bin/python bench/handshakes.py [--rounds 3] [--seconds 3] [--base-port 25000]
        [--profile DIR]

The handshake rows of `make bench` (bench/run.py step 3) without the rest: nginx, a meshlet L4
pair and a haproxy TCP pair (proxy_bench's topology: load on CPU 0, sidecars and nginx on
CPU 1), plus the second client of each that never resumes (meshlet `--no-resume`, haproxy
`no-ssl-reuse`). `wrk -c16 -H "Connection: close"` makes every request a new connection, so
each one costs a client-side dial and a server-side accept. Rounds interleave the four
workloads (full and resumed, meshlet and haproxy) so a slow spell of the shared box hits each
alike; the figure per workload is the median over rounds, with CPU per connection per side
(schedstat of the client and of the server process over the run).

`--profile DIR`: after the rounds, one more full-handshake run (`--profile-kind resumed`: a
resuming one) per pair with py-spy (native frames, if installed) recording the meshlet client
and server and `perf record` the haproxy ones, summaries written to DIR. Prints a markdown
table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import proxy_bench as pb

HERE = Path(__file__).resolve().parent
WORKLOADS = ("meshlet full", "haproxy full", "meshlet resumed", "haproxy resumed")
BASELINE = ("baseline full", "baseline resumed")


def _measure(port: int, seconds: int, client: pb.Proc, server: pb.Proc) -> dict[str, float]:
    before = (pb.cpu_ns(client.pid), pb.cpu_ns(server.pid))
    run = pb.wrk(port, seconds, conns=16, close=True)
    after = (pb.cpu_ns(client.pid), pb.cpu_ns(server.pid))
    conns = max(1.0, run["rps"] * seconds)
    return {
        "conn_s": run["rps"],
        "client_us": (after[0] - before[0]) / 1e3 / conns,
        "server_us": (after[1] - before[1]) / 1e3 / conns,
    }


def _record(tool: str, pid: int, out: Path, seconds: int) -> subprocess.Popen[bytes] | None:
    if tool == "py-spy":
        spy = shutil.which("py-spy") or str(Path(pb.PY).parent / "py-spy")
        if not Path(spy).exists():
            return None
        argv = [spy, "record", "--native", "--format", "raw", "-r", "200", "-d", str(seconds)]
        argv += ["-p", str(pid), "-o", str(out)]
    else:
        if shutil.which("perf") is None:
            return None
        argv = ["perf", "record", "-F", "999", "-g", "-p", str(pid), "-o", str(out)]
        argv += ["--", "sleep", str(seconds)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _perf_summary(data: Path, top: int = 25) -> str:
    done = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--stdio", "--sort", "dso,sym",
         "-g", "none", "--percent-limit", "0.7"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    lines = [ln for ln in done.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
    return "\n".join(lines[:top])


def profile(
    out: Path,
    seconds: int,
    ports: dict[str, int],
    procs: dict[str, pb.Proc],
    meshlet_tool: str,
    *,
    kind: str = "full",
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if kind == "resumed":
        pairs = (
            ("meshlet", meshlet_tool, ports["ml_out"], ("meshlet-out", "meshlet-in")),
            ("haproxy", "perf", ports["ht_out"], ("haproxy-out", "haproxy-in")),
        )
    else:
        pairs = (
            ("meshlet", meshlet_tool, ports["mln_out"], ("meshlet-noresume-out", "meshlet-in")),
            ("haproxy", "perf", ports["htn_out"], ("haproxy-noreuse-out", "haproxy-in")),
        )
    for pair, tool, port, names in pairs:
        recorders = []
        for side, name in zip(("out", "in"), names, strict=True):
            target = out / f"{pair}-{side}.{'txt' if tool == 'py-spy' else 'data'}"
            rec = _record(tool, procs[name].pid, target, seconds + 1)
            if rec is not None:
                recorders.append((rec, target))
        time.sleep(0.5)
        pb.wrk(port, seconds, conns=16, close=True)
        for rec, target in recorders:
            rec.wait(timeout=60)
            summary = (
                pb.profile_summary(target, top=30) if tool == "py-spy" else _perf_summary(target)
            )
            target.with_suffix(".md").write_text(summary + "\n")
            print(f"profile: {target.with_suffix('.md')}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--base-port", type=int, default=25000)
    ap.add_argument("--profile", type=Path)
    ap.add_argument(
        "--meshlet-profiler",
        choices=("py-spy", "perf"),
        default="py-spy",
        help="perf shows kernel and OpenSSL frames as for haproxy; py-spy the Python ones",
    )
    ap.add_argument(
        "--profile-kind",
        choices=("full", "resumed"),
        default="full",
        help="which handshakes the --profile run records (resumed: both pairs' default clients)",
    )
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument(
        "--baseline",
        type=Path,
        help="a source tree of meshlet (e.g. `git archive main`) whose L4 pair runs in the same "
        "rounds as `baseline full/resumed`: a before/after on the same box in one run",
    )
    args = ap.parse_args()
    base = args.base_port
    ports = {"direct": base, "ml_out": base + 2, "ml_in": base + 12, "ht_out": base + 4,
             "ht_in": base + 14, "htn_out": base + 5, "mln_out": base + 6}  # fmt: skip
    if args.baseline is not None:
        ports |= {"bl_out": base + 7, "bl_in": base + 17, "bln_out": base + 8}
    workloads = WORKLOADS + (BASELINE if args.baseline is not None else ())
    logs = Path(tempfile.mkdtemp(prefix="meshlet-handshakes-logs-"))
    procs: dict[str, pb.Proc] = {}
    with tempfile.TemporaryDirectory(prefix="meshlet-handshakes-") as tmp:
        d = Path(tmp)
        pb.make_certs(d)

        def spawn(name: str, argv: list[str]) -> None:
            procs[name] = pb.spawn(name, argv, pb.SUT_CPU, logs / f"{name}.log")

        def haproxy(name: str, side: str, listen: int, target: int, reuse: bool = True) -> None:
            conf = pb.haproxy_conf(
                d, name, mode="tcp", listen=listen, target=target, side=side, reuse=reuse
            )
            spawn(name, ["haproxy", "-db", "-f", str(conf)])

        try:
            spawn("nginx", ["nginx", "-p", str(d), "-c", str(pb.nginx_conf(d, base))])
            spawn("meshlet-in", pb.meshlet("l4", "in", ports["ml_in"], base, d))
            spawn("meshlet-out", pb.meshlet("l4", "out", ports["ml_out"], ports["ml_in"], d))
            spawn(
                "meshlet-noresume-out",
                [*pb.meshlet("l4", "out", ports["mln_out"], ports["ml_in"], d), "--no-resume"],
            )
            if args.baseline is not None:
                src = args.baseline.resolve()

                def baseline(side: str, listen: int, target: int, *extra: str) -> list[str]:
                    argv = pb.meshlet("l4", side, listen, target, d)
                    argv[1] = str(src / "bench" / "proxy_sidecar.py")
                    return ["env", f"PYTHONPATH={src}", *argv, *extra]

                spawn("baseline-in", baseline("in", ports["bl_in"], base))
                spawn("baseline-out", baseline("out", ports["bl_out"], ports["bl_in"]))
                spawn(
                    "baseline-noresume-out",
                    baseline("out", ports["bln_out"], ports["bl_in"], "--no-resume"),
                )
            haproxy("haproxy-in", "in", ports["ht_in"], base)
            haproxy("haproxy-out", "out", ports["ht_out"], ports["ht_in"])
            haproxy("haproxy-noreuse-out", "out", ports["htn_out"], ports["ht_in"], reuse=False)
            for port in ports.values():
                pb.wait_port(port)
            runs: dict[str, list[dict[str, float]]] = {w: [] for w in workloads}
            plan = {
                "meshlet full": (ports["mln_out"], "meshlet-noresume-out", "meshlet-in"),
                "haproxy full": (ports["htn_out"], "haproxy-noreuse-out", "haproxy-in"),
                "meshlet resumed": (ports["ml_out"], "meshlet-out", "meshlet-in"),
                "haproxy resumed": (ports["ht_out"], "haproxy-out", "haproxy-in"),
            }
            if args.baseline is not None:
                plan["baseline full"] = (ports["bln_out"], "baseline-noresume-out", "baseline-in")
                plan["baseline resumed"] = (ports["bl_out"], "baseline-out", "baseline-in")
            for port, _, _ in plan.values():
                pb.wrk(port, 1, conns=16, close=True)  # warm-up: imports, first sessions
            for r in range(args.rounds):
                # Alternate the order each round: neither pair always runs first.
                order = workloads if r % 2 == 0 else tuple(reversed(workloads))
                for w in order:
                    port, client, server = plan[w]
                    runs[w].append(_measure(port, args.seconds, procs[client], procs[server]))
            if args.profile is not None:
                profile(
                    args.profile,
                    args.seconds,
                    ports,
                    procs,
                    args.meshlet_profiler,
                    kind=args.profile_kind,
                )
        finally:
            pb.stop_all(procs.values())
    med = {w: {k: statistics.median(run[k] for run in runs[w]) for k in runs[w][0]} for w in runs}
    print("| workload | conn/s (median) | each round | client µs/conn | server µs/conn |")
    print("|---|---:|---|---:|---:|")
    for w in workloads:
        each = ", ".join(f"{run['conn_s']:.0f}" for run in runs[w])
        m = med[w]
        print(f"| {w} | {m['conn_s']:.0f} | {each} | {m['client_us']:.0f} | "
              f"{m['server_us']:.0f} |")  # fmt: skip
    ratios = {
        f"{who} {kind}": med[f"{who} {kind}"]["conn_s"] / max(1.0, med[f"haproxy {kind}"]["conn_s"])
        for who in ("meshlet", "baseline") if f"{who} full" in med
        for kind in ("full", "resumed")
    }  # fmt: skip
    print("\nratios to haproxy: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print(f"(logs: {logs})")
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": runs, "median": med, "ratios": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
