"""The `meshlet` command line."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from agent.cert_cli import add_cert

log = logging.getLogger("meshlet")


def _add_dev(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dev",
        help="run the embedded Consul-compatible dev control plane (like `consul agent -dev`)",
        description="Run devstack in the foreground: Consul's HTTP API, all state in memory.",
    )
    p.add_argument("--http-addr", default="127.0.0.1:8500", help="HOST:PORT (default %(default)s)")
    p.add_argument(
        "--acl-initial-management-token",
        metavar="TOKEN",
        default=None,
        help="enable ACLs with this management token",
    )
    p.add_argument(
        "--acl-default-policy",
        choices=("allow", "deny"),
        default="allow",
        help="what the anonymous token may do when ACLs are on (default %(default)s)",
    )
    p.add_argument(
        "--default-intention-policy",
        choices=("allow", "deny"),
        default=None,
        help="intention default when no intention matches (default: follows ACLs)",
    )
    p.add_argument("--datacenter", default="dc1")
    p.add_argument("--node-name", default="meshlet-dev")
    p.add_argument(
        "--enable-script-checks",
        action="store_true",
        help="allow script checks registered over the HTTP API",
    )
    p.add_argument("--vault-addr", metavar="HOST:PORT", default=None, help="also serve Vault PKI")
    p.add_argument("--vault-token", metavar="TOKEN", default=None, help="Vault root token")
    p.add_argument(
        "--ca-change-delay",
        metavar="SECONDS",
        type=float,
        default=0.0,
        help="after a CA root change, keep serving the old leaves this long before re-signing "
        "(Consul waits a random 0-30 s; default %(default)s)",
    )
    p.add_argument(
        "--leaf-cert-ttl",
        metavar="SECONDS",
        type=float,
        default=None,
        help="lifetime of the leaves the Connect CA signs (Consul's LeafCertTTL, default 72h); "
        "seconds are allowed, so tests and soaks can rotate leaves every few seconds",
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(run=_run_dev)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run the mesh demo on devstack (ends by itself in under two minutes)",
        description="Start devstack, five small apps and their `meshlet sidecar`s, apply the "
        "Istio examples through meshlet's translators, then show mTLS identities, an "
        "authorization denial, the canary split, a retry and the sidecars' metrics, each "
        "judged by what really happened. Steps whose feature this build lacks are skipped. "
        "Exit status 0 when every step shown behaved, 1 otherwise, 130 on Ctrl-C.",
    )
    p.add_argument("--http-addr", default="127.0.0.1:8500", help="devstack HOST:PORT")
    p.add_argument(
        "--once",
        action="store_true",
        help="non-interactive: plain text, no colours (also when stdout is not a terminal)",
    )
    p.set_defaults(run=_run_demo)


def build_parser() -> argparse.ArgumentParser:
    from agent.agent_cli import add_agent_command
    from agent.inject_cli import add_inject_command
    from agent.install_cli import add_install_command
    from agent.intentions_cli import add_parser as add_intentions_command
    from agent.routes_cli import add_parser as add_routes_command
    from agent.status_cli import add_status_command
    from agent.telemetry_cli import add_parser as add_telemetry_command
    from agent.top import add_top_command
    from agent.version_cli import VersionAction, add_version_command

    parser = argparse.ArgumentParser(prog="meshlet", description=__doc__)
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_dev(sub)
    _add_demo(sub)
    add_cert(sub)
    add_agent_command(sub)
    add_status_command(sub)
    add_top_command(sub)
    add_intentions_command(sub)
    add_inject_command(sub)
    add_routes_command(sub)
    add_telemetry_command(sub)
    add_install_command(sub)
    add_version_command(sub)
    return parser


def _stop_on_signals(stop: asyncio.Event) -> None:
    # Installed before the server announces itself, so an early signal is never lost.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


def _run(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop: the event loop every meshlet process uses."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _run_dev(args: argparse.Namespace) -> int:
    from devstack.config import DevConfig, DevConfigError
    from devstack.server import DevServer

    try:
        config = DevConfig(
            http_addr=args.http_addr,
            datacenter=args.datacenter,
            node_name=args.node_name,
            acl_initial_management_token=args.acl_initial_management_token,
            default_policy=args.acl_default_policy,
            default_intention_policy=args.default_intention_policy,
            enable_script_checks=args.enable_script_checks,
            vault_addr=args.vault_addr,
            vault_token=args.vault_token,
            ca_change_delay=args.ca_change_delay,
        )
        if args.leaf_cert_ttl is not None:
            # A short leaf also lowers the floor a CA configuration PUT is held to (Consul's 1h).
            ttl = args.leaf_cert_ttl
            config = dataclasses.replace(
                config, leaf_cert_ttl=ttl, min_leaf_cert_ttl=min(ttl, config.min_leaf_cert_ttl)
            )
    except DevConfigError as err:
        print(f"meshlet dev: {err}", file=sys.stderr)
        return 2

    async def main() -> int:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        dev = DevServer(config)
        try:
            await dev.start()
        except OSError as err:
            await dev.close()
            print(
                f"meshlet dev: cannot listen on {args.http_addr}: {err.strerror}", file=sys.stderr
            )
            return 1
        try:
            print(f"==> meshlet dev: Consul-compatible HTTP API at {dev.http_url}", flush=True)
            print(
                f"    datacenter: {config.datacenter}, node: {config.node_name}, "
                f"ACLs: {'enabled' if config.acl_enabled else 'disabled'}",
                flush=True,
            )
            vault = dev.identity.vault
            if vault is not None:
                # As `vault server -dev` does: a dev server shows its root token.
                print(
                    f"    Vault PKI API at {vault.url}, root token {vault.root_token}", flush=True
                )
            # Stop on a signal or on PUT /v1/agent/leave, whichever comes first.
            waits = [asyncio.ensure_future(e.wait()) for e in (stop, dev.shutdown_requested)]
            _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            print("==> meshlet dev: shutting down", flush=True)
        finally:
            await dev.close()
        return 0

    return _run(main())


def _run_demo(args: argparse.Namespace) -> int:
    from agent.demo.run import demo

    return _run(demo(args.http_addr, colour=not args.once and sys.stdout.isatty()))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, getattr(args, "log_level", "info").upper()),
        format="%(asctime)s [%(levelname)s] %(name)s: %(message)s",
    )
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
