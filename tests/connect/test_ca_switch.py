"""A CA replaced without cross-signing (issue 14: Consul restarted empty has a new CA and trust
domain). Before: the rotator trusted only the new roots at once and put the new CA's leaf in
use as soon as Consul signed it, so a peer that had not switched yet refused it, and we refused
the peer's old leaf. Now: the union of old and new roots (and trust domains) is trusted for a
bounded grace, and the new leaf is presented only after a delay.

Real certificates from two devstack CAs; the rotator's sources are small in-memory ones (the
source is not what is tested here; tests/connect/test_ca_switch_sockets.py runs devstack over
HTTP and real TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import time

import pytest

from connect.ca_switch import SwitchPolicy, switch_without_cross_signing, trusted
from connect.dataplane.codec import from_wire, to_wire
from connect.dataplane.snapshot import PushedLeaf, PushedMaterial, PushedRoots
from connect.identity import PeerRefused
from connect.leaf import Leaf, Material, TrustBundle
from connect.leaf_chain import chain_problem
from connect.leaf_rotation import LeafRotator
from connect.tls import DynamicTLS, HandshakeRefused, accept_tls
from devstack.connect_ca import CASettings, ConnectCA
from devstack.store import Store


def _ca() -> ConnectCA:
    ca = ConnectCA(Store(), datacenter="dc1", settings=CASettings())
    ca.initialize()
    return ca


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _bundle(ca: ConnectCA, index: int) -> TrustBundle:
    return TrustBundle.from_consul(ca.roots_json(), index)


def _leaf(ca: ConnectCA, service: str = "web") -> Leaf:
    return Leaf.from_consul(ca.leaf_json(ca.leaf(service, _now())))


class _Control:
    """One control plane whose CA the test replaces: roots as a blocking source, leaves as a
    non-blocking one (the rotator decides when to ask, as with Vault)."""

    name = "test"
    blocking = False

    def __init__(self) -> None:
        self.ca = _ca()
        self.index = 1
        self._changed = asyncio.Event()

    def replace(self) -> None:
        self.ca = _ca()
        self.index += 1
        self._changed.set()

    async def roots(self, index: int) -> TrustBundle:
        if index >= self.index:
            self._changed.clear()
            await self._changed.wait()
        return _bundle(self.ca, self.index)

    async def fetch(self, current: Leaf | None, bundle: TrustBundle) -> Leaf:
        return _leaf(self.ca)


POLICY = SwitchPolicy(delay=0.5, jitter=0.0, grace=1.5)


async def test_new_roots_without_the_served_root_are_trusted_with_the_old_for_a_grace() -> None:
    control = _Control()
    rotator = LeafRotator(control, control, switch=POLICY)
    seen: list[tuple[float, Material]] = []
    task = asyncio.create_task(rotator.run())
    try:
        first = await asyncio.wait_for(rotator.ready(), 10)
        old_td = first.bundle.trust_domain
        old_roots = first.bundle.roots_pem
        changed_at = time.time()
        control.replace()
        new = _bundle(control.ca, control.index)
        material = first
        while material.bundle.roots_pem != new.roots_pem:
            material = await asyncio.wait_for(rotator.changed(material.generation), 10)
            seen.append((time.time(), material))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # At once: both CAs' roots and trust domains trusted, the old leaf still presented.
    _, union = seen[0]
    assert union.leaf.serial == first.leaf.serial
    assert set(union.bundle.roots_pem) == set(old_roots) | set(new.roots_pem)
    assert union.bundle.trust_domain == new.trust_domain
    assert union.bundle.grace_domains == (old_td,)
    assert not chain_problem(union.leaf, union.bundle, _now())
    assert rotator.ca_switches == 1
    assert rotator.chain_breaks == 0
    # The new CA's leaf: presented no earlier than the delay after the change, while the old
    # roots are still trusted (peers switching later still present old leaves).
    [(adopted_at, adopted)] = [(t, m) for t, m in seen if m.leaf.serial != first.leaf.serial][:1]
    assert adopted_at >= changed_at + POLICY.delay
    assert adopted.leaf.service_uri.startswith(f"spiffe://{new.trust_domain}/")
    assert set(old_roots) <= set(adopted.bundle.roots_pem)
    # After the grace: the new roots only, the old trust domain no longer accepted.
    dropped_at, final = seen[-1]
    assert dropped_at >= changed_at + POLICY.grace
    assert final.bundle.roots_pem == new.roots_pem
    assert final.bundle.grace_domains == ()
    assert not chain_problem(final.leaf, final.bundle, _now())
    assert chain_problem(first.leaf, final.bundle, _now())
    assert rotator.grace is None


def test_the_old_roots_are_trusted_no_longer_than_the_old_leaf() -> None:
    ca = _ca()
    leaf = _leaf(ca)
    old = _bundle(ca, 1)
    new = _bundle(_ca(), 2)
    expiry = leaf.valid_before.timestamp()
    now = expiry - 1.0  # less than the grace left
    grace = switch_without_cross_signing(leaf, old, new, now, 0.5, policy=POLICY)
    assert grace is not None
    assert grace.until == expiry
    assert trusted(new, grace, expiry - 0.5).roots_pem != new.roots_pem
    assert trusted(new, grace, expiry) == new
    # The delay is drawn: delay + jitter * draw.
    wide = SwitchPolicy(delay=5.0, jitter=5.0, grace=30.0)
    at = time.time()
    far = switch_without_cross_signing(leaf, old, new, at, 0.5, policy=wide)
    assert far is not None
    assert (far.adopt_at, far.until) == (at + 7.5, at + 30.0)


async def test_a_cross_signed_rotation_is_not_a_switch() -> None:
    ca = _ca()
    leaf = _leaf(ca)
    old = _bundle(ca, 1)
    ca.rotate()
    new = _bundle(ca, 2)
    assert switch_without_cross_signing(leaf, old, new, time.time(), 0.0, policy=POLICY) is None
    assert trusted(new, None, time.time()) == new


async def test_a_cross_signed_rotation_publishes_the_roots_as_given() -> None:
    control = _Control()
    rotator = LeafRotator(control, control, switch=POLICY)
    task = asyncio.create_task(rotator.run())
    try:
        first = await asyncio.wait_for(rotator.ready(), 10)
        control.ca.rotate()
        control.index += 1
        control._changed.set()
        new = _bundle(control.ca, control.index)
        material = first
        while material.bundle.roots_pem != new.roots_pem:
            material = await asyncio.wait_for(rotator.changed(material.generation), 10)
            assert material.bundle.grace_until == 0.0
        assert material.bundle == new
        assert rotator.ca_switches == 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_policy_needs_a_grace_longer_than_the_delay() -> None:
    with pytest.raises(ValueError, match="delay"):
        SwitchPolicy(delay=5.0, jitter=5.0, grace=10.0)


async def test_the_pushed_roots_carry_the_grace_to_a_data_plane() -> None:
    """What agent/sidecar.py pushes to a data-plane process, through its wire codec: a data
    plane serving the old leaf accepts a peer's new-CA leaf (new trust domain) and a peer's old
    leaf during the grace, and the old leaf no more once the plain new roots are pushed."""
    old_ca, new_ca = _ca(), _ca()
    old, new = _bundle(old_ca, 1), _bundle(new_ca, 2)
    api_old = _leaf(old_ca, "api")
    grace = switch_without_cross_signing(api_old, old, new, time.time(), 0.0, policy=POLICY)
    assert grace is not None
    union = trusted(new, grace, time.time())

    def pushed(bundle: TrustBundle) -> DynamicTLS[PushedMaterial]:
        material = PushedMaterial(
            PushedLeaf(api_old.cert_pem, api_old.key_pem, api_old.service_uri, 0.0),
            PushedRoots(bundle.pem, bundle.trust_domain, bundle.grace_domains),
        )
        decoded: PushedMaterial = from_wire(
            PushedMaterial, json.loads(json.dumps(to_wire(material)))
        )
        return DynamicTLS(decoded)

    async def accepts(server: DynamicTLS[PushedMaterial], leaf: Leaf) -> str:
        """The peer's trust domain as `server` verified it, or why it refused it."""
        verdict: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def serve(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                verdict.set_result((await accept_tls(writer, server)).trust_domain)
            except (HandshakeRefused, PeerRefused) as err:
                verdict.set_result(f"refused: {err}")
            finally:
                writer.close()

        listener = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        client = DynamicTLS(Material(leaf, union, 1))
        try:
            with contextlib.suppress(OSError, ConnectionError):
                _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client.client())
                writer.close()
            return await asyncio.wait_for(verdict, 10)
        finally:
            listener.close()
            await listener.wait_closed()

    data_plane = pushed(union)
    assert data_plane.grace_domains == (old.trust_domain,)
    assert await accepts(data_plane, _leaf(new_ca)) == new.trust_domain
    assert await accepts(data_plane, _leaf(old_ca)) == old.trust_domain
    assert (await accepts(pushed(new), _leaf(old_ca))).startswith("refused")
