"""What a proxy process reports as its counters: the same for the proxy inside the agent
(`--workers 0`, agent/sidecar.py) and for a data-plane process (connect/dataplane/), so the
agent adds up one shape whichever runs the listeners."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from connect.access_log import AccessLog
from connect.http1 import OutboundHTTP
from connect.http1.origin import MeshOrigin
from connect.observe import Telemetry
from connect.sidecar import Sidecar, UpstreamSpec
from connect.stats import ProxyStats

__all__ = ["mirror_counters", "process_counters", "proxy_counters"]


def process_counters() -> dict[str, int]:
    """This process's resident memory and open descriptors (Linux /proc); a worker group's
    are added up like its other counters."""
    rss = 0
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = 0
    return {"rss_bytes": rss, "open_fds": fds}


def proxy_counters(
    stats: ProxyStats,
    proxy: Sidecar[Any] | None,
    telemetry: Telemetry | None,
    access_log: AccessLog | None,
) -> dict[str, Any]:
    """The proxy's counters (`ProxyStats`), the failed dials per upstream and kind
    (connect.dial_failures), clusters, telemetry and the process's own figures."""
    upstreams = proxy.upstreams if proxy is not None else {}
    # A routed upstream's ejections happen in its chain's target clusters.
    routed = {
        r.spec.name: r.routed.ejections()
        for r in (proxy.running.values() if proxy is not None else ())
        if isinstance(r.spec, UpstreamSpec) and r.routed is not None
    }
    return {
        **dataclasses.asdict(stats),
        "upstream_refusals": {name: up.refusal_counts() for name, up in upstreams.items()},
        "mirrors": mirror_counters(proxy),
        "mesh": telemetry.metrics.export() if telemetry is not None else {},
        "clusters": {
            name: {
                "overflows": dict(up.cluster.overflows),
                "ejections": up.cluster.ejections + routed.get(name, (0, 0))[0],
                "ejected": len(up.cluster.ejected) + routed.get(name, (0, 0))[1],
            }
            for name, up in upstreams.items()
        },
        "process": process_counters(),
        "access_log": {
            "dropped": access_log.dropped if access_log is not None else 0,
            "written": access_log.written if access_log is not None else 0,
            "write_failed": access_log.write_failed if access_log is not None else 0,
        },
        "tracing": telemetry.tracing_counters() if telemetry is not None else {},
    }


def mirror_counters(proxy: Sidecar[Any] | None) -> dict[str, dict[str, int]]:
    """Each HTTP upstream's mirrored copies by outcome, and in flight (connect.http1.mirror);
    only the upstreams that were ever asked for one, so a sidecar without mirrors reports
    nothing."""
    out: dict[str, dict[str, int]] = {}
    for r in proxy.running.values() if proxy is not None else ():
        listener = r.listener
        if isinstance(r.spec, UpstreamSpec) and isinstance(listener, OutboundHTTP):
            origin = listener.origin
            if isinstance(origin, MeshOrigin) and origin.mirrors.used:
                out[r.spec.name] = origin.mirrors.counts()
    return out
