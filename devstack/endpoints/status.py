"""/v1/status/*: the Raft leader and peers of a single-server dev cluster."""

from __future__ import annotations

from devstack.httpapi import Call, Reply, Router

RAFT_ADDR = "127.0.0.1:8300"


def routes(router: Router) -> None:
    router.add("/v1/status/leader", get=leader)
    router.add("/v1/status/peers", get=peers)


async def leader(call: Call) -> Reply:
    return call.reply(RAFT_ADDR)


async def peers(call: Call) -> Reply:
    return call.reply([RAFT_ADDR])
