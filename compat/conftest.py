"""Replacement for py-consul 1.8.0's root conftest.py: the same fixtures, backed by `meshlet dev`.

compat/run.py copies this file over the sdist's own conftest.py; nothing else in the sdist is
touched. Upstream starts a `hashicorp/consul` Docker container per test; here each test gets a
fresh `meshlet dev` subprocess instead. Fixture names and shapes, the readiness probe and the
ACL variant are kept as upstream has them, so the test files run unmodified.

Environment (set by compat/run.py; the defaults let pytest be run by hand from the sdist root):
  MESHLET_BIN          the meshlet executable (default: next to this interpreter, i.e. the venv's)
  MESHLET_COMPAT_LOGS  where per-test server logs go (default: ../logs, i.e. .compat/logs)
"""

from __future__ import annotations

import collections
import errno
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NoReturn

import pytest
import requests
from requests import RequestException

# The suite's HTTP checks hard-code http://localhost:8500 and http://127.0.0.1:8500 (inside
# Docker that is the agent itself), so the server must listen on exactly this port. Tests
# therefore cannot run in parallel, which is why compat/run.py runs them serially.
HTTP_HOST = "127.0.0.1"
HTTP_PORT = 8500

# Upstream parametrizes every server fixture over three Consul releases; we have one server.
# The real version string the tests branch on comes from /v1/agent/self, as upstream does it.
CONSUL_VERSIONS = ["meshlet-dev"]

# Same shape as upstream, with a process handle where upstream has a container.
ConsulInstance = collections.namedtuple("ConsulInstance", ["process", "port", "version"])

STOP_GRACE_SECONDS = 5.0
# Written into a test's log when the server ignored SIGTERM; compat/run.py counts these.
SIGKILL_MARKER = "[compat] server did not exit within 5 s of SIGTERM; sent SIGKILL"

HERE = Path(__file__).resolve().parent
LOGS_DIR = Path(os.environ.get("MESHLET_COMPAT_LOGS", HERE.parent / "logs"))
# Not resolved: the venv's python is a symlink, and its bin/ is where `meshlet` lives.
MESHLET_BIN = os.environ.get("MESHLET_BIN", str(Path(sys.executable).parent / "meshlet"))

# Servers still running (with their log files), so that a crash or Ctrl-C mid-test does not
# leave one holding port 8500.
_live: dict[subprocess.Popen[bytes], IO[bytes]] = {}


@pytest.fixture(scope="session", autouse=True)
def _unset_consul_token() -> None:
    if "CONSUL_HTTP_TOKEN" in os.environ:
        del os.environ["CONSUL_HTTP_TOKEN"]


def pytest_report_header() -> list[str]:
    # Say which `consul` module the tests exercise: with pytest's default import mode the sdist
    # root is on sys.path, so it is the sdist's copy (run.py checks it is byte-identical to the
    # installed py-consul 1.8.0).
    import consul

    return [
        f"consul module: {Path(consul.__file__).parent}",
        f"server: {MESHLET_BIN} dev --http-addr {HTTP_HOST}:{HTTP_PORT} --enable-script-checks",
        f"server logs: {LOGS_DIR}",
    ]


def pytest_unconfigure() -> None:
    for proc, log in list(_live.items()):
        _stop(proc, log)


def _ensure_port_free() -> None:
    """Fail clearly if something already listens on 8500 (the server would fail to bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR so TIME_WAIT leftovers of the previous test's server do not count;
        # on Linux bind still fails while another socket is listening on the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HTTP_HOST, HTTP_PORT))
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    # Outside the except block, so the report is this message and not a chained traceback.
    pytest.fail(
        f"port {HTTP_PORT} on {HTTP_HOST} is already in use; the py-consul suite "
        f"hard-codes http://127.0.0.1:{HTTP_PORT} in its HTTP checks, so stop whatever "
        f"listens there (a Consul agent, another `meshlet dev`?) and run again",
        pytrace=False,
    )


def _stop(proc: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    """SIGTERM, wait up to 5 s, then SIGKILL. A process that already exited is fine."""
    _live.pop(proc, None)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            log.write(f"\n{SIGKILL_MARKER}\n".encode())
    if not log.closed:
        log.write(f"\n[compat] server exit status: {proc.returncode}\n".encode())
        log.close()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def start_meshlet_dev(
    log_path: Path, acl_master_token: str | None = None
) -> tuple[subprocess.Popen[bytes], int, IO[bytes]]:
    """Start `meshlet dev` and wait until it is ready, with upstream's readiness logic.

    Upstream's `start_consul_container`: ACLs are enabled with `acl_master_token` as the
    initial management token when one is given. Returns the process, its HTTP port and the
    open log file (closed by `_stop`).
    """
    _ensure_port_free()
    cmd = [
        MESHLET_BIN,
        "dev",
        "--http-addr",
        f"{HTTP_HOST}:{HTTP_PORT}",
        # Upstream sets "enable_script_checks": true (test_agent_checks runs /bin/true).
        "--enable-script-checks",
    ]
    if acl_master_token:
        cmd += ["--acl-initial-management-token", acl_master_token]

    log = log_path.open("wb")
    log.write(f"[compat] {' '.join(cmd)}\n".encode())
    log.flush()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    except OSError as exc:
        log.close()
        pytest.fail(f"cannot start {MESHLET_BIN} ({exc}); run `make install`", pytrace=False)
    _live[proc] = log

    def give_up(reason: str) -> NoReturn:
        _stop(proc, log)
        pytest.fail(f"{reason}; last server output:\n{_tail(log_path)}", pytrace=False)

    # Wait for the server to be ready (upstream: 0.1 s poll, 10 s global timeout).
    base_uri = f"http://127.0.0.1:{HTTP_PORT}/v1/"
    start_time = time.time()
    global_timeout = 10

    while True:
        if time.time() - start_time > global_timeout:
            give_up("meshlet dev: no leader within 10 s (GET /v1/status/leader)")
        # Not upstream: a server that died is reported at once, with its output, instead of
        # waiting out the timeout.
        if proc.poll() is not None:
            give_up(f"meshlet dev exited during startup with status {proc.returncode}")
        time.sleep(0.1)
        try:
            response = requests.get(base_uri + "status/leader", timeout=2)
            if response.status_code == 200 and response.json():
                break
        except RequestException:
            # Also catches a non-JSON body: requests' JSONDecodeError is a RequestException.
            continue

    # Additional check to ensure the server is fully ready (upstream, unchanged).
    for _ in range(10):
        try:
            requests.put(
                base_uri + "agent/service/register", json={"name": "test-service"}, timeout=2
            )
            response = requests.get(base_uri + "health/service/test-service", timeout=2)
            if response.status_code == 200 and response.json():
                requests.put(base_uri + "agent/service/deregister/test-service", timeout=2)
                return proc, HTTP_PORT, log
        except RequestException:
            time.sleep(0.5)

    give_up(
        "failed to verify meshlet dev startup: PUT /v1/agent/service/register "
        '{"name": "test-service"} then GET /v1/health/service/test-service never gave '
        "a non-empty 200"
    )


def get_consul_version(port: int) -> str:
    base_uri = f"http://127.0.0.1:{port}/v1/"
    response = requests.get(base_uri + "agent/self", timeout=10)
    return str(response.json()["Config"]["Version"]).strip()


def setup_and_teardown_consul(
    request: pytest.FixtureRequest, version: str, acl_master_token: str | None = None
) -> Iterator[Any]:
    # Start the server with its output going to logs/<test name>.log, yield, stop it.
    del version  # the pseudo-version only names the parameter; the real one is asked below
    LOGS_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOGS_DIR / f"{request.node.name}.log"
    proc, port, log = start_meshlet_dev(log_path, acl_master_token=acl_master_token)
    try:
        reported_version = get_consul_version(port)
        instance = ConsulInstance(proc, port, reported_version)
        yield instance if acl_master_token is None else (instance, acl_master_token)
    finally:
        # test_agent_leave makes the server exit by itself; _stop copes with that.
        _stop(proc, log)


@pytest.fixture(params=CONSUL_VERSIONS)
def consul_instance(request: pytest.FixtureRequest) -> Iterator[ConsulInstance]:
    yield from setup_and_teardown_consul(request, version=request.param)


@pytest.fixture(params=CONSUL_VERSIONS)
def acl_consul_instance(request: pytest.FixtureRequest) -> Iterator[tuple[ConsulInstance, str]]:
    acl_master_token = uuid.uuid4().hex
    yield from setup_and_teardown_consul(
        request, version=request.param, acl_master_token=acl_master_token
    )


@pytest.fixture
def consul_port(consul_instance: ConsulInstance) -> tuple[int, str]:
    return consul_instance.port, consul_instance.version
