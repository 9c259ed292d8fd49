"""Wiring the Consul client's `connect` group into connect's leaf and roots sources.

connect cannot import the agent (the agent imports connect), so this is where the client's
exception tree is told to connect: `ConsulUnavailable` is worth retrying, the rest refuses.
"""

from __future__ import annotations

from agent.consul import ConsulClient
from agent.consul_errors import (
    ConsulConfigError,
    ConsulNotFound,
    ConsulRejected,
    ConsulUnavailable,
)
from connect.leaf_consul import ConsulLeafSource, ConsulRootsSource, ErrorKinds

CONSUL_ERRORS = ErrorKinds(
    unavailable=(ConsulUnavailable,),
    rejected=(ConsulRejected, ConsulNotFound, ConsulConfigError),
)


def consul_leaf_source(client: ConsulClient, service: str) -> ConsulLeafSource:
    return ConsulLeafSource(client.connect, service, CONSUL_ERRORS)


def consul_roots_source(client: ConsulClient) -> ConsulRootsSource:
    return ConsulRootsSource(client.connect, CONSUL_ERRORS)
