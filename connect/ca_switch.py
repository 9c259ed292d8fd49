"""A CA replaced without cross-signing: how long the vanished roots stay trusted, and when
the new CA's leaf may be put in use. Pure: the rotator (connect.leaf_rotation) applies it.

Consul restarted without its state (`consul agent -dev` killed and started again) comes back
with a new CA and trust domain; it has no old key to cross-sign the new root with. Each
sidecar's agent notices at its own time, so with a hard switch a sidecar that already presents
a new-CA leaf is refused by a peer still trusting only the old root, until that peer switches.
So, when new roots no longer sign the leaf we serve: trust the union of the new roots and the
vanished ones at once, keep presenting the old leaf for `delay` (+ jitter, as Consul's agent
spreads re-signing after a root change, consul:agent/leafcert caChangeJitterWindow) so that
every peer already trusts the new root when any presents a new leaf, and drop the vanished
roots at the earlier of `grace` after the change and the old leaf's expiry. The risk accepted:
a vanished root stays trusted for at most that long.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass

from connect.leaf import Leaf, TrustBundle
from connect.leaf_chain import chain_problem


@dataclass(frozen=True)
class SwitchPolicy:
    delay: float = 5.0
    """Seconds the old leaf is still presented after the roots changed."""
    jitter: float = 5.0
    """Up to this much more, drawn per change, so peers do not all re-sign at once."""
    grace: float = 30.0
    """Seconds after the change the vanished roots stop being trusted (or earlier: the old
    leaf's expiry). Must outlast delay + jitter plus the spread of the peers' switches."""

    def __post_init__(self) -> None:
        if self.delay < 0 or self.jitter < 0 or self.grace <= self.delay + self.jitter:
            raise ValueError(
                "CA switch policy needs 0 <= delay, 0 <= jitter, delay + jitter < grace"
            )


DEFAULT_SWITCH = SwitchPolicy()


@dataclass(frozen=True)
class Grace:
    """One CA switch in progress."""

    old_roots: tuple[str, ...]
    """The roots (and intermediates) the new bundle no longer lists."""
    old_domain: str
    """The old trust domain ("" when the new bundle keeps the same one)."""
    adopt_at: float
    """Epoch seconds: a leaf of the new CA is put in use no earlier."""
    until: float
    """Epoch seconds: the old roots and domain are trusted until then, never later."""


def _ts(when: datetime.datetime) -> float:
    return when.timestamp()


def switch_without_cross_signing(
    leaf: Leaf,
    old: TrustBundle,
    new: TrustBundle,
    now: float,
    draw: float,
    *,
    policy: SwitchPolicy = DEFAULT_SWITCH,
) -> Grace | None:
    """The grace to apply when `new` replaces `old` while `leaf` is served, or None when the
    new roots still sign `leaf` (a normal or cross-signed rotation), or when `leaf` was not
    usable under `old` either (nothing worth keeping). `draw` is uniform in [0, 1)."""
    at = datetime.datetime.fromtimestamp(now, datetime.UTC)
    if chain_problem(leaf, old, at):
        return None
    # Judge the chain alone: the trust domain may change with the CA, which is the point.
    if not chain_problem(leaf, dataclasses.replace(new, trust_domain=old.trust_domain), at):
        return None
    vanished = tuple(pem for pem in old.roots_pem if pem not in new.roots_pem)
    return Grace(
        old_roots=vanished,
        old_domain=old.trust_domain if old.trust_domain != new.trust_domain else "",
        adopt_at=now + policy.delay + policy.jitter * draw,
        until=min(now + policy.grace, _ts(leaf.valid_before)),
    )


def trusted(bundle: TrustBundle, grace: Grace | None, now: float) -> TrustBundle:
    """The bundle to trust at `now`: `bundle` plus, while the grace lasts, the vanished roots
    and the old trust domain."""
    if grace is None or now >= grace.until:
        return bundle
    domains = (grace.old_domain,) if grace.old_domain else ()
    return dataclasses.replace(
        bundle,
        roots_pem=tuple(dict.fromkeys(bundle.roots_pem + grace.old_roots)),
        grace_domains=domains,
        grace_until=grace.until,
    )
