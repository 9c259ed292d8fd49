"""The L4 relay scenarios again on uvloop, the loop the sidecar runs on (its transports are
not asyncio.Transport subclasses and its TLS is its own, so the stdlib run is not enough)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from tests.connect import test_l4_relay as scenarios
from tests.connect.proxy_test_ca import ProxyTestCA

WITH_PAIR = [
    scenarios.test_bytes_cross_the_mesh_both_ways,
    scenarios.test_client_without_certificate_is_refused,
    scenarios.test_plaintext_to_the_tls_port_is_refused,
    scenarios.test_a_client_close_reaches_the_app_and_releases_both_relays,
]
WITH_CA = [
    scenarios.test_denied_peer_is_closed_before_the_app_sees_a_byte,
    scenarios.test_refused_endpoint_fails_over_and_is_marked,
    scenarios.test_app_half_close_reaches_the_client_after_its_data,
    scenarios.test_stalled_reader_bounds_sidecar_buffers,
    scenarios.test_100_mb_stream_with_bounded_buffers,
]


@pytest.mark.parametrize("scenario", WITH_PAIR, ids=lambda f: f.__name__)
def test_pair_scenario_on_uvloop(
    scenario: Callable[[scenarios.Pair], Awaitable[None]], tmp_path: Path
) -> None:
    async def main() -> None:
        p, servers = await scenarios.build_pair(ProxyTestCA(tmp_path))
        try:
            await scenario(p)
        finally:
            await scenarios.close_all(p, servers)

    uvloop.run(main())


@pytest.mark.parametrize("scenario", WITH_CA, ids=lambda f: f.__name__)
def test_ca_scenario_on_uvloop(
    scenario: Callable[[ProxyTestCA], Awaitable[None]], tmp_path: Path
) -> None:
    uvloop.run(scenario(ProxyTestCA(tmp_path)))  # type: ignore[arg-type]
