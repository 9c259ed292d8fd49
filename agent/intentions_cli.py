"""`meshlet intentions`: Istio AuthorizationPolicy in, Consul service-intentions out.

    translate  print the entries a policy set becomes (JSON or HCL)
    apply      translate and write to Consul with CAS the entries of the services the
               policies select (never proxies or gateways), showing a diff first
    explain    which policy rule (and which intention) decides one request
    check      evaluate requests (JSON lines on stdin) against policies or Consul entries

Problems are printed one per line on stderr and exit with status 2: nothing is written when
any policy cannot be translated exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

# The translate/apply/check stack is imported by the commands that run it: the parser is
# built by every `meshlet` process, the long-running agent and sidecar included.
if TYPE_CHECKING:
    from intentions.apply import CatalogService, Protocols
    from intentions.check import EntryChecker, PolicyChecker
    from intentions.policy import AuthorizationPolicy
    from intentions.translate import ServiceRef, TranslateOptions, Translation

EXIT_PROBLEMS = 2


class _Refused(Exception):
    """Input the command cannot use; each line is printed on stderr."""

    def __init__(self, lines: Iterable[str]) -> None:
        self.lines = tuple(lines)
        super().__init__("\n".join(self.lines))


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "intentions",
        help="translate Istio AuthorizationPolicy to Consul intentions, apply, explain, check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmds = p.add_subparsers(dest="intentions_command", required=True, metavar="COMMAND")

    def policy_args(q: argparse.ArgumentParser, *, required: bool = True) -> None:
        q.add_argument(
            "-f",
            "--file",
            dest="files",
            action="append",
            required=required,
            default=[],
            metavar="FILE",
            help="AuthorizationPolicy YAML (repeatable)",
        )
        q.add_argument(
            "--trust-domain",
            default="cluster.local",
            help="Istio trust domain of the principals (default %(default)s)",
        )
        q.add_argument(
            "--root-namespace",
            default="istio-system",
            help="Istio root namespace (default %(default)s)",
        )
        q.add_argument(
            "--single-namespace",
            metavar="NS",
            default=None,
            help="Consul CE has one namespace: the Istio namespace it stands for. Without it, "
            "Istio namespace N is Consul namespace N (Enterprise namespace mirroring)",
        )

    t = cmds.add_parser("translate", help="print the service-intentions entries")
    policy_args(t)
    t.add_argument(
        "--services",
        default="",
        metavar="LIST",
        help="comma-separated [namespace/]name[:protocol] the policies may select "
        "(default: the services the selectors name)",
    )
    t.add_argument("--format", choices=("json", "hcl"), default="json")
    t.set_defaults(intentions_run=_translate)

    a = cmds.add_parser("apply", help="translate and write to Consul (CONSUL_HTTP_* env)")
    policy_args(a)
    a.add_argument(
        "--services",
        default="",
        metavar="LIST",
        help="comma-separated [namespace/]name[:protocol]: touch only these of the services "
        "the policies select (default: every one they select; selectors are resolved against "
        "Consul's catalog, protocols read from service-defaults/proxy-defaults)",
    )
    a.add_argument("--dry-run", action="store_true", help="print the diff, write nothing")
    a.add_argument(
        "--prune",
        action="store_true",
        help="remove or replace sources meshlet did not write (default: keep them, and warn)",
    )
    a.add_argument(
        "--allow-drop",
        action="store_true",
        help="apply even when an ALLOW rule is ignored because its service is not HTTP "
        "(default: refuse, since what it allows would be denied)",
    )
    a.set_defaults(intentions_run=_apply)

    e = cmds.add_parser("explain", help="which rule decides one request")
    policy_args(e)
    e.add_argument(
        "--workload",
        required=True,
        metavar="JSON",
        help='{"namespace", "labels", "service_account", "consul_service", "protocol"}',
    )
    e.add_argument("--request", metavar="JSON", help="the request (default: one line of stdin)")
    e.set_defaults(intentions_run=_explain)

    c = cmds.add_parser("check", help="evaluate requests from stdin (JSON lines)")
    policy_args(c, required=False)
    c.add_argument("--workload", metavar="JSON", help="with -f: the workload the policies protect")
    c.add_argument("--entries", metavar="FILE", help="service-intentions entries (a JSON list)")
    c.add_argument("--destination", metavar="JSON", help='with --entries: {"name", "protocol"}')
    c.add_argument(
        "--default-policy",
        choices=("allow", "deny"),
        default="deny",
        help="with --entries: when no intention matches (default %(default)s)",
    )
    c.add_argument("--reason", action="store_true", help="append a tab and the reason")
    c.set_defaults(intentions_run=_check)

    p.set_defaults(run=run)


def run(args: argparse.Namespace, *, stdin: TextIO | None = None) -> int:
    """Entry point from agent.cli: runs the chosen subcommand, maps refusals to exit 2."""
    from intentions.apply import PlanRefused
    from intentions.check import CheckInputError
    from intentions.errors import PolicyError

    try:
        return int(args.intentions_run(args, stdin or sys.stdin))
    except _Refused as err:
        for line in err.lines:
            print(line, file=sys.stderr)
        return EXIT_PROBLEMS
    except PolicyError as err:
        for problem in err.problems:
            print(problem, file=sys.stderr)
        return EXIT_PROBLEMS
    except PlanRefused as err:
        for line in err.problems:
            print(line, file=sys.stderr)
        print("nothing was written", file=sys.stderr)
        return EXIT_PROBLEMS
    except CheckInputError as err:
        print(err, file=sys.stderr)
        return EXIT_PROBLEMS


# ---- inputs ---------------------------------------------------------------------------------


def _options(args: argparse.Namespace) -> TranslateOptions:
    from intentions.translate import TranslateOptions

    return TranslateOptions(
        trust_domain=args.trust_domain,
        root_namespace=args.root_namespace,
        single_namespace=args.single_namespace,
    )


def _policies(files: Sequence[str]) -> tuple[AuthorizationPolicy, ...]:
    from intentions.errors import PolicyError, Problem
    from intentions.policy import load_policies

    found: list[AuthorizationPolicy] = []
    problems: list[Problem] = []
    for name in files:
        try:
            text = Path(name).read_text()
        except OSError as err:
            problems.append(Problem(name, "", f"cannot read: {err.strerror}"))
            continue
        try:
            found.extend(load_policies(text, origin=name))
        except PolicyError as err:
            problems.extend(err.problems)
    if problems:
        raise PolicyError(problems)
    return tuple(found)


def _services(
    text: str, default_namespace: str, default_protocol: str = "http"
) -> list[ServiceRef]:
    from intentions.translate import ServiceRef

    refs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        ref, _, protocol = item.partition(":")
        namespace, _, name = ref.rpartition("/")
        if not name:
            raise _Refused([f"--services: {item!r} is not [namespace/]name[:protocol]"])
        refs.append(ServiceRef(name, namespace or default_namespace, protocol or default_protocol))
    return refs


def _selected_services(policies: Iterable[AuthorizationPolicy], namespace: str) -> list[ServiceRef]:
    """Without --services: the services the policies' `app` selectors name."""
    from intentions.translate import ServiceRef

    names = sorted(
        {
            (p.namespace or namespace, app)
            for p in policies
            if (app := dict(p.match_labels or ()).get("app"))
        }
    )
    return [ServiceRef(name, ns) for ns, name in names]


def _json_arg(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise _Refused([f"{what}: not valid JSON: {err}"]) from None


def _warn(translation: Translation) -> None:
    for warning in translation.warnings:
        print(f"warning: {warning}", file=sys.stderr)


# ---- commands -------------------------------------------------------------------------------


def _translate(args: argparse.Namespace, stdin: TextIO) -> int:
    from intentions.render import entries_hcl, entries_json
    from intentions.translate import translate

    policies = _policies(args.files)
    services = _services(args.services, args.single_namespace or "default") or _selected_services(
        policies, args.single_namespace or "default"
    )
    translation = translate(policies, services, _options(args))
    _warn(translation)
    out = (
        entries_hcl(translation.entries)
        if args.format == "hcl"
        else entries_json(translation.entries)
    )
    print(out)
    return 0


def _apply(args: argparse.Namespace, stdin: TextIO) -> int:
    return asyncio.run(_apply_async(args))


async def _apply_async(args: argparse.Namespace) -> int:
    from agent.consul import ConsulClient
    from agent.consul_errors import ConsulError
    from intentions.apply import ApplyOptions, format_plan, held_entry, plan_apply
    from intentions.entries import KIND
    from intentions.errors import EntryError

    policies = _policies(args.files)
    namespace = args.single_namespace or "default"
    only = None
    if args.services:
        # No protocol given: the one Consul holds, never an assumed http.
        only = {
            (ref.namespace, ref.name): ref.protocol
            for ref in _services(args.services, namespace, default_protocol="")
        }
    options = ApplyOptions(_options(args), namespace, only, args.prune, args.allow_drop)
    try:
        async with ConsulClient.from_env() as consul:
            catalog = await _catalog(consul)
            protocols = await _protocols(consul)
            held = await consul.config_entries.list(KIND)
            current = [held_entry(dict(body)) for body in held.value]
            plan = plan_apply(policies, catalog, protocols, current, options)
            for warning in plan.warnings:
                print(f"warning: {warning}", file=sys.stderr)
            print(format_plan(plan), end="")
            failed = []
            for change in plan.changes:
                if args.dry_run or change.action == "unchanged":
                    continue
                if not await consul.config_entries.put(change.body, cas=change.cas):
                    failed.append(change.label)
                else:
                    print(f"{change.label} written")
    except (ConsulError, EntryError) as err:
        raise _Refused([f"consul: {err}"]) from None
    if failed:
        # Entries are written one by one: the ones before a CAS failure stay written.
        raise _Refused(
            [
                f"{name}: changed in Consul since it was read (CAS failed); run apply again"
                for name in failed
            ]
        )
    return 0


async def _catalog(consul: Any) -> list[CatalogService]:
    """The catalog's service names, each with whether it is a typical service or not."""
    from intentions.apply import CatalogService

    typical = (await consul.catalog.services(filter='ServiceKind == ""')).value
    others = (await consul.catalog.services(filter='ServiceKind != ""')).value
    # The list endpoint does not say which kind: "" or "not typical" is all apply needs.
    return [CatalogService(name) for name in typical] + [
        CatalogService(name, "proxy or gateway") for name in others
    ]


async def _protocols(consul: Any) -> Protocols:
    from intentions.apply import Protocols

    defaults = {
        str(e["Name"]): str(e.get("Protocol") or "")
        for e in (await consul.config_entries.list("service-defaults")).value
    }
    proxy = (await consul.config_entries.list("proxy-defaults")).value
    mesh = str(((proxy[0].get("Config") or {}).get("protocol")) or "") if proxy else ""
    return Protocols(defaults, mesh)


def _explain(args: argparse.Namespace, stdin: TextIO) -> int:
    from intentions.check import PolicyChecker, parse_request, parse_workload

    checker = PolicyChecker.build(
        _policies(args.files),
        parse_workload(_json_arg(args.workload, "--workload")),
        _options(args),
    )
    line = args.request if args.request is not None else stdin.readline()
    decision, rule = checker.explain(parse_request(_json_arg(line, "request")))
    print(f"{decision.action}\t{decision.reason}")
    if decision.intention:
        print(f"intention: {decision.intention}")
    print(f"rule: {rule}")
    return 0


def _check(args: argparse.Namespace, stdin: TextIO) -> int:
    from intentions.check import (
        EntryChecker,
        PolicyChecker,
        format_decision,
        parse_destination,
        parse_request,
        parse_workload,
    )

    checker: PolicyChecker | EntryChecker
    if args.files:
        if args.workload is None:
            raise _Refused(["check -f needs --workload"])
        checker = PolicyChecker.build(
            _policies(args.files),
            parse_workload(_json_arg(args.workload, "--workload")),
            _options(args),
        )
    elif args.entries:
        if args.destination is None:
            raise _Refused(["check --entries needs --destination"])
        try:
            bodies = json.loads(Path(args.entries).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise _Refused([f"{args.entries}: {err}"]) from None
        if not isinstance(bodies, list):
            raise _Refused([f"{args.entries}: expected a JSON list of entries"])
        destination, protocol = parse_destination(_json_arg(args.destination, "--destination"))
        checker = EntryChecker.build(
            bodies, destination, protocol, default_allow=args.default_policy == "allow"
        )
    else:
        raise _Refused(
            ["check needs -f FILE --workload JSON, or --entries FILE --destination JSON"]
        )
    for n, line in enumerate(stdin, start=1):
        if not line.strip():
            continue
        request = parse_request(_json_arg(line, f"stdin line {n}"), f"line {n}")
        print(format_decision(checker.check(request), with_reason=args.reason), flush=True)
    return 0
