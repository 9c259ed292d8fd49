"""`meshlet demo`: the mesh, end to end, on devstack, in under two minutes.

It starts devstack (in this process), five small apps (web, order-service, payment-service,
api v1 and api v2) and a `meshlet sidecar` process in front of each, applies the Istio
examples through `meshlet intentions apply` and `meshlet routes apply`, then runs the steps of
agent.demo.steps one after the other, each with its own traffic, live table and verdict. The
steps whose feature this build's sidecar lacks are announced and skipped.

It ends by itself (or on Ctrl-C) leaving nothing behind: the sidecars are stopped as one
process group, the temp directory with their configs and logs is removed. Exit status: 0 when
every step that ran passed, 1 when one did not or the mesh did not come up, 130 on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import tempfile
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from agent.consul import ConsulClient
from agent.consul_config import ConsulConfig
from agent.consul_errors import ConsulError
from agent.demo import examples, mesh
from agent.demo.apps import ApiVersion, DemoApp, OrderService, PaymentService
from agent.demo.mesh import Sidecar, Upstream
from agent.demo.output import Outcome, Output, Verdict
from agent.demo.steps import STEPS, Scene

DEADLINE = 110.0
"""The whole demo, start to summary: under two minutes even on a slow machine."""
READY_WITHIN = 45.0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
SERVICES = ("web", "order-service", "payment-service", "api")


class DemoFailed(Exception):
    """The mesh did not come up as the steps need it."""


def _layout() -> list[Sidecar]:
    """The five app instances, their sidecars and who calls whom (web's app is the demo)."""
    ports = iter(mesh.free_ports(5 * 2 + 4))
    pay_port = next(ports)
    order_up = (Upstream("payment-service", pay_port),)
    web_up = (
        Upstream("order-service", next(ports)),
        Upstream("api", next(ports)),
        # Not in web's real job: here to show that the intentions deny it.
        Upstream("payment-service", next(ports)),
    )
    layout = [
        Sidecar(DemoApp("web"), "web", web_up),
        Sidecar(
            OrderService(f"http://127.0.0.1:{pay_port}/process-payment"),
            "order-service",
            order_up,
        ),
        Sidecar(PaymentService(), "payment-service"),
        Sidecar(ApiVersion("v1"), "api-v1", meta={"version": "v1"}),
        Sidecar(ApiVersion("v2"), "api-v2", meta={"version": "v2"}),
    ]
    for side in layout:
        side.port = next(ports)
        side.admin = f"127.0.0.1:{next(ports)}"
    return layout


async def demo(http_addr: str, *, colour: bool) -> int:
    out = Output(colour=colour)
    loop = asyncio.get_running_loop()
    main = asyncio.ensure_future(_demo(http_addr, out))

    def interrupt() -> None:
        out.say("\n==> interrupted: stopping the sidecars and devstack")
        main.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            # A second Ctrl-C must not cut the clean-up short.
            loop.add_signal_handler(sig, lambda: None)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupt)
    try:
        return await main
    except asyncio.CancelledError:
        out.say("==> demo stopped")
        return EXIT_INTERRUPTED
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _demo(http_addr: str, out: Output) -> int:
    from devstack.config import DevConfig, DevConfigError
    from devstack.server import DevServer

    # Its leaf-issuing lines would break up the tables; warnings and errors still show.
    logging.getLogger("devstack").setLevel(logging.WARNING)
    try:
        config = DevConfig(http_addr=http_addr)
    except DevConfigError as err:
        out.say(f"meshlet demo: {err}")
        return 2
    dev = DevServer(config)
    try:
        await dev.start()
    except OSError as err:
        await dev.close()
        out.say(f"meshlet demo: cannot listen on {http_addr}: {err.strerror}")
        return EXIT_FAILED
    sidecars = _layout()
    try:
        out.heading(f"devstack (Consul-compatible) at {dev.http_url}  (UI: {dev.http_url}/ui/)")
        for side in sidecars:
            await side.app.start()
        async with (
            asyncio.timeout(DEADLINE),
            ConsulClient(ConsulConfig(address=dev.http_addr)) as consul,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        ):
            verdicts = await _with_mesh(dev.http_addr, consul, http, sidecars, out)
    except TimeoutError:
        out.say(f"meshlet demo: did not finish within {DEADLINE:.0f}s")
        return EXIT_FAILED
    except (ConsulError, DemoFailed, RuntimeError) as err:
        out.say(f"meshlet demo: {err}")
        return EXIT_FAILED
    finally:
        for side in sidecars:
            await side.app.stop()
        await dev.close()
    out.summary(verdicts)
    failed = [v.step for v in verdicts if v.outcome is Outcome.FAIL]
    if failed:
        out.say(f"==> demo stopped: {', '.join(failed)} did not behave")
        return EXIT_FAILED
    out.say("==> demo stopped: every step shown behaved; nothing is left running")
    return 0


async def _with_mesh(
    consul_addr: str,
    consul: ConsulClient,
    http: aiohttp.ClientSession,
    sidecars: Sequence[Sidecar],
    out: Output,
) -> list[Verdict]:
    with tempfile.TemporaryDirectory(prefix="meshlet-demo-") as tmp:
        work = Path(tmp)
        out.heading(
            f"a `meshlet sidecar` for each app (configs and logs in {work}, removed at the end)"
        )
        async with mesh.running(sidecars, consul_addr, work):
            _show_sidecars(sidecars, out)
            expected = {"order-service": 1, "payment-service": 1, "api": 2}
            await mesh.until_ready(http, sidecars, expected, READY_WITHIN)
            out.say("    all ready: leaves from Consul's CA held, registered, upstreams resolved")
            out.say()
            scene = await _apply_examples(
                consul_addr, consul, http, sidecars=sidecars, work=work, out=out
            )
            verdicts = []
            for step in STEPS.values():
                verdicts.append(await step(scene))
            if any(v.outcome is Outcome.FAIL for v in verdicts):
                _show_logs(sidecars, out)
            return verdicts


def _show_sidecars(sidecars: Sequence[Sidecar], out: Output) -> None:
    for side in sidecars:
        assert side.proc is not None
        ups = ", ".join(f"{u.name} at :{u.port}" for u in side.upstreams) or "-"
        out.say(
            f"    {side.label:<16} pid {side.proc.pid:<7} app :{side.app.port:<6} "
            f"mTLS :{side.port:<6} admin {side.admin:<16} upstreams: {ups}"
        )


def _show_logs(sidecars: Sequence[Sidecar], out: Output) -> None:
    out.heading("the sidecars' last log lines (a step failed)")
    for side in sidecars:
        if side.log is None or not side.log.exists():
            continue
        for line in side.log.read_text(errors="replace").splitlines()[-5:]:
            out.say(f"    {side.label}: {line}")


async def _apply_examples(
    consul_addr: str,
    consul: ConsulClient,
    http: aiohttp.ClientSession,
    *,
    sidecars: Sequence[Sidecar],
    work: Path,
    out: Output,
) -> Scene:
    out.heading("the Istio examples, applied through meshlet's translators")
    # L7 intentions and routes need an HTTP-family protocol, as Consul requires.
    for name in SERVICES:
        await consul.config_entries.put(
            {"Kind": "service-defaults", "Name": name, "Protocol": "http"}
        )
    out.say(f"    service-defaults Protocol=http for {', '.join(SERVICES)} (written directly)")
    for step in examples.APPLIES:
        applied = await examples.apply(step, consul_addr, work)
        out.say(f"    $ {applied.command}")
        out.say(f"      {step.what}: wrote {', '.join(applied.written) or 'nothing'}")
        if applied.status != 0:
            for line in applied.output.splitlines():
                out.say(f"      | {line}")
            raise DemoFailed(f"`{applied.command}` exited with status {applied.status}")
    out.say()
    entry = await consul.config_entries.find("service-intentions", "payment-service")
    if entry is None:
        raise DemoFailed("the AuthorizationPolicy wrote no intentions for payment-service")
    roots = (await consul.connect.ca_roots()).value
    web, order, payment, api_v1, api_v2 = sidecars
    return Scene(
        http,
        out,
        web,
        order,
        payment,
        api_v1,
        api_v2,
        intentions_index=int(entry.get("ModifyIndex") or 0),
        trust_domain=roots.trust_domain,
    )
