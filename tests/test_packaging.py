"""The built wheel, not the checkout, provides meshlet's packages and its console script."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agent", "connect", "intentions", "traffic", "devstack")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("meshlet-*.whl")
    return built


@pytest.mark.timeout(300)
def test_wheel_holds_the_packages_typed_and_the_script(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in PACKAGES:
        assert f"{pkg}/__init__.py" in names
        assert f"{pkg}/py.typed" in names
    assert "devstack/endpoints/__init__.py" in names
    # `meshlet install systemd` renders these: the wheel, not the checkout, must carry them.
    for unit in ("meshlet-sidecar@.service", "meshlet-agent.service", "app-after-sidecar.conf"):
        assert f"agent/units/{unit}" in names
    # `meshlet demo` applies these.
    assert "agent/demo/examples/canary-virtualservice.yaml" in names
    assert "agent/demo/examples/payment-authorizationpolicy.yaml" in names
    assert not any(n.startswith(("tests/", "compat/")) for n in names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "meshlet = agent.cli:main" in text


@pytest.mark.timeout(300)
def test_installed_wheel_imports_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    code = (
        "import agent, connect, intentions, traffic, devstack.server, importlib.resources;"
        "units = importlib.resources.files('agent').joinpath('units');"
        "assert units.joinpath('meshlet-sidecar@.service').read_text().startswith('# meshlet');"
        "print(devstack.server.__file__)"
    )
    done = subprocess.run(
        [sys.executable, "-P", "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PYTHONSAFEPATH": "1"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert Path(done.stdout.strip()).is_relative_to(target)
