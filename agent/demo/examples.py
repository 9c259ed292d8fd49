"""The Istio examples the demo applies, through meshlet's own translators.

`examples/` holds the configuration examples that motivate meshlet (the repository's
tests/traffic/istio-examples are copies of the same files): the payment-service
AuthorizationPolicy, the api canary VirtualService with its DestinationRule, the
payment-service VirtualService (timeout and retries) and the strict PeerAuthentication. The
demo applies them as an operator would, by running `meshlet intentions apply` and `meshlet
routes apply` against devstack, and shows the entries each one wrote.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from agent.demo.mesh import meshlet_command

EXAMPLES = resources.files("agent.demo").joinpath("examples")


@dataclass(frozen=True)
class Apply:
    what: str
    args: tuple[str, ...]
    files: tuple[str, ...]


# The AuthorizationPolicy and PeerAuthentication live in Istio namespace `production`; the
# VirtualServices and DestinationRule in `default`. Consul CE has one namespace, so each
# command says which Istio namespace it stands for.
APPLIES = (
    Apply(
        "only order-service may call payment-service, and only POST /process-payment",
        ("intentions", "apply", "--single-namespace", "production"),
        ("payment-authorizationpolicy.yaml",),
    ),
    Apply(
        "api: x-canary: true -> v2, else 90/10 v1/v2; payment-service: timeout and retries",
        ("routes", "apply", "--callers", "web"),
        ("api-destinationrule.yaml", "canary-virtualservice.yaml", "payment-virtualservice.yaml"),
    ),
    Apply(
        "mTLS required everywhere",
        ("routes", "apply", "--single-namespace", "production"),
        ("peerauthentication-strict.yaml",),
    ),
)


@dataclass(frozen=True)
class Applied:
    command: str
    status: int
    written: tuple[str, ...]
    """The entries the command reports written."""
    output: str


async def apply(step: Apply, consul: str, work: Path) -> Applied:
    """Run the meshlet command on copies of the example files in `work`."""
    paths = []
    for name in step.files:
        path = work / name
        path.write_text(EXAMPLES.joinpath(name).read_text())
        paths.append(path)
    args = [*step.args, *(a for p in paths for a in ("-f", str(p)))]
    env = {**os.environ, "CONSUL_HTTP_ADDR": consul}
    env.pop("CONSUL_HTTP_TOKEN", None)
    proc = await asyncio.create_subprocess_exec(
        meshlet_command(),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    written = tuple(
        line.removesuffix(" written").strip()
        for line in text.splitlines()
        if line.endswith(" written")
    )
    shown = " ".join([*step.args, *(a for name in step.files for a in ("-f", name))])
    return Applied(f"meshlet {shown}", proc.returncode or 0, written, text)
