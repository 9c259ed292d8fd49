"""`meshlet inject`: add the meshlet sidecar to Kubernetes manifests, serve the admission
webhook that does it at pod creation, or (in an injected pod) write the sidecar's config."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# Only the options' defaults (shown in --help): the injector is imported when it runs, as the
# parser is built by every `meshlet` process, the long-running agent and sidecar included.
from agent.inject_template import InjectOptions

log = logging.getLogger("meshlet.inject")
_DEFAULTS = InjectOptions()


def add_inject_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "inject",
        help="add the meshlet sidecar to Kubernetes manifests, or serve the injection webhook",
        description="Add the meshlet sidecar to every Pod, Deployment, StatefulSet, DaemonSet, "
        "ReplicaSet, Job and CronJob of a YAML stream (see docs/kubernetes.md); "
        "--webhook serves the same injection as a mutating admission webhook.",
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("-f", "--filename", metavar="FILE", help="manifests to inject; - is stdin")
    mode.add_argument("--webhook", action="store_true", help="serve the admission webhook")
    # Run by the injected meshlet-init container, not by people.
    mode.add_argument("--write-config", type=Path, metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    p.add_argument("--image", default=_DEFAULTS.image, help="sidecar image (%(default)s)")
    p.add_argument(
        "--image-pull-policy",
        default=_DEFAULTS.image_pull_policy,
        choices=("Always", "IfNotPresent", "Never"),
    )
    p.add_argument(
        "--consul-http-addr",
        default=_DEFAULTS.consul_http_addr,
        help="CONSUL_HTTP_ADDR of the sidecar; $(HOST_IP) is the node's IP (default %(default)s)",
    )
    p.add_argument(
        "--token-secret",
        default=_DEFAULTS.token_secret,
        help="Secret (key 'token') with the sidecar's Consul ACL token (default %(default)s)",
    )
    p.add_argument("--tls-cert", type=Path, metavar="FILE", help="webhook certificate (PEM)")
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="webhook private key (PEM)")
    p.add_argument(
        "--listen", default="127.0.0.1:8443", metavar="HOST:PORT", help="webhook (%(default)s)"
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    for flag in (
        "service",
        "service-port",
        "protocol",
        "upstreams",
        "pod-name",
        "pod-namespace",
        "pod-ip",
    ):
        p.add_argument(f"--{flag}", default=None, help=argparse.SUPPRESS)
    p.set_defaults(run=_run_inject)


def _options(args: argparse.Namespace) -> InjectOptions:
    return InjectOptions(
        image=args.image,
        image_pull_policy=args.image_pull_policy,
        consul_http_addr=args.consul_http_addr,
        token_secret=args.token_secret,
    )


def _run_inject(args: argparse.Namespace) -> int:
    if args.write_config is not None:
        return _write_config(args)
    if args.webhook:
        return _serve(args)
    from agent.inject import InjectError, inject_stream

    try:
        if args.filename == "-":
            text = sys.stdin.read()
        else:
            text = Path(args.filename).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"meshlet inject: cannot read {args.filename}: {exc}", file=sys.stderr)
        return 1
    try:
        out = inject_stream(text, _options(args))
    except InjectError as exc:
        name = "<stdin>" if args.filename == "-" else args.filename
        for line in str(exc).splitlines():
            print(f"meshlet inject: {name}: {line}", file=sys.stderr)
        return 2
    if args.output is None:
        sys.stdout.write(out)
        return 0
    try:
        Path(args.output).write_text(out, encoding="utf-8")
    except OSError as exc:
        print(f"meshlet inject: cannot write {args.output}: {exc}", file=sys.stderr)
        return 1
    return 0


def _write_config(args: argparse.Namespace) -> int:
    from agent.inject import InjectError
    from agent.inject_config import sidecar_config, write_config

    try:
        raw = sidecar_config(
            service=args.service or "",
            service_port=args.service_port or "",
            protocol=args.protocol or "tcp",
            upstreams=args.upstreams or "",
            pod_name=args.pod_name or "",
            pod_namespace=args.pod_namespace or "",
            pod_ip=args.pod_ip or "",
        )
        write_config(args.write_config, raw, dict(os.environ))
    except InjectError as exc:
        print(f"meshlet inject --write-config: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"meshlet inject --write-config: cannot write {args.write_config}: {exc}",
            file=sys.stderr,
        )
        return 1
    print(
        f"meshlet: wrote {args.write_config} for service {raw['service']['name']} "
        f"(id {raw['service']['id']})"
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from agent.cli import _run, _stop_on_signals
    from agent.inject_webhook import InjectWebhook

    if args.tls_cert is None or args.tls_key is None:
        print(
            "meshlet inject --webhook: --tls-cert and --tls-key are required (the API "
            "server only calls webhooks over HTTPS)",
            file=sys.stderr,
        )
        return 2
    options = _options(args)
    problems = list(options.problems())
    host, sep, port = args.listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        problems.append(f"--listen: expected HOST:PORT, got {args.listen!r}")
    if problems:
        for problem in problems:
            print(f"meshlet inject --webhook: {problem}", file=sys.stderr)
        return 2

    async def main() -> int:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        try:
            hook = InjectWebhook(options, args.tls_cert, args.tls_key, host.strip("[]"), int(port))
        except (OSError, ValueError) as exc:
            print(f"meshlet inject --webhook: cannot load the certificate: {exc}", file=sys.stderr)
            return 1
        try:
            await hook.start()
        except OSError as exc:
            print(
                f"meshlet inject --webhook: cannot listen on {args.listen}: {exc.strerror}",
                file=sys.stderr,
            )
            return 1
        try:
            print(
                f"==> meshlet inject: webhook at https://{hook.address}/mutate, "
                f"sidecar image {options.image}",
                flush=True,
            )
            await stop.wait()
        finally:
            await hook.close()
        return 0

    return _run(main())
