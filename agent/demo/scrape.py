"""What one scrape of a sidecar's /metrics says about its requests, pure.

The demo reads the sidecars' own Istio-named metrics (`istio_requests_total` and the
`istio_request_duration_milliseconds` histogram, as ../examples' mesh-queries.promql does) and
computes from two scrapes what Prometheus would: the request rate by destination service and the
p99 latency (`histogram_quantile(0.99, ...)` over the buckets' increase). The destination is
the `destination_service_name` label (the Consul service name), else the first label of
`destination_service` (Istio's FQDN).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

REQUESTS = "istio_requests_total"
DURATION_BUCKET = "istio_request_duration_milliseconds_bucket"


class ScrapeError(ValueError):
    """A /metrics answer that is not the Prometheus text format."""


@dataclass(frozen=True)
class Scrape:
    """Per destination service, as seen by one reporter on one sidecar."""

    requests: Mapping[str, float]
    """Requests answered, any response code."""
    buckets: Mapping[str, Mapping[float, float]]
    """Cumulative histogram: upper bound (ms, `inf` last) -> requests at or below it."""


def _destination(labels: Mapping[str, str]) -> str:
    name = labels.get("destination_service_name", "")
    return name or labels.get("destination_service", "").partition(".")[0]


def parse(text: str, reporter: str) -> Scrape:
    """Sum the samples of `reporter` ("source" or "destination") by destination service."""
    requests: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as err:
        raise ScrapeError(f"not Prometheus text: {err}") from None
    for family in families:
        for sample in family.samples:
            if sample.labels.get("reporter") != reporter:
                continue
            dest = _destination(sample.labels)
            if sample.name == REQUESTS:
                requests[dest] = requests.get(dest, 0.0) + sample.value
            elif sample.name == DURATION_BUCKET:
                try:
                    bound = float(sample.labels["le"])
                except (KeyError, ValueError):
                    raise ScrapeError(f"{DURATION_BUCKET} sample without a valid le") from None
                per = buckets.setdefault(dest, {})
                per[bound] = per.get(bound, 0.0) + sample.value
    return Scrape(requests, buckets)


def increase(new: Scrape, old: Scrape, destination: str) -> tuple[float, dict[float, float]]:
    """Requests and histogram buckets of `destination` between two scrapes."""
    before = old.buckets.get(destination, {})
    return (
        new.requests.get(destination, 0.0) - old.requests.get(destination, 0.0),
        {le: n - before.get(le, 0.0) for le, n in new.buckets.get(destination, {}).items()},
    )


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus's histogram_quantile over cumulative buckets; None without observations.

    Linear interpolation inside the bucket holding the rank; the lowest bucket starts at 0; a
    rank in the +Inf bucket answers the highest finite bound (as Prometheus does).
    """
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            if inside <= 0:
                return bound
            return lower + (bound - lower) * (rank - below) / inside
        lower, below = bound, count
    return lower


def bound_at_or_above(value: float, buckets: Mapping[float, float]) -> float:
    """The smallest bucket bound >= value: how high a quantile of values <= value can read."""
    return min((b for b in buckets if b >= value), default=math.inf)
