"""HTTP sidecar scenarios again on uvloop, the loop the sidecar runs on."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import uvloop

from tests.connect import test_http_proxy as scenarios
from tests.connect.proxy_test_ca import ProxyTestCA

WITH_SESSION = [
    scenarios.test_request_crosses_the_mesh_with_xfcc_and_request_id,
    scenarios.test_keep_alive_reuses_one_mesh_connection,
    scenarios.test_head_and_204_do_not_hang,
    scenarios.test_100_mb_upload_streams_with_bounded_buffers,
    scenarios.test_100_mb_download_streams_with_bounded_buffers,
    scenarios.test_websocket_echo_through_the_mesh,
]
WITH_MESH = [
    scenarios.test_l7_intention_denies_with_403_and_keeps_the_connection,
    scenarios.test_pipelined_requests_are_answered_in_order,
    scenarios.test_expect_100_continue,
]


@pytest.mark.parametrize("scenario", WITH_SESSION, ids=lambda f: f.__name__)
def test_session_scenario_on_uvloop(
    scenario: Callable[[scenarios.Mesh, aiohttp.ClientSession], Awaitable[None]], tmp_path: Path
) -> None:
    async def main() -> None:
        mesh = await scenarios.build_mesh(ProxyTestCA(tmp_path))
        try:
            async with aiohttp.ClientSession(auto_decompress=False) as session:
                await scenario(mesh, session)
        finally:
            await mesh.close()

    uvloop.run(main())


@pytest.mark.parametrize("scenario", WITH_MESH, ids=lambda f: f.__name__)
def test_mesh_scenario_on_uvloop(
    scenario: Callable[[scenarios.Mesh], Awaitable[None]], tmp_path: Path
) -> None:
    async def main() -> None:
        mesh = await scenarios.build_mesh(ProxyTestCA(tmp_path))
        try:
            await scenario(mesh)
        finally:
            await mesh.close()

    uvloop.run(main())
