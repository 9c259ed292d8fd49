"""The sidecar-pair benchmark: meshlet vs haproxy, one run (topology: bench/README.md).

    .venv/bin/python bench/proxy_bench.py [--quick] [--out bench/results]

Topology, all on 127.0.0.1: load generator on CPU 0; both sidecars and the nginx upstream
(`return 200 "hello"`) on CPU 1 (taskset). Variants, each a client sidecar -> mTLS (TLS 1.3,
ECDSA P-256, client certificate required) -> server sidecar -> nginx:

    direct        nginx itself
    meshlet-http  connect.http1 pair (per-request intentions on, pooled mTLS)
    meshlet-l4    connect.l4 pair (per-connection intentions)
    haproxy-http  mode http, http-reuse always
    haproxy-tcp   mode tcp

Workloads: max RPS (`wrk -t1 -c32`, closed loop), added p50/p99 over direct at 2,000 RPS
(open loop, proxy_loadgen.py), CPU per request per sidecar during that run (schedstat), RSS
per sidecar, and new connections per second with full mTLS handshakes (`wrk -H "Connection:
close"` on the L4 pairs; haproxy with `no-ssl-reuse`). A py-spy profile of the meshlet HTTP
client sidecar is taken during its max-RPS run. Results: a markdown table on stdout and
JSON + profile under --out. Ratios are against haproxy from this same run; nothing here
asserts a time.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HERE = Path(__file__).resolve().parent
PY = sys.executable
TRUST_DOMAIN = "11111111-2222-3333-4444-555555555555.consul"
LOAD_CPU, SUT_CPU = "0", "1"


# ---- certificates --------------------------------------------------------------------------


def _write_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_certs(d: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshlet bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for svc in ("api", "web"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, svc)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(svc),
                        x509.UniformResourceIdentifier(
                            f"spiffe://{TRUST_DOMAIN}/ns/default/dc/dc1/svc/{svc}"
                        ),
                    ]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM)
        (d / f"{svc}.crt").write_bytes(pem)
        (d / f"{svc}.key").write_bytes(_write_key(key))
        (d / f"{svc}.pem").write_bytes(pem + _write_key(key))  # haproxy's crt format


# ---- processes -----------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    role: str = ""  # "sidecar" for the ones we measure

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class Variant:
    name: str
    port: int
    sidecars: list[Proc] = field(default_factory=list)


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def spawn(name: str, argv: list[str], cpu: str, log: Path) -> Proc:
    out = log.open("wb")
    popen = subprocess.Popen(["taskset", "-c", cpu, *argv], stdout=out, stderr=subprocess.STDOUT)
    return Proc(name, popen)


def child_pid(proc: Proc) -> int:
    # taskset execs the command, so the pid is the program's own.
    return proc.pid


def nginx_conf(d: Path, port: int) -> Path:
    conf = d / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log stderr warn;
user root;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {d}/nginx-body;
    proxy_temp_path {d}/nginx-proxy;
    fastcgi_temp_path {d}/nginx-fastcgi;
    uwsgi_temp_path {d}/nginx-uwsgi;
    scgi_temp_path {d}/nginx-scgi;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{ default_type text/plain; return 200 "hello"; }}
    }}
}}
"""
    )
    return conf


def haproxy_conf(
    d: Path, name: str, *, mode: str, listen: int, target: int, side: str, reuse: bool = True
) -> Path:
    conf = d / f"haproxy-{name}.cfg"
    common = f"""
global
    nbthread 1
    maxconn 4000
    ssl-server-verify required
defaults
    mode {mode}
    timeout connect 5s
    timeout client 60s
    timeout server 60s
"""
    if side == "out":
        alpn = " alpn http/1.1" if mode == "http" else ""
        reuse_line = "    http-reuse always\n" if mode == "http" else ""
        no_reuse = " no-ssl-reuse" if not reuse else ""
        body = f"""
frontend fe
    bind 127.0.0.1:{listen}
    default_backend be
backend be
{reuse_line}    server s1 127.0.0.1:{target} ssl crt {d}/web.pem ca-file {d}/ca.crt \
        verify required verifyhost api sni str(api){alpn}{no_reuse}
"""
    else:
        alpn = " alpn http/1.1" if mode == "http" else ""
        body = f"""
frontend fe
    bind 127.0.0.1:{listen} ssl crt {d}/api.pem ca-file {d}/ca.crt verify required{alpn}
    default_backend be
backend be
    server app 127.0.0.1:{target}
"""
    conf.write_text(common + body)
    return conf


def meshlet(kind: str, side: str, listen: int, target: int, d: Path) -> list[str]:
    svc = "web" if side == "out" else "api"
    return [
        PY, str(HERE / "proxy_sidecar.py"), "--kind", kind, "--side", side,
        "--listen", str(listen), "--target", f"127.0.0.1:{target}", "--ca", str(d / "ca.crt"),
        "--cert", str(d / f"{svc}.crt"), "--key", str(d / f"{svc}.key"),
        "--trust-domain", TRUST_DOMAIN,
    ]  # fmt: skip


# ---- measurements --------------------------------------------------------------------------


def cpu_ns(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        total += int((task / "schedstat").read_text().split()[0])
    return total


def rss_kb(pid: int) -> tuple[int, int]:
    text = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    hwm = int(re.search(r"VmHWM:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    return rss, hwm


def wrk(port: int, seconds: int, conns: int = 32, close: bool = False) -> dict[str, float]:
    argv = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{port}/")
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock_err = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps,
        "non2xx": float(errors.group(1)) if errors else 0.0,
        "socket_errors": sock_err.group(1) if sock_err else "",  # type: ignore[dict-item]
    }


def loadgen(port: int, rate: int, conns: int, duration: float, warmup: float) -> dict[str, float]:
    argv = [
        "taskset", "-c", LOAD_CPU, PY, str(HERE / "proxy_loadgen.py"), "--port", str(port),
        "--rate", str(rate), "--conns", str(conns), "--duration", str(duration),
        "--warmup", str(warmup),
    ]  # fmt: skip
    done = subprocess.run(argv, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen on port {port} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def profile_summary(raw: Path, top: int = 15) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [re.sub(r" \(.*?/(?=[^/]*$)", " (", f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    lines = [f"samples: {total}", "", "| self % | function |", "|---:|---|"]
    for name, n in own.most_common(top):
        lines.append(f"| {100 * n / total:.1f} | `{name}` |")
    lines += ["", "| inclusive % | function |", "|---:|---|"]
    ours = ("(http1", "(l4", "(balancer", "(proxy", "(inbound", "(http1_headers")
    for name, n in incl.most_common():
        if any(tag in name for tag in ours):
            lines.append(f"| {100 * n / total:.1f} | `{name}` |")
        if len(lines) > 2 * top + 8:
            break
    return "\n".join(lines)


# ---- the run -------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter runs (about 1 minute)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--base-port", type=int, default=24000)
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    for tool in ("nginx", "haproxy", "wrk", "taskset"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"missing {tool}: apt-get install -y haproxy nginx wrk", file=sys.stderr)
            return 2
    os.environ["PATH"] += ":/usr/sbin"
    wrk_s, w1_s, w1_warm, conn_s = (3, 4, 1, 3) if args.quick else (6, 8, 2, 5)
    args.out.mkdir(parents=True, exist_ok=True)
    b = args.base_port
    ports = {
        "nginx": b, "direct": b,
        "mh_out": b + 1, "mh_in": b + 11, "ml_out": b + 2, "ml_in": b + 12,
        "hh_out": b + 3, "hh_in": b + 13, "ht_out": b + 4, "ht_in": b + 14,
        "htn_out": b + 5, "mln_out": b + 6,
    }  # fmt: skip
    procs: list[Proc] = []
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="meshlet-bench-") as tmp:
        d = Path(tmp)
        make_certs(d)
        logs = args.out / "logs"
        logs.mkdir(exist_ok=True)
        try:
            procs.append(spawn("nginx", ["nginx", "-p", str(d), "-c", str(nginx_conf(d, b))],
                               SUT_CPU, logs / "nginx.log"))  # fmt: skip
            variants = [Variant("direct", ports["direct"])]

            def ours(kind: str) -> Callable[[str, int, int], list[str]]:
                return lambda side, listen, target: meshlet(kind, side, listen, target, d)

            def theirs(mode: str) -> Callable[[str, int, int], list[str]]:
                def argv(side: str, listen: int, target: int) -> list[str]:
                    conf = haproxy_conf(
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
            for name, key, argv in layout:
                server = spawn(f"{name}-in", argv("in", ports[f"{key}_in"], b), SUT_CPU,
                               logs / f"{name}-in.log")  # fmt: skip
                client = spawn(f"{name}-out", argv("out", ports[f"{key}_out"], ports[f"{key}_in"]),
                               SUT_CPU, logs / f"{name}-out.log")  # fmt: skip
                procs += [server, client]
                variants.append(Variant(name, ports[f"{key}_out"], [client, server]))
            noreuse = haproxy_conf(
                d, "tcpn-out", mode="tcp", listen=ports["htn_out"], target=ports["ht_in"],
                side="out", reuse=False,
            )  # fmt: skip
            htn = spawn(
                "haproxy-tcp-noreuse-out",
                ["haproxy", "-db", "-f", str(noreuse)],
                SUT_CPU,
                logs / "haproxy-tcp-noreuse.log",
            )
            procs.append(htn)
            # A second meshlet L4 client sidecar with resumption off: full handshakes.
            mln = spawn(
                "meshlet-l4-noresume-out",
                [*meshlet("l4", "out", ports["mln_out"], ports["ml_in"], d), "--no-resume"],
                SUT_CPU,
                logs / "meshlet-l4-noresume-out.log",
            )
            procs.append(mln)
            for port in ports.values():
                wait_port(port)
            for v in variants:
                results[v.name] = {"rss_idle_kb": [rss_kb(p.pid)[0] for p in v.sidecars]}

            # W1: open loop, 2,000 RPS, 16 connections; CPU per request from schedstat.
            for v in variants:
                before = sum(cpu_ns(p.pid) for p in v.sidecars)
                t0 = time.monotonic()
                lg = loadgen(v.port, 2000, 16, w1_s, w1_warm)
                cpu = sum(cpu_ns(p.pid) for p in v.sidecars) - before
                wall = time.monotonic() - t0
                results[v.name]["w1"] = lg
                if v.sidecars:
                    # All requests in the window (warm-up included) over both sidecars.
                    per_req_us = cpu / 1e3 / max(1, lg["completed"]) / len(v.sidecars)
                    results[v.name]["cpu_us_per_req_per_sidecar"] = per_req_us
                    results[v.name]["w1_wall_s"] = wall

            # W2: closed-loop max RPS.
            for v in variants:
                wrk(v.port, 1)  # warm-up: pools, TLS sessions
                results[v.name]["w2"] = wrk(v.port, wrk_s)
                hwm = [rss_kb(p.pid) for p in v.sidecars]
                results[v.name]["rss_after_w2_kb"] = [r for r, _ in hwm]
                results[v.name]["hwm_kb"] = [h for _, h in hwm]

            # Where the time goes: py-spy on our HTTP client sidecar in an extra max-load
            # run (not the measured one: sampling costs the target a little).
            spy_bin = shutil.which("py-spy") or str(Path(PY).with_name("py-spy"))
            if not args.no_profile and Path(spy_bin).exists():
                client = next(v for v in variants if v.name == "meshlet-http").sidecars[0]
                spy = subprocess.Popen(
                    [spy_bin, "record", "--pid", str(client.pid), "--duration", str(wrk_s),
                     "--rate", "250", "--format", "raw", "--nonblocking", "--output",
                     str(args.out / "profile-meshlet-http-out.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                wrk(ports["mh_out"], wrk_s)
                spy.wait(timeout=60)

            # W4: new connections with full mTLS handshakes (L4 pairs).
            def fresh(port: int) -> dict[str, float]:
                return wrk(port, conn_s, conns=16, close=True)

            results["meshlet-l4"]["w4"] = fresh(ports["ml_out"])
            results["meshlet-l4"]["w4_no_resume"] = fresh(ports["mln_out"])
            results["haproxy-tcp"]["w4_no_ssl_reuse"] = fresh(ports["htn_out"])
            results["haproxy-tcp"]["w4_default"] = fresh(ports["ht_out"])
        finally:
            for p in procs:
                p.popen.terminate()
            for p in procs:
                try:
                    p.popen.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.popen.kill()

    env = {
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": version(["openssl", "version"]),
        "haproxy": version(["haproxy", "-v"]),
        "nginx": version(["nginx", "-v"]),
        "quick": args.quick,
    }
    report = {"env": env, "results": results}
    (args.out / "proxy-bench.json").write_text(json.dumps(report, indent=2, default=str))
    table = render(results)
    prof = args.out / "profile-meshlet-http-out.txt"
    if prof.exists() and prof.stat().st_size:
        summary = profile_summary(prof)
        (args.out / "profile-summary.md").write_text(summary + "\n")
        table += "\n\nProfile, meshlet HTTP client sidecar under max load (py-spy):\n\n" + summary
    (args.out / "proxy-bench.md").write_text(table + "\n")
    print(json.dumps(env))
    print(table)
    return 0


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


def version(argv: list[str]) -> str:
    done = subprocess.run(argv, check=False, capture_output=True, text=True)
    return (done.stdout or done.stderr).strip().splitlines()[0]


def render(r: dict[str, dict[str, object]]) -> str:
    def g(name: str, *path: str) -> float:
        cur: object = r.get(name, {})
        for p in path:
            cur = cur.get(p, float("nan")) if isinstance(cur, dict) else float("nan")
        return float(cur)  # type: ignore[arg-type]

    d50, d99 = g("direct", "w1", "p50_ms"), g("direct", "w1", "p99_ms")
    rows = [
        "| variant | max RPS (wrk -c32) | ratio vs haproxy | p50 / p99 at 2k RPS (ms) "
        "| added p50 / p99 (ms) | CPU µs/req/sidecar at 2k "
        "| RSS per sidecar idle / after W2 (MB) |",
        "|---|---:|---:|---|---|---:|---|",
    ]
    peers = {"meshlet-http": "haproxy-http", "meshlet-l4": "haproxy-tcp"}
    for name in ("direct", "meshlet-http", "haproxy-http", "meshlet-l4", "haproxy-tcp"):
        if name not in r:
            continue
        rps = g(name, "w2", "rps")
        ratio = ""
        if name in peers:
            ratio = f"{100 * rps / g(peers[name], 'w2', 'rps'):.0f} %"
        p50, p99 = g(name, "w1", "p50_ms"), g(name, "w1", "p99_ms")
        added = "-" if name == "direct" else f"+{p50 - d50:.3f} / +{p99 - d99:.3f}"
        cpu = r[name].get("cpu_us_per_req_per_sidecar")
        idle = r[name].get("rss_idle_kb") or []
        after = r[name].get("rss_after_w2_kb") or []
        rss = (
            " / ".join(
                f"{a / 1024:.1f}→{b / 1024:.1f}"
                for a, b in zip(idle, after, strict=False)  # type: ignore[call-overload]
            )
            or "-"
        )
        rows.append(
            f"| {name} | {rps:,.0f} | {ratio} | {p50:.3f} / {p99:.3f} | {added} | "
            f"{'-' if cpu is None else f'{cpu:.1f}'} | {rss} |"
        )
    ours = g("meshlet-l4", "w4", "rps")
    ours_full = g("meshlet-l4", "w4_no_resume", "rps")
    full = g("haproxy-tcp", "w4_no_ssl_reuse", "rps")
    resumed = g("haproxy-tcp", "w4_default", "rps")
    rows += [
        "",
        "| new mTLS connections/s (wrk -c16, Connection: close, L4) | conn/s | ratio |",
        "|---|---:|---:|",
        f"| meshlet-l4, full handshakes (--no-resume) | {ours_full:,.0f} "
        f"| {100 * ours_full / full:.0f} % of haproxy no-ssl-reuse |",
        f"| haproxy-tcp no-ssl-reuse | {full:,.0f} | |",
        f"| meshlet-l4, session resumption (default) | {ours:,.0f} "
        f"| {100 * ours / resumed:.0f} % of haproxy default |",
        f"| haproxy-tcp default (backend session reuse) | {resumed:,.0f} | |",
    ]  # fmt: skip
    errs = {n: (r[n].get("w1", {}) or {}).get("errors", 0) for n in r}  # type: ignore[union-attr]
    rows.append(f"\nopen-loop errors per variant: {errs}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
