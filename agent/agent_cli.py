"""`meshlet agent`: run the node agent, validate its file, or print the config reference."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_agent_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "agent",
        help="run the node agent without a proxy: register the service (no sidecar), watch "
        "upstreams",
        description="Run the meshlet node agent for one service (see docs/configuration.md).",
    )
    p.add_argument("-c", "--config", type=Path, metavar="FILE", help="the agent's YAML file")
    p.add_argument(
        "--check-config",
        action="store_true",
        help="validate FILE (with the environment's CONSUL_* overrides) and exit",
    )
    p.add_argument(
        "--print-config-reference",
        action="store_true",
        help="print every configuration key as Markdown (docs/configuration.md) and exit",
    )
    p.set_defaults(run=_run_agent, sidecar=False, workers=None)

    s = sub.add_parser(
        "sidecar",
        help="run the node agent with its sidecar proxy (mTLS, intentions, upstream listeners)",
        description="Run the meshlet node agent and the service's sidecar proxy in one process.",
    )
    s.add_argument("-c", "--config", type=Path, metavar="FILE", help="the agent's YAML file")
    s.add_argument(
        "--check-config",
        action="store_true",
        help="validate FILE (with the environment's CONSUL_* overrides) and exit",
    )
    s.add_argument(
        "--workers",
        type=int,
        metavar="N",
        default=None,
        help="data-plane processes serving the listeners, sharing the ports with SO_REUSEPORT "
        "(default: sidecar.workers, 1); 0 runs them in the agent process; see "
        "docs/operations.md",
    )
    nomad = s.add_argument_group(
        "Nomad",
        "--nomad: run as a Connect group's sidecar_task. Nomad registers the proxy; meshlet "
        "reads that registration from Consul (service, ports, upstreams) and never writes or "
        "removes it. -c FILE is then optional and may hold only the settings Nomad has no say "
        "in (certs, watch, shutdown, log_level). See docs/nomad.md.",
    )
    nomad.add_argument(
        "--nomad",
        action="store_true",
        help="take the inputs Nomad gives an Envoy sidecar instead of a config file",
    )
    nomad.add_argument(
        "--proxy-id",
        metavar="ID",
        default="",
        help="the proxy's Consul service ID (default: node.id of the bootstrap file)",
    )
    nomad.add_argument(
        "--bootstrap",
        type=Path,
        metavar="FILE",
        default=None,
        help="the Envoy bootstrap Nomad writes (default: $NOMAD_SECRETS_DIR/envoy_bootstrap.json)",
    )
    nomad.add_argument(
        "--admin-addr",
        metavar="HOST:PORT",
        default="",
        help="admin listener (default: $NOMAD_ENVOY_ADMIN_ADDR_<service>, else admin.address)",
    )
    nomad.add_argument(
        "--registration-timeout",
        type=float,
        metavar="SECONDS",
        default=60.0,
        help="how long to wait for Nomad's registration of the proxy (default %(default)s)",
    )
    s.set_defaults(run=_run_agent, sidecar=True, print_config_reference=False)
    p.set_defaults(nomad=False)


def _run_agent(args: argparse.Namespace) -> int:
    from agent.config import ConfigError, load, proxy_env_problems, reference_markdown, with_workers

    if args.print_config_reference:
        sys.stdout.write(reference_markdown())
        return 0
    command = "meshlet sidecar" if args.sidecar else "meshlet agent"
    if args.nomad:
        return _run_nomad(args)
    stray = [flag for flag, value in _nomad_flags(args) if value]
    if stray:
        print(f"{command}: {', '.join(stray)} only with --nomad", file=sys.stderr)
        return 2
    if args.config is None:
        print(f"{command}: -c FILE is required", file=sys.stderr)
        return 2
    env = dict(os.environ)
    try:
        config = with_workers(load(args.config, env), args.workers)
        # The proxy's own needs, checked here rather than met as a traceback once it starts.
        missing = proxy_env_problems(config, env) if args.sidecar else []
        if missing:
            raise ConfigError(str(args.config), missing)
    except ConfigError as exc:
        print(f"{command}: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        workers = config.sidecar.workers
        print(
            f"{args.config}: valid (service {config.service.service_id}, "
            f"{len(config.sidecar.upstreams)} upstreams"
            + (f", {workers} workers)" if args.sidecar and workers != 1 else ")")
        )
        return 0

    from agent.cli import _run
    from agent.runtime import run_agent

    return _run(run_agent(args.config, env, config, sidecar=args.sidecar, workers=args.workers))


def _nomad_flags(args: argparse.Namespace) -> list[tuple[str, object]]:
    return [
        ("--proxy-id", getattr(args, "proxy_id", "")),
        ("--bootstrap", getattr(args, "bootstrap", None)),
        ("--admin-addr", getattr(args, "admin_addr", "")),
        ("--registration-timeout", getattr(args, "registration_timeout", 60.0) != 60.0),
    ]


def _run_nomad(args: argparse.Namespace) -> int:
    """`meshlet sidecar --nomad`: Nomad's inputs and its registration instead of a file."""
    from agent.cli import _run
    from agent.config import ConfigError, proxy_env_problems, with_workers
    from agent.nomad_inputs import resolve, summary
    from agent.runtime import run_agent

    env = dict(os.environ)
    if not 0 < args.registration_timeout <= 3600:
        print(
            "meshlet sidecar --nomad: --registration-timeout: expected seconds from 0 to 3600, "
            f"got {args.registration_timeout:g}",
            file=sys.stderr,
        )
        return 2

    async def main() -> int:
        try:
            resolved = await resolve(
                env,
                config_file=args.config,
                proxy_id=args.proxy_id,
                bootstrap=args.bootstrap,
                admin_address=args.admin_addr,
                timeout=args.registration_timeout,
            )
            config = with_workers(resolved.config, args.workers)
            missing = proxy_env_problems(config, env)
            if missing:
                raise ConfigError("meshlet sidecar --nomad", missing)
        except ConfigError as exc:
            print(f"meshlet sidecar --nomad: invalid configuration: {exc}", file=sys.stderr)
            return 2
        if args.check_config:
            print(f"valid: {summary(resolved)}")
            return 0
        print(f"meshlet sidecar --nomad: {summary(resolved)}", file=sys.stderr, flush=True)
        return await run_agent(
            None, env, config, sidecar=True, workers=args.workers, external=resolved.external
        )

    return _run(main())
