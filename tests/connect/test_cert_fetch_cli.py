"""`meshlet cert fetch` against `meshlet dev` (with its Vault listener), both as real processes."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

MESHLET = shutil.which("meshlet", path=str(Path(sys.executable).parent)) or "meshlet"
TOKEN = "cli-root-token"


@pytest.fixture
def dev_process() -> Iterator[dict[str, str]]:
    proc = subprocess.Popen(
        [
            MESHLET,
            "dev",
            "--http-addr",
            "127.0.0.1:0",
            "--vault-addr",
            "127.0.0.1:0",
            "--vault-token",
            TOKEN,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )
    assert proc.stdout is not None
    banner = [proc.stdout.readline() for _ in range(3)]
    consul_url = banner[0].rsplit(" ", 1)[1].strip()
    vault_url = banner[2].split("Vault PKI API at ", 1)[1].split(",", 1)[0]
    yield {
        "CONSUL_HTTP_ADDR": consul_url.removeprefix("http://"),
        "VAULT_ADDR": vault_url,
        "VAULT_TOKEN": TOKEN,
    }
    proc.terminate()
    proc.communicate(timeout=10)


@pytest.mark.parametrize("source", ["consul", "vault"])
def test_cert_fetch_writes_a_usable_leaf(
    dev_process: dict[str, str], tmp_path: Path, source: str
) -> None:
    out = tmp_path / "certs"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "VAULT_"))}
    result = subprocess.run(
        [MESHLET, "cert", "fetch", "--service", "web", "--source", source, "--out", str(out)],
        env={**env, **dev_process, "PYTHONSAFEPATH": "1"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "PRIVATE KEY" not in result.stdout + result.stderr
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    leaf = x509.load_pem_x509_certificates((out / "cert.pem").read_bytes())[0]
    roots = x509.load_pem_x509_certificates((out / "ca.pem").read_bytes())
    issuer = next(r for r in roots if r.subject == leaf.issuer)
    leaf.verify_directly_issued_by(issuer)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    [uri] = san.get_values_for_type(x509.UniformResourceIdentifier)
    assert uri.endswith("/ns/default/dc/dc1/svc/web")
    assert "PRIVATE KEY" in (out / "key.pem").read_text()


def test_cert_fetch_from_vault_without_credentials_fails_cleanly(
    dev_process: dict[str, str], tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "VAULT_"))}
    env.update(dev_process)
    del env["VAULT_TOKEN"]
    result = subprocess.run(
        [MESHLET, "cert", "fetch", "--service", "web", "--source", "vault", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "no Vault credentials" in result.stderr
    assert not (tmp_path / "key.pem").exists()
