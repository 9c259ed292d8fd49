"""`meshlet-probe ready|live`: the kubelet's exec probe of an injected sidecar.

The admin listener is loopback-only and the kubelet's httpGet probes connect to the pod IP,
so the probe runs inside the container and asks 127.0.0.1 itself. It is a console script of
its own that imports only the standard library: the kubelet runs it every few seconds, and
`meshlet` (whose parser imports the agent) costs several times more CPU to start.

Exit status 0 when GET /ready (or /live) answers 200, 1 otherwise, with the reason on stderr
(the kubelet shows it in the pod's events).
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

ROUTES = {"ready": "/ready", "live": "/live"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshlet-probe", description="Probe a meshlet sidecar's admin /ready or /live."
    )
    p.add_argument("what", choices=sorted(ROUTES), help="which route of the admin server")
    p.add_argument(
        "--admin-addr", default="127.0.0.1:19000", help="the sidecar's admin.address (%(default)s)"
    )
    p.add_argument("--timeout", type=float, default=2.0, help="seconds (default %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = f"http://{args.admin_addr}{ROUTES[args.what]}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        body = exc.read(4096).decode("utf-8", "replace").strip()
        print(f"meshlet-probe: {url}: {exc.code} {body}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"meshlet-probe: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
