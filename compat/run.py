"""`make compat`: run py-consul 1.8.0's own test suite against `meshlet dev`.

Downloads the py-consul sdist from PyPI into .compat/ (reused on later runs), extracts it
afresh, puts compat/conftest.py in place of its root conftest.py and runs the agent, catalog,
health, kv, status, connect, config, discovery-chain, acl, txn, session and asyncio
(tests/test_aio.py) test files with this interpreter's pytest, serially. Prints
`N passed, N failed` (errors count as failed) and exits non-zero if anything failed.

Usage: .venv/bin/python compat/run.py [extra pytest arguments, e.g. -k test_kv -x]
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

PY_CONSUL_VERSION = "1.8.0"
SDIST_NAME = f"py_consul-{PY_CONSUL_VERSION}.tar.gz"
# PyPI never lets a released file change, so a pinned digest catches a corrupt or truncated
# cached download (and anything else posing as it).
SDIST_SHA256 = "ed9ab0adb335d33ea84f7622f372411f8e288bb09aee5e7632264d28d285a52c"

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".compat"
SRC = WORK / f"py_consul-{PY_CONSUL_VERSION}"
LOGS = WORK / "logs"
JUNIT = WORK / "results.xml"
LOCK = WORK / "run.lock"
OUR_CONFTEST = ROOT / "compat" / "conftest.py"

TEST_FILES = [
    "tests/api/test_agent.py",
    "tests/api/test_catalog.py",
    "tests/api/test_health.py",
    "tests/api/test_kv.py",
    "tests/api/test_status.py",
    "tests/api/test_connect.py",
    "tests/api/test_config.py",
    "tests/api/test_discovery_chain.py",
    "tests/api/test_acl.py",
    "tests/api/test_txn.py",
    "tests/api/test_session.py",
    # The asyncio client (consul.aio): KV, /v1/txn, agent services and sessions.
    "tests/test_aio.py",
]

# The conftest starts every server on 127.0.0.1:8500 (the suite hard-codes that port).
HTTP_PORT = 8500
# Must match compat/conftest.py's SIGKILL_MARKER prefix.
SIGKILL_MARKER = "[compat] server did not exit within 5 s of SIGTERM"
PER_TEST_TIMEOUT_SECONDS = 120


class Abort(Exception):
    """A precondition failed; the message says what to do."""


def check_environment() -> Path:
    """Check we run in the project venv with py-consul 1.8.0; return the meshlet executable."""
    if sys.prefix == sys.base_prefix:
        raise Abort("run this with the project venv: `make compat` or `.venv/bin/python ...`")
    try:
        installed = importlib.metadata.version("py-consul")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed != PY_CONSUL_VERSION:
        raise Abort(
            f"the venv has py-consul {installed}, expected {PY_CONSUL_VERSION} "
            "(from the test extras); run `make install`"
        )
    # bin/ of the venv, deliberately not resolved: the venv's python is a symlink.
    meshlet = Path(sys.executable).parent / "meshlet"
    if not meshlet.exists():
        raise Abort(f"{meshlet} not found; run `make install`")
    return meshlet


def check_port_free() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: only a live listener makes bind fail, not TIME_WAIT leftovers.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", HTTP_PORT))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise Abort(
                f"port {HTTP_PORT} is in use; the py-consul suite hard-codes "
                f"http://127.0.0.1:{HTTP_PORT}, so stop whatever listens there "
                "(a Consul agent, a `meshlet dev`?) and run again"
            ) from None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_sdist() -> Path:
    """Return the py-consul sdist in .compat/, downloading it from PyPI unless already there."""
    target = WORK / SDIST_NAME
    if target.exists() and sha256(target) == SDIST_SHA256:
        return target
    WORK.mkdir(exist_ok=True)
    print(f"compat: downloading py-consul=={PY_CONSUL_VERSION} sdist from PyPI", flush=True)
    # Download into a scratch dir and move into place only once verified, so an interrupted
    # download is never mistaken for a cached one.
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                f"py-consul=={PY_CONSUL_VERSION}",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--dest",
                tmp,
                "--quiet",
                "--disable-pip-version-check",
            ],
            check=True,
        )
        downloaded = Path(tmp) / SDIST_NAME
        if not downloaded.exists():
            raise Abort(f"pip download did not produce {SDIST_NAME}: {os.listdir(tmp)}")
        if sha256(downloaded) != SDIST_SHA256:
            raise Abort(f"{SDIST_NAME} from PyPI does not have the expected SHA-256")
        downloaded.replace(target)
    return target


def extract(sdist: Path) -> None:
    """Extract the sdist afresh (no leftovers from earlier runs) and put our conftest in."""
    if SRC.exists():
        shutil.rmtree(SRC)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            top = member.name.split("/", 1)[0]
            if top != SRC.name:
                raise Abort(f"unexpected path in {sdist.name}: {member.name}")
        # The "data" filter (3.11.4+) refuses links and paths that escape the target.
        if hasattr(tarfile, "data_filter"):
            tar.extractall(WORK, filter="data")
        else:
            tar.extractall(WORK)
    # The only change to the sdist: its root conftest.py (Docker launcher) becomes ours.
    shutil.copyfile(OUR_CONFTEST, SRC / "conftest.py")


def check_same_client() -> Path:
    """Check the sdist's consul/ is byte-identical to the installed py-consul; return the latter.

    pytest's default import mode puts the sdist root on sys.path (its conftest.py and
    `tests` package live there), so the tests import the sdist's copy of `consul`. Insisting
    on identity makes that the same code as the installed py-consul 1.8.0 of our test extras.
    """
    spec = importlib.util.find_spec("consul")
    if spec is None or not spec.submodule_search_locations:
        raise Abort("the `consul` package is not importable in the venv; run `make install`")
    installed = Path(next(iter(spec.submodule_search_locations)))
    bundled = SRC / "consul"

    def sources(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.py"))}

    ours, theirs = sources(installed), sources(bundled)
    differing = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if differing:
        raise Abort(
            f"installed consul package ({installed}) differs from the sdist's in: "
            f"{', '.join(differing)}; another `consul` distribution (python-consul2?) may "
            "have overwritten it, reinstall with `make clean install`"
        )
    return installed


def run_pytest(meshlet: Path, extra_args: list[str]) -> int:
    if LOGS.exists():
        shutil.rmtree(LOGS)
    LOGS.mkdir(parents=True)
    JUNIT.unlink(missing_ok=True)
    # CONSUL_HTTP_ADDR / CONSUL_HTTP_SSL / ... would redirect py-consul's clients away from
    # the server under test (upstream's conftest only clears CONSUL_HTTP_TOKEN).
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    env["MESHLET_BIN"] = str(meshlet)
    env["MESHLET_COMPAT_LOGS"] = str(LOGS)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *TEST_FILES,
        f"--rootdir={SRC}",
        # Serial: every server binds port 8500, so no xdist even if it were installed.
        "-p",
        "no:xdist",
        # Keep the extracted tree free of caches between runs.
        "-p",
        "no:cacheprovider",
        # Upstream's addopts ask for pytest-cov (--cov ...), which the suite does not need.
        "-o",
        "addopts=",
        # A wedged server must not hang the run; the signal method still runs fixture
        # teardown, so the server is stopped and port 8500 freed for the next test.
        f"--timeout={PER_TEST_TIMEOUT_SECONDS}",
        "--timeout-method=signal",
        "-v",
        "-rfEs",
        "--tb=short",
        f"--junitxml={JUNIT}",
        *extra_args,
    ]
    print(f"compat: {' '.join(cmd)}  (in {SRC})", flush=True)
    return subprocess.run(cmd, cwd=SRC, env=env, check=False).returncode


OUT_OF_SCOPE = Path(__file__).resolve().parent / "out_of_scope.txt"


@dataclass
class Results:
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def read_results() -> Results:
    """Classify each test case once: a setup/teardown error counts as a failure."""
    results = Results()
    for case in ET.parse(JUNIT).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        tags = {child.tag for child in case}
        if tags & {"failure", "error"}:
            results.failed.append(name)
        elif "skipped" in tags:
            results.skipped.append(name)
        else:
            results.passed.append(name)
    return results


def wait_for_other_runs() -> IO[str]:
    """Take .compat/run.lock; it is held while the returned file stays open.

    Two runs at once would wipe each other's extracted tree and logs and fight over port 8500,
    so a second run waits for the first instead.
    """
    WORK.mkdir(exist_ok=True)
    lock = LOCK.open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        print(f"compat: waiting for another compat run (pid {holder}) to finish", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def main(argv: list[str]) -> int:
    try:
        meshlet = check_environment()
        lock = wait_for_other_runs()
    except Abort as exc:
        print(f"compat: {exc}", file=sys.stderr)
        return 2
    with lock:  # closing the file releases the lock
        return run_locked(meshlet, argv)


def run_locked(meshlet: Path, argv: list[str]) -> int:
    try:
        check_port_free()
        extract(fetch_sdist())
        client = check_same_client()
    except (Abort, subprocess.CalledProcessError) as exc:
        print(f"compat: {exc}", file=sys.stderr)
        return 2
    print(f"compat: the tests import {SRC / 'consul'}, identical to the installed {client}")

    returncode = run_pytest(meshlet, argv)
    if not JUNIT.exists():
        print(f"compat: pytest exited with {returncode} and wrote no results", file=sys.stderr)
        return 2
    results = read_results()

    killed = [
        p.name
        for p in sorted(LOGS.glob("*.log"))
        if SIGKILL_MARKER in p.read_text(errors="replace")
    ]
    if killed:
        print(f"compat: server ignored SIGTERM for 5 s (needed SIGKILL) in: {', '.join(killed)}")
    print(f"compat: server logs in {LOGS}")
    print(f"{len(results.passed)} passed, {len(results.failed)} failed")
    if results.skipped:
        print(f"{len(results.skipped)} skipped")
    return verdict(results, returncode, read_out_of_scope())


def read_out_of_scope() -> dict[str, str]:
    """compat/out_of_scope.txt: test function name -> why it is expected to fail."""
    listed: dict[str, str] = {}
    for line in OUT_OF_SCOPE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, reason = line.partition(":")
            listed[name.strip()] = reason.strip()
    return listed


def _function(case: str) -> str:
    return case.rpartition("::")[2].partition("[")[0]


def verdict(results: Results, returncode: int, listed: dict[str, str]) -> int:
    expected = [c for c in results.failed if _function(c) in listed]
    unexpected = [c for c in results.failed if _function(c) not in listed]
    fixed = [c for c in results.passed if _function(c) in listed]
    for case in expected:
        print(f"compat: expected failure (out of scope): {case}: {listed[_function(case)]}")
    for case in fixed:
        print(f"compat: {case} passes now: take it off {OUT_OF_SCOPE.name}")
    # pytest exit codes 2-5 (interrupted, internal/usage error, nothing collected) are
    # failures of the run even when no test case failed; exit code 1 means tests failed,
    # which the lists above account for.
    ok = not unexpected and not fixed and returncode in (0, 1) and bool(results.passed)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
