"""`meshlet top`: a live view of the local sidecar, per upstream and inbound: requests per
second, success rate, p50/p99 latency and open connections, from two scrapes of its admin
API's /metrics (and /v1/status for the connections) `--interval` seconds apart.

    meshlet top [--admin-addr 127.0.0.1:19000] [--interval 2] [--once]

The figures are what the sidecar counted between the two scrapes (rates over the interval;
quantiles interpolated inside the histogram's buckets, as Prometheus's histogram_quantile
does). `--once` prints one table and exits (for scripts); otherwise it redraws until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Row", "Sample", "add_top_command", "parse_sample", "render", "rows"]

_Key = tuple[str, str]
"""(direction, name): ("upstream", the destination service) or ("inbound", the caller)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One scrape, reduced to what the view needs, per (direction, name)."""

    requests: Mapping[_Key, float]
    errors: Mapping[_Key, float]
    """5xx answers."""
    buckets: Mapping[_Key, Mapping[float, float]]
    """Cumulative duration bucket counts by upper bound (ms; inf last)."""


@dataclass(frozen=True, slots=True)
class Row:
    direction: str
    name: str
    rps: float
    success: float | None
    """Share of non-5xx answers (None without requests)."""
    p50: float | None
    p99: float | None
    connections: int | None


def _key(labels: Mapping[str, str]) -> _Key | None:
    if labels.get("reporter") == "source":
        return ("upstream", labels.get("destination_service", ""))
    if labels.get("reporter") == "destination":
        return ("inbound", labels.get("source_workload", ""))
    return None


def parse_sample(text: str) -> Sample:
    # Imported when `meshlet top` runs, not when every `meshlet` process builds its parser.
    from prometheus_client.parser import text_string_to_metric_families

    requests: dict[_Key, float] = {}
    errors: dict[_Key, float] = {}
    buckets: dict[_Key, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = _key(s.labels)
            if key is None:
                continue
            if s.name == "istio_requests_total":
                requests[key] = requests.get(key, 0.0) + s.value
                if s.labels.get("response_code", "").startswith("5"):
                    errors[key] = errors.get(key, 0.0) + s.value
            elif s.name == "istio_request_duration_milliseconds_bucket":
                le = float(s.labels["le"])
                per = buckets.setdefault(key, {})
                per[le] = per.get(le, 0.0) + s.value
    return Sample(requests, errors, buckets)


def quantile(q: float, counts: Mapping[float, float]) -> float | None:
    """Prometheus's histogram_quantile over cumulative counts by upper bound: linear inside
    the bucket that holds rank q * total (the lowest bucket starts at 0; in the +Inf bucket
    the answer is the highest finite bound)."""
    bounds = sorted(counts)
    if not bounds:
        return None
    total = counts[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = counts[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def rows(
    before: Sample, after: Sample, seconds: float, connections: Mapping[_Key, int]
) -> list[Row]:
    """The view between two scrapes `seconds` apart (pure)."""
    keys = sorted(set(after.requests) | set(connections))
    out = []
    for key in keys:
        done = after.requests.get(key, 0.0) - before.requests.get(key, 0.0)
        failed = after.errors.get(key, 0.0) - before.errors.get(key, 0.0)
        old = before.buckets.get(key, {})
        delta = {le: n - old.get(le, 0.0) for le, n in after.buckets.get(key, {}).items()}
        out.append(
            Row(
                key[0],
                key[1],
                done / seconds if seconds > 0 else 0.0,
                (done - failed) / done if done > 0 else None,
                quantile(0.5, delta) if done > 0 else None,
                quantile(0.99, delta) if done > 0 else None,
                connections.get(key),
            )
        )
    return out


def connections_of(status: Mapping[str, object]) -> dict[_Key, int]:
    """Open connections per listener from /v1/status (`proxy.connections` by label)."""
    proxy = status.get("proxy")
    conns = proxy.get("connections") if isinstance(proxy, Mapping) else None
    out: dict[_Key, int] = {}
    if not isinstance(conns, Mapping):
        return out
    for label, value in conns.items():
        if not isinstance(value, Mapping) or not isinstance(label, str):
            continue
        parts = label.split()
        if parts and parts[0] == "upstream" and len(parts) > 1:
            out[("upstream", parts[1])] = int(value.get("open", 0))
        elif parts and parts[0] == "inbound":
            out[("inbound", "*")] = int(value.get("open", 0))
    return out


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def render(view: Sequence[Row], seconds: float) -> str:
    header = ("DIRECTION", "NAME", "RPS", "SUCCESS", "P50 MS", "P99 MS", "OPEN")
    table = [
        (
            r.direction,
            r.name,
            f"{r.rps:.1f}",
            "-" if r.success is None else f"{r.success * 100:.1f}%",
            _ms(r.p50),
            _ms(r.p99),
            "-" if r.connections is None else str(r.connections),
        )
        for r in view
    ]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    lines = [f"over the last {seconds:.1f}s (inbound rows are by caller)"]
    for cells in (header, *table):
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    return "\n".join(lines) + "\n"


def _read(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        body: bytes = resp.read()
    return body.decode()


def _run_top(args: argparse.Namespace) -> int:
    base = f"http://{args.admin_addr}"
    try:
        before, t0 = parse_sample(_read(base + "/metrics")), time.monotonic()
        while True:
            time.sleep(args.interval)
            after, t1 = parse_sample(_read(base + "/metrics")), time.monotonic()
            conns = connections_of(json.loads(_read(base + "/v1/status")))
            text = render(rows(before, after, t1 - t0, conns), t1 - t0)
            if args.once:
                sys.stdout.write(text)
                return 0
            sys.stdout.write("\x1b[H\x1b[2J" + text)  # clear the screen, then the table
            sys.stdout.flush()
            before, t0 = after, t1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"meshlet top: cannot read {base}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def add_top_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "top",
        help="live requests per second, success rate, latency and connections of a sidecar",
        description="Scrape a running sidecar's admin API and show its traffic per upstream "
        "and per caller.",
    )
    p.add_argument("--admin-addr", default="127.0.0.1:19000", help="the agent's admin.address")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between scrapes")
    p.add_argument("--once", action="store_true", help="print one table and exit")
    p.set_defaults(run=_run_top)
