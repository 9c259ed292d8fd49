"""`chain_problem`: would a peer holding this bundle accept our leaf? Real certificates from
devstack's issuer, the shapes Consul produces: a root, a cross-signed rotation, a replaced CA."""

from __future__ import annotations

import datetime

from connect.identity import service_identity
from connect.leaf import Leaf, TrustBundle
from connect.leaf_chain import chain_problem
from devstack.issuer import Issuer, cert_pem, generate_key, key_pem, new_root

NOW = datetime.datetime.now(datetime.UTC)
TD = "11111111-2222-3333-4444-555555555555.consul"
OTHER_TD = "99999999-2222-3333-4444-555555555555.consul"
DAY = datetime.timedelta(days=1)


def _root(name: str, td: str = TD, *, now: datetime.datetime = NOW) -> Issuer:
    return new_root(name, uri_sans=[f"spiffe://{td}"], ttl=DAY, now=now)


def _leaf(issuer: Issuer, td: str = TD, *, now: datetime.datetime = NOW) -> Leaf:
    key = generate_key("ec", 256)
    uri = service_identity(td, "dc1", "web").uri
    cert = issuer.sign_leaf(
        key.public_key(), uri_sans=[uri], ttl=datetime.timedelta(hours=1), now=now
    )
    chain = cert_pem(cert) + "".join(cert_pem(c) for c in issuer.chain)
    return Leaf.from_pem(chain, key_pem(key), source="test")


def _bundle(*pems: str, td: str = TD) -> TrustBundle:
    return TrustBundle(td, "id", "subject", tuple(pems))


def _rotated(old: Issuer) -> tuple[Issuer, str]:
    """A new root cross-signed by `old`, as devstack's and Consul's rotation make it."""
    fresh = _root("new")
    cross = old.cross_sign(fresh.cert, NOW)
    return Issuer(fresh.name, fresh.key, fresh.cert, (cross,), fresh.id), cert_pem(cross)


def test_a_leaf_of_the_bundles_root_chains() -> None:
    root = _root("old")
    assert chain_problem(_leaf(root), _bundle(root.pem), NOW) == ""


def test_a_cross_signed_rotation_keeps_both_generations_chaining() -> None:
    old = _root("old")
    new, cross = _rotated(old)
    old_leaf, new_leaf = _leaf(old), _leaf(new)
    during = _bundle(old.pem, new.pem, cross)
    assert chain_problem(old_leaf, during, NOW) == ""
    assert chain_problem(new_leaf, during, NOW) == ""
    # A peer that still has only the old root verifies a new leaf through the cross-signature
    # the leaf carries.
    assert chain_problem(new_leaf, _bundle(old.pem), NOW) == ""
    # Once the old root is gone, its leaves no longer chain.
    problem = chain_problem(old_leaf, _bundle(new.pem, cross), NOW)
    assert "does not chain" in problem and old_leaf.serial in problem


def test_replaced_roots_with_a_new_trust_domain() -> None:
    old, fresh = _root("old"), _root("fresh", OTHER_TD)
    leaf = _leaf(old)
    problem = chain_problem(leaf, _bundle(fresh.pem, td=OTHER_TD), NOW)
    assert leaf.service_uri in problem and OTHER_TD in problem
    # Same root, but the bundle names another trust domain: the SPIFFE ID is refused.
    assert "trust domain" in chain_problem(leaf, _bundle(old.pem, td=OTHER_TD), NOW)


def test_an_expired_leaf_is_refused() -> None:
    root = _root("old")
    leaf = _leaf(root)
    assert "expired" in chain_problem(leaf, _bundle(root.pem), NOW + datetime.timedelta(hours=2))


def test_an_unrelated_root_with_the_same_name_is_not_an_issuer() -> None:
    root = _root("same")
    impostor = _root("same")
    assert "does not chain" in chain_problem(_leaf(root), _bundle(impostor.pem), NOW)
