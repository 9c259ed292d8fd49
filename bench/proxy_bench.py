"""The sidecar-pair topology of `make bench` (bench/run.py drives it; see bench/README.md).

Topology, all on 127.0.0.1: load generator on CPU 0; both sidecars and the nginx upstream
(`return 200 "hello"`, plus /bulk and /upload) on CPU 1 (taskset). Variants, each a client
sidecar -> mTLS (TLS 1.3, ECDSA P-256, client certificate required) -> server sidecar -> nginx:

    direct        nginx itself
    meshlet-http  connect.http1 pair (per-request intentions on, pooled mTLS)
    meshlet-l4    connect.l4 pair (per-connection intentions)
    haproxy-http  mode http, http-reuse always
    haproxy-tcp   mode tcp

Here: the certificates, the configurations, process spawning and the /proc and wrk readings.
`profile_summary` condenses a py-spy raw profile (`py-spy record --format raw`) of a sidecar.
"""

from __future__ import annotations

import collections
import datetime
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
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


def stop_all(procs: Iterable[Proc], grace: float = 5.0) -> None:
    """SIGTERM to every process at once, then wait for each; SIGKILL after `grace` seconds."""
    procs = list(procs)
    for p in procs:
        p.popen.terminate()
    for p in procs:
        try:
            p.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait()


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
    sendfile on;
    client_body_temp_path {d}/nginx-body;
    proxy_temp_path {d}/nginx-proxy;
    fastcgi_temp_path {d}/nginx-fastcgi;
    uwsgi_temp_path {d}/nginx-uwsgi;
    scgi_temp_path {d}/nginx-scgi;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{ default_type text/plain; return 200 "hello"; }}
        # The bulk download: a sparse file sent with sendfile, so nginx costs next to nothing.
        location = /bulk {{ default_type application/octet-stream; alias {d}/bulk.bin; }}
        # The upload: nginx reads the whole body into memory before it answers (a `return`
        # would answer first and discard the rest, which a proxy may rightly cut short).
        location = /upload {{
            client_max_body_size 0;
            client_body_buffer_size 128m;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_pass http://127.0.0.1:{port}/sink;
        }}
        location = /sink {{ return 200 "ok"; }}
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


# ---- environment ---------------------------------------------------------------------------


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


def version(argv: list[str]) -> str:
    done = subprocess.run(argv, check=False, capture_output=True, text=True)
    return (done.stdout or done.stderr).strip().splitlines()[0]
