"""Fixtures for identity tests: devstack with short-lived leaves and its Vault listener, and leaf
rotators on real sources (named so that they never shadow the shared `dev` fixtures)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import pytest

from agent.consul import ConsulClient
from agent.consul_config import ConsulConfig
from agent.consul_connect import consul_leaf_source, consul_roots_source
from connect.leaf import LeafSource
from connect.leaf_rotation import LeafRotator
from connect.leaf_vault import VaultConfig, VaultLeafSource
from connect.tls import DynamicTLS
from devstack.config import DevConfig
from devstack.server import DevServer
from tests.conftest import Http
from tests.connect.identity_support import Running, Start

VAULT_TOKEN = "devstack-root"
LEAF_TTL = 5.0


def identity_config() -> DevConfig:
    return DevConfig(
        leaf_cert_ttl=LEAF_TTL,
        min_leaf_cert_ttl=1.0,
        vault_addr="127.0.0.1:0",
        vault_token=VAULT_TOKEN,
    )


@pytest.fixture
async def ca_dev() -> AsyncIterator[DevServer]:
    """devstack with 5-second leaves and its Vault listener (the Connect CA's provider)."""
    async with DevServer(identity_config()) as server:
        yield server


@pytest.fixture
async def ca_http(ca_dev: DevServer) -> AsyncIterator[Http]:
    async with aiohttp.ClientSession() as session:
        yield Http(session, ca_dev.http_url)


@pytest.fixture
async def ca_consul(ca_dev: DevServer) -> AsyncIterator[ConsulClient]:
    async with ConsulClient(ConsulConfig(address=ca_dev.http_addr, timeout=5.0)) as client:
        yield client


def vault_url(dev: DevServer) -> str:
    assert dev.identity.vault is not None
    return dev.identity.vault.url


def leaf_source(kind: str, dev: DevServer, consul: ConsulClient, service: str) -> LeafSource:
    if kind == "consul":
        return consul_leaf_source(consul, service)
    return VaultLeafSource(VaultConfig(addr=vault_url(dev), token=VAULT_TOKEN), service, "dc1")


@pytest.fixture
async def start_rotator(ca_dev: DevServer, ca_consul: ConsulClient) -> AsyncIterator[Start]:
    """Start a rotator for (source kind, service) and keep a DynamicTLS following it."""
    running: list[Running] = []

    async def start(kind: str, service: str) -> Running:
        source = leaf_source(kind, ca_dev, ca_consul, service)
        rotator = LeafRotator(source, consul_roots_source(ca_consul))
        task = asyncio.create_task(rotator.run())
        first = await asyncio.wait_for(rotator.ready(), 20)
        tls = DynamicTLS(first)
        generations = [first]

        async def follow() -> None:
            gen = first.generation
            while True:
                material = await rotator.changed(gen)
                tls.update(material)
                generations.append(material)
                gen = material.generation

        run = Running(rotator, tls, task, asyncio.create_task(follow()), generations)
        running.append(run)
        return run

    yield start
    for run in running:
        for task in (run.follower, run.task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
