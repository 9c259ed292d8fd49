"""Max RPS of the HTTP pairs alone: meshlet's HTTP pair against haproxy's, same mTLS hop.

    .venv/bin/python bench/http_rps.py [--rounds 5] [--seconds 4] [--base-port 26000]
        [--kind http|l4] [--baseline SRC] [--sidecar-python PY] [--profile DIR] [--json FILE]

`make bench`'s max-RPS row for the HTTP variants (bench/run.py step 2) without the rest:
nginx, a meshlet HTTP pair and a haproxy HTTP pair (`http-reuse always`) in proxy_bench's
topology (wrk on CPU 0, sidecars and nginx on CPU 1). `wrk -t1 -c32` per round, rounds
interleaved (order reversed every other round) so a slow spell of the shared box hits each
pair alike; per pair the median RPS and the CPU per request of the client and the server
sidecar (schedstat over the run).

`--kind l4`: the L4 pairs instead (meshlet `connect.l4` against haproxy `mode tcp`), the same
keep-alive requests relayed as bytes. `--baseline SRC` runs a second meshlet pair from another
source tree (`git archive <commit> | tar -x -C SRC`) in the same rounds: a before/after in one
run. `--sidecar-python` runs the meshlet sidecars on another interpreter
(`.venv-mypyc/bin/python`: the compiled build, `make compiled`). `--profile DIR`: one more run
per pair under `perf record`, each sidecar's samples per DSO (µs per request) and its top
symbols written to DIR. Prints a markdown table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import proxy_bench as pb

PAIRS = ("meshlet", "haproxy")


def _measure(port: int, seconds: int, client: pb.Proc, server: pb.Proc) -> dict[str, float]:
    before = (pb.cpu_ns(client.pid), pb.cpu_ns(server.pid))
    run = pb.wrk(port, seconds, conns=32)
    after = (pb.cpu_ns(client.pid), pb.cpu_ns(server.pid))
    requests = max(1.0, run["rps"] * seconds)
    return {
        "rps": run["rps"],
        "client_us": (after[0] - before[0]) / 1e3 / requests,
        "server_us": (after[1] - before[1]) / 1e3 / requests,
    }


def _dso_table(data: Path, requests: float) -> str:
    """Samples per DSO as µs per request (perf's sample period is 1/999 s) and the top
    symbols."""
    done = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--stdio", "--sort", "dso",
         "-g", "none", "-n", "--percent-limit", "0.5"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    rows = ["| DSO | % | µs/request |", "|---|---:|---:|"]
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].endswith("%") and not line.startswith("#"):
            share, samples, dso = parts[0], int(parts[1]), " ".join(parts[2:])
            rows.append(f"| {dso} | {share} | {samples / 999 * 1e6 / requests:.1f} |")
    syms = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--stdio", "--sort", "dso,sym",
         "-g", "none", "--percent-limit", "1"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    top = [ln for ln in syms.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
    return "\n".join(rows) + "\n\n```\n" + "\n".join(top[:30]) + "\n```\n"


def profile(out: Path, seconds: int, plan: dict[str, tuple[int, pb.Proc, pb.Proc]]) -> None:
    if shutil.which("perf") is None:
        print("profile: perf not found")
        return
    out.mkdir(parents=True, exist_ok=True)
    for pair, (port, client, server) in plan.items():
        recorders = []
        for side, proc in (("out", client), ("in", server)):
            data = out / f"{pair}-{side}.data"
            argv = ["perf", "record", "-F", "999", "-g", "-p", str(proc.pid), "-o", str(data)]
            argv += ["--", "sleep", str(seconds + 1)]
            recorders.append(
                (subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), data)
            )
        time.sleep(0.5)
        run = pb.wrk(port, seconds, conns=32)
        requests = max(1.0, run["rps"] * seconds)
        for rec, data in recorders:
            rec.wait(timeout=60)
            summary = f"{data.stem}: {run['rps']:.0f} RPS during the profile\n\n"
            data.with_suffix(".md").write_text(summary + _dso_table(data, requests))
            print(f"profile: {data.with_suffix('.md')}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--base-port", type=int, default=26000)
    ap.add_argument("--kind", choices=("http", "l4"), default="http")
    ap.add_argument("--baseline", type=Path, help="another meshlet source tree, same rounds")
    ap.add_argument("--sidecar-python", help="the interpreter of the meshlet sidecars")
    ap.add_argument("--profile", type=Path)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if args.sidecar_python:
        pb.PY = os.path.abspath(args.sidecar_python)  # not resolved: a venv python is a link
    base = args.base_port
    ports = {"direct": base, "ml_out": base + 2, "ml_in": base + 12, "ht_out": base + 4,
             "ht_in": base + 14}  # fmt: skip
    pairs: tuple[str, ...] = PAIRS
    if args.baseline is not None:
        ports |= {"bl_out": base + 7, "bl_in": base + 17}
        pairs += ("baseline",)
    logs = Path(tempfile.mkdtemp(prefix="meshlet-http-rps-logs-"))
    procs: dict[str, pb.Proc] = {}
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in pairs}
    with tempfile.TemporaryDirectory(prefix="meshlet-http-rps-") as tmp:
        d = Path(tmp)
        pb.make_certs(d)

        def spawn(name: str, argv: list[str]) -> None:
            procs[name] = pb.spawn(name, argv, pb.SUT_CPU, logs / f"{name}.log")

        def haproxy(name: str, side: str, listen: int, target: int) -> None:
            mode = "http" if args.kind == "http" else "tcp"
            conf = pb.haproxy_conf(d, name, mode=mode, listen=listen, target=target, side=side)
            spawn(name, ["haproxy", "-db", "-f", str(conf)])

        try:
            spawn("nginx", ["nginx", "-p", str(d), "-c", str(pb.nginx_conf(d, base))])
            spawn("meshlet-in", pb.meshlet(args.kind, "in", ports["ml_in"], base, d))
            spawn("meshlet-out", pb.meshlet(args.kind, "out", ports["ml_out"], ports["ml_in"], d))
            if args.baseline is not None:
                src = args.baseline.resolve()

                def baseline(side: str, listen: int, target: int) -> list[str]:
                    argv = pb.meshlet(args.kind, side, listen, target, d)
                    argv[1] = str(src / "bench" / "proxy_sidecar.py")
                    return ["env", f"PYTHONPATH={src}", *argv]

                spawn("baseline-in", baseline("in", ports["bl_in"], base))
                spawn("baseline-out", baseline("out", ports["bl_out"], ports["bl_in"]))
            haproxy("haproxy-in", "in", ports["ht_in"], base)
            haproxy("haproxy-out", "out", ports["ht_out"], ports["ht_in"])
            for port in ports.values():
                pb.wait_port(port)
            plan = {
                "meshlet": (ports["ml_out"], procs["meshlet-out"], procs["meshlet-in"]),
                "haproxy": (ports["ht_out"], procs["haproxy-out"], procs["haproxy-in"]),
            }
            if args.baseline is not None:
                plan["baseline"] = (ports["bl_out"], procs["baseline-out"], procs["baseline-in"])
            for port, _, _ in plan.values():
                pb.wrk(port, 1, conns=32)  # warm-up: imports, pooled connections
            for r in range(args.rounds):
                order = pairs if r % 2 == 0 else tuple(reversed(pairs))
                for pair in order:
                    port, client, server = plan[pair]
                    runs[pair].append(_measure(port, args.seconds, client, server))
            if args.profile is not None:
                profile(args.profile, args.seconds, plan)
        finally:
            pb.stop_all(procs.values())
    med = {p: {k: statistics.median(run[k] for run in runs[p]) for k in runs[p][0]} for p in runs}
    print("| pair | RPS (median) | each round | client µs/req | server µs/req |")
    print("|---|---:|---|---:|---:|")
    for pair in pairs:
        each = ", ".join(f"{run['rps']:.0f}" for run in runs[pair])
        m = med[pair]
        print(f"| {pair} | {m['rps']:.0f} | {each} | {m['client_us']:.1f} | "
              f"{m['server_us']:.1f} |")  # fmt: skip
    ratios = {p: med[p]["rps"] / max(1.0, med["haproxy"]["rps"]) for p in pairs if p != "haproxy"}
    print("\nratios to haproxy: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print(f"(logs: {logs})")
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": runs, "median": med, "ratios": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
