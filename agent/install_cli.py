"""`meshlet install systemd --service NAME`: put meshlet's units and a config skeleton in place.

    /etc/systemd/system/meshlet-sidecar@.service, meshlet-agent.service   (always rewritten)
    /etc/meshlet/NAME.yaml            (agent.yaml with --agent-only; kept unless --force)
    /etc/meshlet/creds/NAME.consul-token   (the LoadCredential= source; empty = no token)
    /etc/systemd/system/<unit>.d/10-low-ports.conf   (only while a port below 1024 is configured)
    /etc/systemd/system/APP.d/10-meshlet.conf        (with --app-unit APP)

`--root DIR` puts all of it under DIR instead of / (tests, images being built). Nothing is
enabled or started: the command prints the systemctl lines to run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import sys
from pathlib import Path

import yaml

# The unit templates and the skeleton are imported by the command that writes them: the parser
# is built by every `meshlet` process, the long-running agent and sidecar included.


def add_install_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "install",
        help="install meshlet's systemd units and a configuration skeleton",
        description="Write what meshlet needs to run under a service manager.",
    )
    targets = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    s = targets.add_parser(
        "systemd",
        help="units for a VM: meshlet-sidecar@NAME (or meshlet-agent) and /etc/meshlet/NAME.yaml",
        description="Write meshlet's systemd units, the service's configuration skeleton and "
        "its Consul token credential; enable nothing (see docs/operations.md).",
    )
    s.add_argument("--service", required=True, metavar="NAME", help="the Consul service name")
    s.add_argument(
        "--root", type=Path, default=Path("/"), metavar="DIR", help="install under DIR (default /)"
    )
    s.add_argument(
        "--consul-token-file",
        type=Path,
        metavar="FILE",
        help="copy this Consul ACL token into the credential the unit loads "
        "(default: an empty credential, for a Consul without ACLs)",
    )
    s.add_argument(
        "--agent-only",
        action="store_true",
        help="configure meshlet-agent.service (registration only, no proxy): "
        "/etc/meshlet/agent.yaml",
    )
    s.add_argument(
        "--app-unit",
        metavar="UNIT",
        help="the application's unit (e.g. web.service): add a drop-in that starts it after "
        "its sidecar is ready and stops it first",
    )
    s.add_argument(
        "--address",
        metavar="IP",
        help="this node's address as registered in Consul, for sidecar.address "
        "(default: the address of the interface holding the default route)",
    )
    s.add_argument(
        "--port", type=int, default=8080, help="the application's port (default %(default)s)"
    )
    s.add_argument(
        "--consul-addr",
        default="127.0.0.1:8500",
        help="the local Consul agent (default %(default)s)",
    )
    s.add_argument(
        "--meshlet",
        metavar="PATH",
        help="the console script ExecStart= runs (default: the installed `meshlet`)",
    )
    s.add_argument(
        "--force", action="store_true", help="overwrite an existing configuration and credential"
    )
    s.set_defaults(run=_run_install)


def _console_script() -> str:
    """The `meshlet` script of the environment this process runs from."""
    import sysconfig

    from agent.unit_files import UnitError

    here = Path(sysconfig.get_path("scripts")) / "meshlet"
    if here.is_file():
        return str(here)
    beside = str(Path(sys.executable).parent)
    found = shutil.which("meshlet", path=beside) or shutil.which("meshlet")
    if found is None:
        raise UnitError("--meshlet: no installed `meshlet` console script found; name it")
    return str(Path(found).absolute())


def default_node_address() -> str:
    """The source address of the default route: what a peer on another host reaches us at on
    a typical one-interface VM. No packet is sent (a UDP connect only picks the route)."""
    from agent.unit_files import UnitError

    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: routed by the default route, never answered
        address: str = s.getsockname()[0]
        return address
    raise UnitError("--address: this host has no default route; give the node's address")


def _write(path: Path, text: str, mode: int) -> None:
    """Replace `path` whole; the file has `mode` from its first byte (a token is never
    readable by others, not even for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".meshlet-tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        os.fchmod(fd, mode)  # the umask may have taken bits away from a 0644 file
        out.write(text)
    tmp.replace(path)


def _other_configs(config_dir: Path, mine: Path) -> list[dict[str, object]]:
    found = []
    for path in sorted(config_dir.glob("*.yaml")) if config_dir.is_dir() else []:
        if path == mine:
            continue
        with contextlib.suppress(OSError, UnicodeDecodeError, yaml.YAMLError):
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
            if isinstance(raw, dict):
                found.append(raw)
    return found


def _run_install(args: argparse.Namespace) -> int:
    from agent.unit_files import UnitError

    try:
        return _install(args)
    except UnitError as exc:
        print(f"meshlet install systemd: {exc}", file=sys.stderr)
        return 2


def _install(args: argparse.Namespace) -> int:
    import ipaddress

    from agent.config import ConfigError, load
    from agent.unit_files import (
        AGENT_UNIT,
        LOW_PORTS_DROP_IN,
        SIDECAR_UNIT,
        Skeleton,
        UnitError,
        app_drop_in,
        config_skeleton,
        first_free,
        low_ports,
        ports_in_use,
        render_unit,
        service_name_problem,
        shipped,
    )

    service: str = args.service
    problem = service_name_problem(service)
    if problem:
        raise UnitError(f"--service: {problem}")
    if not 1 <= args.port <= 65535:
        raise UnitError(f"--port: expected a port number from 1 to 65535, got {args.port}")
    if args.app_unit is not None and (args.agent_only or "/" in args.app_unit):
        raise UnitError("--app-unit: a unit name such as web.service, and not with --agent-only")
    address = args.address or default_node_address()
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise UnitError(f"--address: expected an IP address, got {address!r}") from None
    root: Path = args.root
    units = root / "etc/systemd/system"
    etc = root / "etc/meshlet"
    instance = "agent" if args.agent_only else service
    unit = AGENT_UNIT if args.agent_only else SIDECAR_UNIT.replace("@", f"@{service}")
    config_path = etc / f"{instance}.yaml"
    token_path = etc / "creds" / f"{instance}.consul-token"
    meshlet = args.meshlet or _console_script()
    rendered = {name: render_unit(shipped(name), meshlet) for name in (SIDECAR_UNIT, AGENT_UNIT)}
    written: list[str] = []

    if not etc.is_dir():
        etc.mkdir(parents=True)
        etc.chmod(0o755)  # the services' dynamic users read their files in it
    token_path.parent.mkdir(mode=0o700, exist_ok=True)
    # The credential is read by systemd (root) only; the service reads its copy under
    # $CREDENTIALS_DIRECTORY. An empty one means no token (a Consul without ACLs).
    if args.consul_token_file is not None:
        try:
            token = args.consul_token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UnitError(f"--consul-token-file: cannot read: {exc}") from None
        held = token_path.read_text(encoding="utf-8").strip() if token_path.exists() else None
        if held is not None and held != token and not args.force:
            raise UnitError(f"{token_path} holds another token; --force replaces it")
        _write(token_path, token + "\n" if token else "", 0o600)
        written.append(str(token_path))
    elif not token_path.exists():
        _write(token_path, "", 0o600)
        written.append(str(token_path))

    for name, text in rendered.items():
        _write(units / name, text, 0o644)
        written.append(str(units / name))

    if config_path.exists() and not args.force:
        print(f"kept {config_path} (exists; --force overwrites it)")
    else:
        sidecar_ports, admin_ports = ports_in_use(_other_configs(etc, config_path))
        skeleton = Skeleton(
            service=service,
            app_port=args.port,
            node_address=address,
            sidecar_port=first_free(21000, sidecar_ports),
            admin_port=first_free(19000, admin_ports),
            consul_address=args.consul_addr,
            token_path=str(Path("/etc/meshlet/creds") / token_path.name),
            unit=unit,
            command="agent" if args.agent_only else "sidecar",
        )
        # World-readable: the unit's dynamic user reads it, and it holds no secret.
        _write(config_path, config_skeleton(skeleton), 0o644)
        written.append(str(config_path))

    # The capability drop-in follows the file as it is now (kept or new).
    drop_in = units / f"{unit}.d" / "10-low-ports.conf"
    try:
        keys = low_ports(load(config_path, {}), sidecar=not args.agent_only)
    except ConfigError as exc:
        print(f"warning: {exc}\n(the unit keeps no capability until it is valid)", file=sys.stderr)
        keys = []
    if keys:
        _write(drop_in, LOW_PORTS_DROP_IN.format(keys=", ".join(keys)), 0o644)
        written.append(str(drop_in))
    elif drop_in.exists():
        drop_in.unlink()
        print(f"removed {drop_in} (no port below 1024 any more)")

    if args.app_unit is not None:
        app = units / f"{args.app_unit}.d" / "10-meshlet.conf"
        _write(app, app_drop_in(service), 0o644)
        written.append(str(app))

    for path in written:
        print(f"wrote {path}")
    prefix = "" if root == Path("/") else f"# under {root}: "
    print(f"{prefix}systemctl daemon-reload && systemctl enable --now {unit}")
    return 0
