"""`meshlet --version` and `meshlet version` as processes: the installed distribution's
version, Python, both OpenSSLs and every runtime dependency."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import ssl
import subprocess

from tests.integration.test_agent_process import ENV, MESHLET

RUNTIME = ("aiohttp", "cryptography", "httptools", "pyyaml", "uvloop", "hvac")


def _run(*args: str) -> str:
    done = subprocess.run(
        [MESHLET, *args], capture_output=True, text=True, env=ENV, timeout=30, check=False
    )
    assert (done.returncode, done.stderr) == (0, "")
    return done.stdout


def test_dash_dash_version_is_one_line() -> None:
    out = _run("--version")
    assert out == (
        f"meshlet {importlib.metadata.version('meshlet')} "
        f"(Python {platform.python_version()}, {ssl.OPENSSL_VERSION})\n"
    )


def test_version_lists_python_openssl_and_dependencies() -> None:
    out = _run("version").splitlines()
    assert out[0] == f"meshlet {importlib.metadata.version('meshlet')}"
    assert out[1].startswith(f"Python {platform.python_version()} (CPython) at ")
    assert out[2] == f"{ssl.OPENSSL_VERSION} (Python's ssl module: the proxy's TLS)"
    assert out[3].startswith("OpenSSL ") and out[3].endswith(
        "(cryptography: certificates and keys)"
    )
    for name in RUNTIME:
        assert f"  {name} {importlib.metadata.version(name)}" in out

    info = json.loads(_run("version", "--json"))
    assert info["meshlet"] == importlib.metadata.version("meshlet")
    assert info["openssl"] == ssl.OPENSSL_VERSION
    assert {n: importlib.metadata.version(n) for n in RUNTIME}.items() <= info[
        "dependencies"
    ].items()
    assert "pytest" not in info["dependencies"]  # the test extra is not what runs
