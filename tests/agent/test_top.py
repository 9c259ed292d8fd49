"""`meshlet top`'s core: the view between two scrapes (agent/top.py), on the text format
agent/metrics.py renders."""

from __future__ import annotations

import math

from agent.top import Sample, parse_sample, quantile, render, rows

_API = 'reporter="source",destination_service="api"'
_BUCKET = "istio_request_duration_milliseconds_bucket"
_SCRAPE = (
    f'istio_requests_total{{{{{_API},response_code="200"}}}} {{ok}}\n'
    f'istio_requests_total{{{{{_API},response_code="503"}}}} {{bad}}\n'
    f'{_BUCKET}{{{{{_API},le="10"}}}} {{b10}}\n'
    f'{_BUCKET}{{{{{_API},le="100"}}}} {{b100}}\n'
    f'{_BUCKET}{{{{{_API},le="+Inf"}}}} {{inf}}\n'
    'istio_requests_total{{reporter="destination",source_workload="web",response_code="200"}}'
    " {ok}\n"
)


def _sample(ok: int, bad: int, b10: int, b100: int) -> Sample:
    text = _SCRAPE.format(ok=ok, bad=bad, b10=b10, b100=b100, inf=ok + bad)
    return parse_sample("# TYPE istio_requests_total counter\n" + text)


def test_rates_success_and_quantiles_between_two_scrapes() -> None:
    before = _sample(ok=100, bad=0, b10=100, b100=100)
    # 100 more requests: 10 failed; 90 under 10 ms, 10 between 10 and 100 ms.
    after = _sample(ok=190, bad=10, b10=190, b100=200)
    view = rows(before, after, 10.0, {("upstream", "api"): 3})
    api = next(r for r in view if r.direction == "upstream")
    assert api.name == "api"
    assert api.rps == 10.0
    assert api.success == 0.9
    assert api.p50 is not None and math.isclose(api.p50, 10 * 50 / 90)
    assert api.p99 is not None and math.isclose(api.p99, 10 + 90 * (99 - 90) / 10)
    assert api.connections == 3
    inbound = next(r for r in view if r.direction == "inbound")
    assert (inbound.name, inbound.rps, inbound.success) == ("web", 9.0, 1.0)
    text = render(view, 10.0)
    assert "upstream" in text and "90.0%" in text


def test_quantile_in_the_open_bucket_is_the_highest_bound() -> None:
    assert quantile(0.99, {10.0: 0.0, math.inf: 5.0}) == 10.0
    assert quantile(0.5, {}) is None
