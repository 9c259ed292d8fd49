"""The start-time bind check on real sockets: a port another socket holds is named with its
key and address; the same failure inside the proxy's TaskGroup is recognised, a TLS error is
not."""

from __future__ import annotations

import errno
import socket
import ssl

from agent.bind_check import EX_CONFIG, EX_UNAVAILABLE, bind_error, bind_refused, sidecar_binds
from agent.config import parse


async def test_a_held_port_is_named_with_its_key_and_address() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        with socket.socket() as spare:
            spare.bind(("127.0.0.1", 0))
            free = spare.getsockname()[1]
        cfg = parse(
            {
                "service": {"name": "web", "port": 8080},
                "sidecar": {
                    "port": free,
                    "upstreams": [{"name": "api", "local_bind_port": busy}],
                },
            },
            {},
        )
        assert sidecar_binds(cfg) == [
            ("sidecar.port", "127.0.0.1", free),
            ("sidecar.upstreams[0].local_bind_port", "127.0.0.1", busy),
        ]
        refused = await bind_refused(sidecar_binds(cfg))
    assert refused is not None
    assert str(refused) == (
        f"cannot listen on sidecar.upstreams[0].local_bind_port 127.0.0.1:{busy}: "
        "Address already in use"
    )
    assert refused.exit_code == EX_UNAVAILABLE
    # The port is free again once its holder is gone: the probe itself holds nothing.
    assert await bind_refused(sidecar_binds(cfg)) is None


async def test_an_address_not_on_this_host_is_a_configuration_error() -> None:
    refused = await bind_refused([("sidecar.port", "192.0.2.1", 21000)])  # TEST-NET-1
    assert refused is not None and refused.errno == errno.EADDRNOTAVAIL
    assert refused.exit_code == EX_CONFIG


def test_a_bind_failure_is_found_inside_task_groups_and_tls_errors_are_not() -> None:
    inner = OSError(errno.EADDRINUSE, "address already in use")
    group = BaseExceptionGroup("tg", [ExceptionGroup("inner", [ValueError("x"), inner])])
    assert bind_error(group) is inner
    assert bind_error(ExceptionGroup("tg", [ssl.SSLError(errno.EADDRINUSE, "tls")])) is None
    assert bind_error(ConnectionResetError(errno.ECONNRESET, "reset")) is None
