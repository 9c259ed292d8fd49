"""`meshlet cert fetch`: write a service's leaf, key and CA bundle to files.

    meshlet cert fetch --service web [--source consul|vault] [--out DIR]

Consul is found the way the consul CLI finds it (CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, ...), and
Vault the way the vault CLI does (VAULT_ADDR, VAULT_TOKEN, VAULT_CACERT; VAULT_ROLE_ID and
VAULT_SECRET_ID for AppRole). The trust bundle always comes from Consul's CA, so a Vault-issued
leaf carries Consul's trust domain. key.pem is created 0600 and never printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from connect.leaf import Leaf, LeafSource, TrustBundle


def add_cert(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cert", help="leaf certificate tools")
    cert_sub = p.add_subparsers(dest="cert_command", required=True, metavar="COMMAND")
    fetch = cert_sub.add_parser(
        "fetch",
        help="fetch a service's leaf certificate and write cert.pem, key.pem and ca.pem",
    )
    fetch.add_argument("--service", required=True, help="service name the leaf is for")
    fetch.add_argument("--source", choices=("consul", "vault"), default="consul")
    fetch.add_argument("--out", type=Path, default=Path("."), help="directory (default .)")
    fetch.add_argument("--vault-mount", default="pki", help="PKI mount (default %(default)s)")
    fetch.add_argument("--vault-role", default="meshlet", help="PKI role (default %(default)s)")
    fetch.add_argument("--datacenter", default=None, help="for the SPIFFE ID (default: Consul's)")
    fetch.set_defaults(run=run_fetch)


def run_fetch(args: argparse.Namespace) -> int:
    # Imported when run: every `meshlet` command builds this parser, and the Consul client
    # and connect.leaf (cryptography) are this command's alone.
    from agent.cli import _run
    from agent.consul import ConsulError
    from connect.leaf import LeafError

    try:
        return _run(_fetch(args))
    except (LeafError, ConsulError, ValueError) as err:
        # ValueError: a Vault configuration error (missing VAULT_TOKEN, bad VAULT_ADDR).
        print(f"meshlet cert fetch: {err}", file=sys.stderr)
        return 1


async def _fetch(args: argparse.Namespace) -> int:
    from agent.consul import ConsulClient
    from agent.consul_connect import consul_leaf_source, consul_roots_source

    async with ConsulClient.from_env() as consul:
        bundle = await consul_roots_source(consul).roots(0)
        source: LeafSource
        if args.source == "consul":
            source = consul_leaf_source(consul, args.service)
        else:
            # hvac (and requests) load only when Vault is asked for.
            from connect.leaf_vault import VaultLeafSource, vault_config_from_env

            datacenter = args.datacenter or (await consul.agent.self()).datacenter
            config = vault_config_from_env(os.environ, mount=args.vault_mount, role=args.vault_role)
            source = VaultLeafSource(config, args.service, datacenter)
        leaf = await source.fetch(None, bundle)
    write_files(args.out, leaf, bundle)
    print(
        f"wrote {args.out / 'cert.pem'}, key.pem (0600), ca.pem: {leaf.service_uri}, "
        f"serial {leaf.serial}, valid until {leaf.valid_before.isoformat()}"
    )
    return 0


def write_files(out: Path, leaf: Leaf, bundle: TrustBundle) -> None:
    out.mkdir(parents=True, exist_ok=True)
    key_path = out / "key.pem"
    # Create the key file 0600 from the start (no window where it is readable by others), and
    # tighten a file that already existed with looser permissions.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(leaf.key_pem)
    (out / "cert.pem").write_text(leaf.cert_pem)
    (out / "ca.pem").write_text(bundle.pem)
