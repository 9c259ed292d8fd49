"""The fuzz targets as Hypothesis properties (CI's short pass; `make fuzz` runs more examples
and atheris). Each property is the target's own check (tests/fuzz/targets.py,
tests/fuzz/http_proxy.py), fed with structured input: a valid seed from the corpus bent at one
to three places, or a request stream built from smuggling, upgrade, pipelining, absolute-form
and odd-path pieces.

FUZZ_EXAMPLES sets the number of examples per property (default: a few seconds in all).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import targets
from tests.fuzz.http_proxy import HTTPProxyHarness, check
from tests.fuzz.strategies import (
    as_json,
    as_yaml,
    filter_expressions,
    mutated,
    request_streams,
    seeds,
)

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
# `make fuzz` runs thousands of examples per property: more than the suite's 60 s per test.
pytestmark = pytest.mark.timeout(max(60, EXAMPLES // 2))

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("FUZZ_RANDOM") is None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(mutated(seeds("policy")))
def test_policy_parser_and_translator(doc: Any) -> None:
    targets.policy(as_yaml(doc))


@FUZZ
@given(mutated(seeds("intentions_entry")))
def test_intentions_entry_decoder(body: Any) -> None:
    targets.intentions_entry(as_json(body))


@FUZZ
@given(mutated(seeds("traffic_entry")))
def test_routing_entry_decoder(body: Any) -> None:
    targets.traffic_entry(as_json(body))


@FUZZ
@given(mutated(seeds("traffic_chain")))
def test_discovery_chain_compiler(bodies: Any) -> None:
    targets.traffic_chain(as_json(bodies))


@FUZZ
@given(filter_expressions)
def test_filter_expression_parser(expression: str) -> None:
    targets.filter_expression(expression.encode())


@FUZZ
@given(mutated(seeds("agent_config")))
def test_agent_config_loader(raw: Any) -> None:
    targets.agent_config(as_yaml(raw))


@FUZZ
@given(st.integers(0, 255), mutated(seeds("consul_results")))
def test_consul_answer_decoders(which: int, answer: Any) -> None:
    targets.consul_results(bytes([which]) + as_json(answer))


@FUZZ
@given(mutated(seeds("catalog")))
def test_health_answer_decoder(answer: Any) -> None:
    targets.catalog(as_json(answer))


@pytest.fixture(scope="module")
def proxy() -> Iterator[HTTPProxyHarness]:
    h = HTTPProxyHarness()
    yield h
    h.close()


@settings(FUZZ, max_examples=EXAMPLES)
@given(request_streams())
def test_http_request_path(proxy: HTTPProxyHarness, stream: tuple[str, list[bytes]]) -> None:
    via, chunks = stream
    check(proxy.exchange(via, chunks), proxy)
