"""The demo's pure pieces: reading /metrics as Prometheus would, its tables, the XFCC reading,
and the examples it ships (the same files as tests/traffic/istio-examples)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from agent.demo.apps import caller_uri, service_of
from agent.demo.examples import APPLIES, EXAMPLES
from agent.demo.scrape import ScrapeError, bound_at_or_above, increase, parse, quantile
from agent.demo.table import Table

ISTIO_EXAMPLES = Path(__file__).parent.parent / "traffic" / "istio-examples"

# The shape issue 12 gives the sidecars' metrics: Istio's names and labels.
API = 'reporter="source",destination_service_name="api"'
DURATION = "istio_request_duration_milliseconds"
METRICS = "\n".join(
    [
        "# TYPE istio_requests_total counter",
        f'istio_requests_total{{{API},response_code="200"}} 90',
        f'istio_requests_total{{{API},response_code="503"}} 10',
        'istio_requests_total{reporter="destination",destination_service_name="api"} 7',
        'istio_requests_total{reporter="source",'
        'destination_service="payment-service.default.svc.cluster.local"} 4',
        f"# TYPE {DURATION} histogram",
        *(
            f'{DURATION}_bucket{{{API},response_code="{code}",le="{le}"}} {n}'
            for code, counts in (("200", (0, 50, 90, 90)), ("503", (0, 0, 0, 10)))
            for le, n in zip(("1.0", "5.0", "10.0", "+Inf"), counts, strict=True)
        ),
        f'{DURATION}_sum{{{API},response_code="200"}} 400',
        f'{DURATION}_count{{{API},response_code="200"}} 90',
        f'{DURATION}_sum{{{API},response_code="503"}} 200',
        f'{DURATION}_count{{{API},response_code="503"}} 10',
        "",
    ]
)


def test_parse_sums_one_reporter_by_destination_service() -> None:
    scrape = parse(METRICS, "source")
    assert scrape.requests == {"api": 100.0, "payment-service": 4.0}
    assert scrape.buckets["api"] == {1.0: 0.0, 5.0: 50.0, 10.0: 90.0, math.inf: 100.0}
    assert parse(METRICS, "destination").requests == {"api": 7.0}


def test_parse_refuses_what_is_not_prometheus_text() -> None:
    with pytest.raises(ScrapeError):
        parse('istio_requests_total{reporter="source" 1\n', "source")


def test_quantile_interpolates_as_prometheus_histogram_quantile() -> None:
    buckets = {1.0: 0.0, 5.0: 50.0, 10.0: 90.0, math.inf: 100.0}
    # rank 50 of 100 is the top of the (1, 5] bucket; rank 70 is half-way through (5, 10].
    assert quantile(0.5, buckets) == pytest.approx(5.0)
    assert quantile(0.7, buckets) == pytest.approx(7.5)
    # rank 99 lies in +Inf: Prometheus answers the highest finite bound.
    assert quantile(0.99, buckets) == 10.0
    # The lowest bucket starts at 0.
    assert quantile(0.5, {2.0: 10.0, math.inf: 10.0}) == pytest.approx(1.0)
    assert quantile(0.99, {1.0: 0.0, math.inf: 0.0}) is None
    assert quantile(0.99, {}) is None
    assert quantile(0.99, {1.0: 3.0}) is None  # no +Inf bucket: not a histogram


def test_increase_between_scrapes() -> None:
    old = parse(METRICS, "source")
    new = parse(METRICS.replace("} 90\n", "} 190\n"), "source")  # 100 more 200s, <= 10 ms
    count, buckets = increase(new, old, "api")
    assert count == 100.0
    assert buckets[10.0] == 100.0 and buckets[5.0] == 0.0
    assert increase(new, old, "nobody") == (0.0, {})


def test_bound_at_or_above() -> None:
    buckets = {1.0: 0.0, 5.0: 0.0, math.inf: 0.0}
    assert bound_at_or_above(3.2, buckets) == 5.0
    assert bound_at_or_above(5.0, buckets) == 5.0
    assert bound_at_or_above(6.0, buckets) == math.inf


def test_table_rows_line_up_under_the_header() -> None:
    table = Table((("t", -4), ("sent", 6), ("who", -5)))
    assert table.header() == "    t       sent  who"
    assert table.row("1s", 120, "web") == "    1s       120  web"
    with pytest.raises(ValueError):
        table.row("1s")


def test_caller_uri_reads_the_xfcc_uri() -> None:
    uri = "spiffe://1111.consul/ns/default/dc/dc1/svc/web"
    xfcc = f"By=spiffe://1111.consul/ns/default/dc/dc1/svc/api;Hash=ab12;URI={uri}"
    assert caller_uri(xfcc) == uri
    assert service_of(uri) == "web"
    assert caller_uri("") == "" and service_of("") == ""


def test_the_demo_applies_the_repository_examples() -> None:
    shipped = {name for apply in APPLIES for name in apply.files}
    assert shipped == {p.name for p in EXAMPLES.iterdir() if p.name.endswith(".yaml")}
    for name in shipped:
        copy = ISTIO_EXAMPLES / name
        if copy.exists():
            assert EXAMPLES.joinpath(name).read_text() == copy.read_text(), name
