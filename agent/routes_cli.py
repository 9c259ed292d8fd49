"""`meshlet routes`: Istio VirtualService, DestinationRule and PeerAuthentication in, Consul
routing config entries out.

    translate  print the entries (JSON list, or HCL) the input becomes
    apply      translate and write to Consul with CAS, touching only what the input is about
               (the safety rules of `meshlet intentions apply`), showing a diff first

Istio features Consul has no field for (per-try timeout, fault injection, mirroring) are
carried in the router's Meta under meshlet.io/route.<n>.* keys, with a warning (other Consul
proxies ignore them); --strict refuses them. Problems are printed one per line on stderr and
exit with status 2: nothing is written when anything cannot be translated exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The translators are imported by the commands that run them: the parser is built by every
# `meshlet` process, the long-running agent and sidecar included.
if TYPE_CHECKING:
    from traffic.from_istio import Translation
    from traffic.istio_apply import ApplyOptions, Facts

EXIT_PROBLEMS = 2


class _Refused(Exception):
    def __init__(self, lines: Iterable[str]) -> None:
        self.lines = tuple(lines)
        super().__init__("\n".join(self.lines))


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "routes",
        help="translate Istio VirtualService/DestinationRule/PeerAuthentication to Consul "
        "routing config entries, apply",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmds = p.add_subparsers(dest="routes_command", required=True, metavar="COMMAND")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "-f",
            "--file",
            dest="files",
            action="append",
            required=True,
            metavar="FILE",
            help="Istio YAML: VirtualService, DestinationRule, PeerAuthentication (repeatable)",
        )
        q.add_argument(
            "--strict",
            action="store_true",
            help="refuse Istio features carried in meshlet.io/ Meta keys (per-try timeout, "
            "fault injection, mirroring) instead of warning that other proxies ignore them",
        )
        q.add_argument(
            "--callers",
            default="",
            metavar="LIST",
            help="comma-separated services whose service-defaults get a DestinationRule's "
            "connection pool and outlier detection (Consul holds them per calling service)",
        )
        q.add_argument(
            "--single-namespace",
            metavar="NS",
            default=None,
            help="Consul CE has one namespace: the Istio namespace it stands for. Without it, "
            "Istio namespace N is Consul namespace N (Enterprise namespace mirroring)",
        )
        q.add_argument(
            "--root-namespace",
            default="istio-system",
            help="Istio root namespace: its namespace-wide PeerAuthentication is mesh-wide "
            "(default %(default)s)",
        )
        q.add_argument(
            "--cluster-domain",
            default="cluster.local",
            help="Kubernetes cluster domain of NAME.NS.svc.DOMAIN hosts (default %(default)s)",
        )

    t = cmds.add_parser("translate", help="print the Consul config entries")
    common(t)
    t.add_argument("--format", choices=("json", "hcl"), default="json")
    t.set_defaults(routes_run=_translate)

    a = cmds.add_parser("apply", help="translate and write to Consul (CONSUL_HTTP_* env)")
    common(a)
    a.add_argument(
        "--services",
        default="",
        metavar="LIST",
        help="comma-separated services: apply only what the input says about these",
    )
    a.add_argument("--dry-run", action="store_true", help="print the diff, write nothing")
    a.add_argument(
        "--prune",
        action="store_true",
        help="replace or remove fields meshlet did not write (default: keep them, and warn)",
    )
    a.set_defaults(routes_run=_apply)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Entry point from agent.cli: runs the subcommand, maps refusals to exit 2."""
    from traffic.from_istio import RoutesError
    from traffic.istio_apply import PlanRefused

    try:
        return int(args.routes_run(args))
    except (_Refused, RoutesError, PlanRefused) as err:
        lines = err.lines if isinstance(err, _Refused) else err.problems
        for line in lines:
            print(line, file=sys.stderr)
        if isinstance(err, PlanRefused):
            print("nothing was written", file=sys.stderr)
        return EXIT_PROBLEMS


def _names(text: str, flag: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(filter(None, (part.strip() for part in text.split(",")))))
    for name in names:
        if "/" in name or ":" in name:
            raise _Refused([f"{flag}: {name!r}: expected a service name"])
    return names


def _translation(args: argparse.Namespace) -> Translation:
    from traffic.from_istio import TranslateOptions, translate_texts

    texts = []
    problems = []
    for name in args.files:
        try:
            texts.append((name, Path(name).read_text()))
        except (OSError, UnicodeDecodeError) as err:
            problems.append(f"{name}: cannot read: {getattr(err, 'strerror', None) or err}")
    if problems:
        raise _Refused(problems)
    options = TranslateOptions(
        strict=args.strict,
        callers=_names(args.callers, "--callers"),
        single_namespace=args.single_namespace,
        root_namespace=args.root_namespace,
        cluster_domain=args.cluster_domain,
    )
    translation = translate_texts(texts, options)
    for warning in translation.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return translation


def _translate(args: argparse.Namespace) -> int:
    from intentions.render import body_hcl

    translation = _translation(args)
    if args.format == "hcl":
        print("\n".join(body_hcl(e) for e in translation.entries), end="")
    else:
        print(json.dumps(list(translation.entries), indent=2))
    return 0


def _apply(args: argparse.Namespace) -> int:
    from traffic.istio_apply import ApplyOptions

    translation = _translation(args)
    services = frozenset(_names(args.services, "--services")) if args.services else None
    for scope in translation.scopes:
        if scope.namespace != "default":
            raise _Refused(
                [
                    f"{scope.source}: Consul namespace {scope.namespace!r}: apply writes Consul "
                    "CE's one namespace; pass --single-namespace"
                ]
            )
    return asyncio.run(_apply_async(args, translation, ApplyOptions(services, args.prune)))


async def _apply_async(
    args: argparse.Namespace, translation: Translation, options: ApplyOptions
) -> int:
    from agent.consul import ConsulClient
    from agent.consul_errors import ConsulError
    from traffic.istio_apply import Key, format_plan, plan_apply

    failed: list[str] = []
    try:
        async with ConsulClient.from_env() as consul:
            current: dict[Key, Mapping[str, Any]] = {}
            for kind, _ns, name in sorted(
                {(s.kind, s.namespace, s.name) for s in translation.scopes}
            ):
                found = await consul.config_entries.find(kind, name)
                if found is not None:
                    current[(kind, "default", name)] = found
            facts = await _facts(consul, translation)
            plan = plan_apply(translation, current, facts, options)
            for warning in plan.warnings:
                print(f"warning: {warning}", file=sys.stderr)
            print(format_plan(plan), end="")
            for change in plan.changes:
                if args.dry_run or change.action == "unchanged":
                    continue
                if change.action == "delete":
                    done = await consul.config_entries.delete(
                        change.kind, change.name, cas=change.cas
                    )
                else:
                    done = await consul.config_entries.put(change.body, cas=change.cas)
                if not done:
                    failed.append(change.label)
                    # Later entries may depend on this one (a router on its resolver's subsets).
                    break
                print(f"{change.label} {'deleted' if change.action == 'delete' else 'written'}")
    except ConsulError as err:
        raise _Refused([f"consul: {err}"]) from None
    if failed:
        raise _Refused(
            [
                f"{label}: changed in Consul since it was read (CAS failed); run apply again"
                for label in failed
            ]
        )
    return 0


async def _facts(consul: Any, translation: Translation) -> Facts:
    """Protocols when routers or splitters are written; the mesh entry when permissive is."""
    from traffic.from_istio import PROXY_DEFAULTS, ROUTER, SERVICE_DEFAULTS, SPLITTER
    from traffic.istio_apply import Facts

    kinds = {e["Kind"] for e in translation.entries}
    protocols: dict[str, str] = {}
    mesh_protocol = ""
    if kinds & {ROUTER, SPLITTER}:
        for entry in (await consul.config_entries.list(SERVICE_DEFAULTS)).value:
            protocols[str(entry["Name"])] = str(entry.get("Protocol") or "")
        proxy = await consul.config_entries.find(PROXY_DEFAULTS, "global")
        mesh_protocol = str(((proxy or {}).get("Config") or {}).get("protocol") or "")
    permissive: bool | None = None
    if any(e.get("MutualTLSMode") == "permissive" for e in translation.entries):
        mesh = await consul.config_entries.find("mesh", "mesh")
        permissive = bool((mesh or {}).get("AllowEnablingPermissiveMutualTLS"))
    return Facts(protocols, mesh_protocol.lower(), permissive)
