"""`meshlet telemetry` as a user runs it: translate prints the proxy-defaults entry (JSON,
HCL) for the Istio Telemetry example, refuses what it cannot translate naming the field
(exit 2, nothing printed), and apply writes it to a real `meshlet dev` with CAS, keeping the
entry's other fields. (tracing-telemetry.yaml is a copy of ../shared/examples'.)"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.integration.test_routes_cli import MESHLET, _call, _entry, consul

__all__ = ["consul"]  # the fixture, reused

EXAMPLE = str(Path(__file__).parent / "tracing-telemetry.yaml")
JAEGER = "http://127.0.0.1:4318/v1/traces"


def _meshlet(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MESHLET, "telemetry", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_translate_prints_the_proxy_defaults_entry() -> None:
    done = _meshlet("translate", "-f", EXAMPLE, "--provider", f"jaeger={JAEGER}")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "Kind": "proxy-defaults",
        "Name": "global",
        "Config": {"tracing": {"otlp_endpoint": JAEGER, "sampling_percent": 10.0}},
    }
    hcl = _meshlet("translate", "-f", EXAMPLE, "--provider", f"jaeger={JAEGER}", "--format", "hcl")
    assert hcl.returncode == 0, hcl.stderr
    assert 'Kind = "proxy-defaults"' in hcl.stdout
    assert "sampling_percent = 10.0" in hcl.stdout or "sampling_percent = 10" in hcl.stdout


def test_the_example_alone_names_the_otlp_default_endpoint_and_says_so() -> None:
    """The issue's own command: Istio keeps the provider's address in MeshConfig, so without
    --provider the entry names OpenTelemetry's default endpoint, with a warning."""
    done = _meshlet("translate", "-f", EXAMPLE)
    assert done.returncode == 0, done.stderr
    tracing = json.loads(done.stdout)["Config"]["tracing"]
    assert tracing == {
        "otlp_endpoint": "http://localhost:4318/v1/traces",
        "sampling_percent": 10.0,
    }
    assert "provider 'jaeger'" in done.stderr and "--provider jaeger=URL" in done.stderr


def test_untranslatable_input_exits_2_naming_the_field(tmp_path: Path) -> None:

    odd = tmp_path / "odd.yaml"
    odd.write_text(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\n"
        "metadata: {name: t, namespace: istio-system}\n"
        "spec:\n  accessLogging: [{providers: [{name: envoy}]}]\n"
        "  tracing:\n  - providers: [{name: jaeger}]\n    randomSamplingPercentage: 150\n"
        "    customTags: {a: {literal: {value: b}}}\n"
    )
    done = _meshlet("translate", "-f", str(odd), "--provider", f"jaeger={JAEGER}")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "spec.accessLogging: not supported" in done.stderr
    assert "spec.tracing[0].customTags: not supported" in done.stderr
    assert "sampling_percent: 150 is outside 0-100" in done.stderr

    done = _meshlet("translate", "-f", EXAMPLE, "--provider", "jaeger=collector:4318")
    assert done.returncode == 2
    assert "otlp_endpoint" in done.stderr


def test_apply_writes_with_cas_and_keeps_the_rest(
    consul: tuple[str, dict[str, str]],
) -> None:
    base, env = consul
    assert _call(
        base,
        "PUT",
        "/v1/config",
        {
            "Kind": "proxy-defaults",
            "Name": "global",
            "Config": {"protocol": "http"},
            "AccessLogs": {"Enabled": True},
        },
    )
    args = ("-f", EXAMPLE, "--provider", f"jaeger={JAEGER}")
    dry = _meshlet("apply", *args, "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "+ {" in dry.stdout
    assert (_entry(base, "proxy-defaults", "global") or {})["Config"] == {"protocol": "http"}
    done = _meshlet("apply", *args, env=env)
    assert done.returncode == 0, done.stderr
    assert "written" in done.stdout
    entry = _entry(base, "proxy-defaults", "global") or {}
    assert entry["Config"] == {
        "protocol": "http",
        "tracing": {"otlp_endpoint": JAEGER, "sampling_percent": 10.0},
    }
    assert entry["AccessLogs"]["Enabled"] is True
    again = _meshlet("apply", *args, env=env)
    assert again.returncode == 0, again.stderr
    assert "unchanged" in again.stdout
