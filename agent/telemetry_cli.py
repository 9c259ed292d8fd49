"""`meshlet telemetry`: an Istio Telemetry resource's tracing in, the proxy-defaults entry
that configures meshlet's sidecars the same way out.

    meshlet telemetry translate -f tracing-telemetry.yaml --provider jaeger=http://jaeger:4318/v1/traces
    meshlet telemetry apply     -f tracing-telemetry.yaml --provider jaeger=...   (CAS, diff)

What translates: a mesh-wide Telemetry (in the root namespace, no selector) with one
`spec.tracing` item naming one provider, `randomSamplingPercentage` and
`disableSpanReporting`. The provider's address lives in Istio's MeshConfig
(`extensionProviders`), not in the resource, so `--provider NAME=URL` gives its OTLP/HTTP
endpoint; without it the entry names OpenTelemetry's default endpoint (a collector on each
node, `http://localhost:4318/v1/traces`) and a warning says so. Anything else (metrics,
access logging, custom tags, match modes, a selector) is refused naming the field: nothing
is printed or written unless all of it translates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from connect.tracing_settings import parse_tracing

__all__ = ["add_parser", "translate_telemetry"]

EXIT_PROBLEMS = 2
PROXY_DEFAULTS = "proxy-defaults"
_TRACING_FIELDS = frozenset({"providers", "randomSamplingPercentage", "disableSpanReporting"})
OTLP_DEFAULT_ENDPOINT = "http://localhost:4318/v1/traces"
"""OTEL_EXPORTER_OTLP_TRACES_ENDPOINT's default in the OpenTelemetry specification."""


class TelemetryRefused(Exception):
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def translate_telemetry(
    docs: list[tuple[str, Any]],
    providers: Mapping[str, str],
    root_namespace: str = "istio-system",
    warnings: list[str] | None = None,
) -> dict[str, Any]:
    """(source, parsed YAML document) pairs -> the proxy-defaults entry. Raises
    `TelemetryRefused` listing every field that cannot be translated; what was assumed is
    appended to `warnings`."""
    problems: list[str] = []
    tracing: dict[str, Any] | None = None
    for source, doc in docs:
        if doc is None:
            continue
        where = source
        if not isinstance(doc, Mapping):
            problems.append(f"{where}: not a YAML object")
            continue
        kind = doc.get("kind")
        api = str(doc.get("apiVersion", ""))
        meta = doc.get("metadata") or {}
        name = meta.get("name", "?") if isinstance(meta, Mapping) else "?"
        where = f"{source}: Telemetry {name}"
        if kind != "Telemetry" or not api.startswith("telemetry.istio.io/"):
            problems.append(f"{source}: {kind or 'a document'} ({api}): only Telemetry translates")
            continue
        namespace = meta.get("namespace", root_namespace) if isinstance(meta, Mapping) else ""
        if namespace != root_namespace:
            problems.append(
                f"{where}: metadata.namespace {namespace!r}: only a mesh-wide Telemetry (in "
                f"{root_namespace!r}) becomes proxy-defaults; a service's own settings go in "
                "its sidecar registration's Proxy.Config.tracing"
            )
        spec = doc.get("spec") or {}
        if not isinstance(spec, Mapping):
            problems.append(f"{where}: spec: not an object")
            continue
        for key in sorted(set(spec) - {"tracing"}):
            problems.append(f"{where}: spec.{key}: not supported (only spec.tracing translates)")
        items = spec.get("tracing")
        if not isinstance(items, list) or len(items) != 1 or not isinstance(items[0], Mapping):
            problems.append(f"{where}: spec.tracing: expected exactly one item")
            continue
        item = items[0]
        for key in sorted(set(item) - _TRACING_FIELDS):
            problems.append(f"{where}: spec.tracing[0].{key}: not supported")
        block: dict[str, Any] = {}
        named = item.get("providers") or []
        if not isinstance(named, list) or len(named) != 1 or not isinstance(named[0], Mapping):
            problems.append(f"{where}: spec.tracing[0].providers: expected exactly one provider")
        else:
            provider = str(named[0].get("name", ""))
            for key in sorted(set(named[0]) - {"name"}):
                problems.append(f"{where}: spec.tracing[0].providers[0].{key}: not supported")
            if not provider:
                problems.append(f"{where}: spec.tracing[0].providers[0].name: missing")
            elif provider not in providers:
                block["otlp_endpoint"] = OTLP_DEFAULT_ENDPOINT
                if warnings is not None:
                    warnings.append(
                        f"{where}: provider {provider!r}: its address is in Istio's MeshConfig, "
                        f"not in this resource; using OpenTelemetry's default "
                        f"{OTLP_DEFAULT_ENDPOINT} (a collector on each node). Pass --provider "
                        f"{provider}=URL for another."
                    )
            else:
                block["otlp_endpoint"] = providers[provider]
        if "randomSamplingPercentage" in item:
            block["sampling_percent"] = item["randomSamplingPercentage"]
        if item.get("disableSpanReporting") is True:
            block["otlp_endpoint"] = ""
        try:
            parse_tracing(block, f"{where}: spec.tracing[0] ->")
        except ValueError as exc:
            problems.append(str(exc))
        if tracing is not None:
            problems.append(f"{where}: a second mesh-wide Telemetry: give one")
        tracing = block
    if tracing is None and not problems:
        problems.append("no Telemetry resource in the input")
    if problems:
        raise TelemetryRefused(problems)
    assert tracing is not None
    if isinstance(tracing.get("sampling_percent"), int | float):
        tracing["sampling_percent"] = float(tracing["sampling_percent"])
    return {"Kind": PROXY_DEFAULTS, "Name": "global", "Config": {"tracing": tracing}}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "telemetry",
        help="translate an Istio Telemetry resource's tracing to the proxy-defaults entry",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmds = p.add_subparsers(dest="telemetry_command", required=True, metavar="COMMAND")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("-f", "--file", dest="files", action="append", required=True)
        q.add_argument(
            "--provider",
            action="append",
            default=[],
            metavar="NAME=URL",
            help="the OTLP/HTTP traces endpoint of a provider the Telemetry names (repeatable)",
        )
        q.add_argument("--root-namespace", default="istio-system")

    t = cmds.add_parser("translate", help="print the proxy-defaults entry")
    common(t)
    t.add_argument("--format", choices=("json", "hcl"), default="json")
    t.set_defaults(telemetry_run=_translate)
    a = cmds.add_parser("apply", help="write it to Consul (CAS), keeping the entry's other fields")
    common(a)
    a.add_argument("--dry-run", action="store_true", help="print the diff, write nothing")
    a.set_defaults(telemetry_run=_apply)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        return int(args.telemetry_run(args))
    except TelemetryRefused as err:
        for line in err.problems:
            print(line, file=sys.stderr)
        return EXIT_PROBLEMS


def _entry(args: argparse.Namespace) -> dict[str, Any]:
    problems: list[str] = []
    providers: dict[str, str] = {}
    for given in args.provider:
        name, eq, url = given.partition("=")
        if not eq or not name or not url:
            problems.append(f"--provider {given!r}: expected NAME=URL")
        providers[name] = url
    docs: list[tuple[str, Any]] = []
    for name in args.files:
        try:
            docs += [(name, d) for d in yaml.safe_load_all(Path(name).read_text())]
        except (OSError, UnicodeDecodeError) as err:
            problems.append(f"{name}: cannot read: {getattr(err, 'strerror', None) or err}")
        except yaml.YAMLError as err:
            problems.append(f"{name}: not YAML: {err}")
    if problems:
        raise TelemetryRefused(problems)
    warnings: list[str] = []
    entry = translate_telemetry(docs, providers, args.root_namespace, warnings)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    return entry


def _translate(args: argparse.Namespace) -> int:
    # Imported when it runs: the parser is built by every `meshlet` process, the long-running
    # agent and sidecar included.
    from intentions.render import body_hcl

    entry = _entry(args)
    if args.format == "hcl":
        print(body_hcl(entry), end="")
    else:
        print(json.dumps(entry, indent=2))
    return 0


def _apply(args: argparse.Namespace) -> int:
    return asyncio.run(_apply_async(args, _entry(args)))


async def _apply_async(args: argparse.Namespace, entry: dict[str, Any]) -> int:
    from agent.consul import ConsulClient
    from agent.consul_errors import ConsulError

    try:
        async with ConsulClient.from_env() as consul:
            current = await consul.config_entries.find(PROXY_DEFAULTS, "global")
            body = _merged(current, entry)
            before = json.dumps((dict(current or {}).get("Config") or {}).get("tracing"))
            after = json.dumps(body["Config"]["tracing"])
            if before == after:
                print("proxy-defaults global: Config.tracing unchanged")
                return 0
            print(f"proxy-defaults global: Config.tracing\n- {before}\n+ {after}")
            if args.dry_run:
                return 0
            cas = int((current or {}).get("ModifyIndex") or 0)
            if not await consul.config_entries.put(body, cas=cas):
                raise TelemetryRefused(
                    ["proxy-defaults global: changed in Consul since it was read (CAS failed)"]
                )
            print("proxy-defaults global written")
    except ConsulError as err:
        raise TelemetryRefused([f"consul: {err}"]) from None
    return 0


def _merged(current: Mapping[str, Any] | None, entry: dict[str, Any]) -> dict[str, Any]:
    """The entry in Consul with Config.tracing replaced; every other field kept."""
    if current is None:
        return entry
    body = {k: v for k, v in current.items() if k not in ("CreateIndex", "ModifyIndex", "Hash")}
    config = dict(body.get("Config") or {})
    config["tracing"] = entry["Config"]["tracing"]
    body["Config"] = config
    return body
