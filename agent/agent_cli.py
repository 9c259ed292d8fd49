"""`meshlet agent`: run the node agent, validate its file, or print the config reference."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_agent_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "agent",
        help="run the node agent: register the service and its sidecar, watch upstreams",
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
    p.set_defaults(run=_run_agent, sidecar=False)

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
    s.set_defaults(run=_run_agent, sidecar=True, print_config_reference=False)


def _run_agent(args: argparse.Namespace) -> int:
    from agent.config import ConfigError, load, reference_markdown

    if args.print_config_reference:
        sys.stdout.write(reference_markdown())
        return 0
    command = "meshlet sidecar" if args.sidecar else "meshlet agent"
    if args.config is None:
        print(f"{command}: -c FILE is required", file=sys.stderr)
        return 2
    env = dict(os.environ)
    try:
        config = load(args.config, env)
    except ConfigError as exc:
        print(f"{command}: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(
            f"{args.config}: valid (service {config.service.service_id}, "
            f"{len(config.sidecar.upstreams)} upstreams)"
        )
        return 0

    from agent.cli import _run
    from agent.runtime import run_agent

    return _run(run_agent(args.config, env, config, sidecar=args.sidecar))
