"""`meshlet --version` and `meshlet version`: what is installed, for bug reports and upgrades.

Versions come from the installed distributions' metadata, not from the checkout, so they say
what the console script actually runs. Two OpenSSLs matter and may differ: the one Python's
`ssl` module links (every TLS handshake the proxy makes) and the one cryptography bundles
(certificate and key handling).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import ssl
import sys
from collections.abc import Sequence
from typing import Any

DISTRIBUTION = "meshlet"
_REQUIREMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _installed(name: str) -> str:
    # Imported here, not at the top: the parser (with `--version`) is built by every `meshlet`
    # process, the long-running agent and sidecar included, and importlib.metadata brings
    # zipfile, csv and importlib.resources with it.
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _dependencies() -> list[str]:
    """meshlet's own runtime requirements (not the test extra), in the order it declares them."""
    import importlib.metadata

    try:
        requires = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    names = []
    for req in requires:
        match = _REQUIREMENT_NAME.match(req)
        if match and "extra ==" not in req:
            names.append(match.group(0))
    return names


def _cryptography_openssl() -> str:
    try:
        from cryptography.hazmat.backends.openssl.backend import backend
    except ImportError as exc:
        return f"unavailable ({exc})"
    return str(backend.openssl_version_text())


def report() -> dict[str, Any]:
    return {
        "meshlet": _installed(DISTRIBUTION),
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "python_executable": sys.executable,
        "openssl": ssl.OPENSSL_VERSION,
        "cryptography_openssl": _cryptography_openssl(),
        "dependencies": {name: _installed(name) for name in _dependencies()},
    }


def short_line() -> str:
    return (
        f"meshlet {_installed(DISTRIBUTION)} (Python {platform.python_version()}, "
        f"{ssl.OPENSSL_VERSION})"
    )


def render(info: dict[str, Any]) -> str:
    lines = [
        f"meshlet {info['meshlet']}",
        f"Python {info['python']} at {info['python_executable']}",
        f"{info['openssl']} (Python's ssl module: the proxy's TLS)",
        f"{info['cryptography_openssl']} (cryptography: certificates and keys)",
        "dependencies:",
        *(f"  {name} {version}" for name, version in info["dependencies"].items()),
    ]
    return "\n".join(lines) + "\n"


class VersionAction(argparse.Action):
    """`meshlet --version`: one line, printed while parsing (no COMMAND needed)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("help", "print meshlet's, Python's and OpenSSL's versions and exit")
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        print(short_line())
        parser.exit()


def add_version_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "version",
        help="print the versions of meshlet, Python, OpenSSL and meshlet's dependencies",
        description="Print what this installation runs: meshlet, Python, both OpenSSLs "
        "(Python's ssl module, cryptography's) and every runtime dependency.",
    )
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(run=_run_version)


def _run_version(args: argparse.Namespace) -> int:
    info = report()
    sys.stdout.write(json.dumps(info, indent=2) + "\n" if args.json else render(info))
    return 0
