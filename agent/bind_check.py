"""Can the sidecar have its ports? Asked once at start, before anything is registered.

A listener binds only after the leaf and the first intentions are in (agent/sidecar.py), so a
port someone else holds would otherwise surface seconds later, as a traceback, after the
instance was registered. `bind_refused` test-binds every listener address first and names the
configuration key; `bind_exit_code` classifies the same failure when it happens anyway (the
port taken between the check and the real bind).

Exit codes (sysexits.h), so a supervisor can tell these from a crash and not restart into the
same wall (docs/operations.md, `RestartPreventExitStatus=`):
EX_UNAVAILABLE (69) when something else holds the address, EX_CONFIG (78) when this host
cannot give it to this process at all (not a local address, a privileged port).

`--check-config` does not test-bind: it runs while the instance it validates for holds the
ports (before a reload or a restart), and often on another machine.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from dataclasses import dataclass

from agent.config import AgentConfig, listen_addresses

EX_UNAVAILABLE = 69
EX_CONFIG = 78

_BIND_ERRNOS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)


def bind_exit_code(err: int | None) -> int:
    return EX_UNAVAILABLE if err == errno.EADDRINUSE else EX_CONFIG


@dataclass(frozen=True, slots=True)
class BindRefused:
    key: str
    host: str
    port: int
    errno: int
    reason: str

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def exit_code(self) -> int:
        return bind_exit_code(self.errno)

    def __str__(self) -> str:
        return f"cannot listen on {self.key} {self.address}: {self.reason}"


def sidecar_binds(cfg: AgentConfig) -> list[tuple[str, str, int]]:
    """(key, host, port) of the sidecar's listeners: inbound and one per upstream."""
    return [b for b in listen_addresses(cfg) if b[0].startswith("sidecar.")]


async def bind_refused(binds: list[tuple[str, str, int]]) -> BindRefused | None:
    """The first listener address that cannot be bound now, or None. Each probe binds as the
    listener will (SO_REUSEADDR, as asyncio sets it) and is closed at once."""
    loop = asyncio.get_running_loop()
    for key, host, port in binds:
        try:
            infos = await loop.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except socket.gaierror as exc:
            return BindRefused(key, host, port, errno.EADDRNOTAVAIL, str(exc.strerror))
        for family, kind, proto, _, addr in infos:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(addr)
                except OSError as exc:
                    return BindRefused(key, host, port, exc.errno or 0, exc.strerror or str(exc))
    return None


def bind_error(exc: BaseException) -> OSError | None:
    """The listener bind failure inside `exc` (a TaskGroup wraps it in groups), if that is
    what it is; TLS errors are OSErrors too and are not bind failures."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = bind_error(inner)
            if found is not None:
                return found
        return None
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError):
        return exc if exc.errno in _BIND_ERRNOS else None
    return None
