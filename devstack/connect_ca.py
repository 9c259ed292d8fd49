"""The Connect CA: roots, the CA configuration, root rotation and the agent's leaf cache.

Consul's CA manager and the agent's leaf-certificate cache in one object:

- roots: exactly one active; a rotation makes a new root, cross-signs it with the old one (the
  cross-signed certificate becomes the new root's intermediate and follows every new leaf) and
  keeps the old root listed, inactive, until the leaves it signed have expired;
- leaves: one per service name, issued on first request and re-issued when the active root
  changes or the leaf passes its soft expiry, a random point in 60-90 % of its lifetime
  (consul:agent/leafcert), which is when blocked leaf queries return. After the active root
  changes, Consul's agent waits a random delay of up to 30 s before re-signing
  (`caChangeJitterWindow`, consul:agent/leafcert/generate.go) and meanwhile answers with the
  leaf it holds; `change_delay` models that as a fixed delay (0 by default, as Consul's
  `TestOverrideCAChangeInitialDelay` does in its tests);
- `ForceWithoutCrossSigning` skips the cross-signature, as in Consul. A devstack extension: a
  PUT whose `ClusterID` differs from the current one replaces the CA as a re-bootstrapped
  cluster would (new trust domain, new root, the old roots dropped, nothing cross-signed).
  Consul itself ignores `ClusterID` in a PUT (consul:agent/consul/leader_connect_ca.go "Don't
  allow users to change the ClusterID"); the extension lets tests reproduce a mesh whose roots
  were replaced under running sidecars.

Every change commits the store's index, so blocking queries wake as for any other write. The
provider (where root keys live) is Consul's built-in one, or devstack's Vault PKI mount.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from connect.identity import service_identity, trust_domain_uri
from devstack.durations import DurationError, duration_from_json, format_duration
from devstack.issuer import (
    EC_CURVES,
    RSA_BITS,
    Issuer,
    KeySpecError,
    cert_pem,
    generate_key,
    key_pem,
    new_root,
)
from devstack.issuer import serial_hex as serial_text
from devstack.store import Store

log = logging.getLogger("devstack.connect_ca")

ROOTS_TABLE = "connect-ca-roots"
CONFIG_TABLE = "connect-ca-config"
HOUR = 3600.0
SOFT_EXPIRY = (0.6, 0.9)
# How long an inactive root stays listed after the last leaf it could have signed expires.
PRUNE_GRACE = 1.0


class CAConfigError(ValueError):
    """A CA configuration Consul would refuse; str() is Consul's text."""


class RootProvider(Protocol):
    """Where root keys come from: Consul's built-in provider, or a Vault PKI mount."""

    name: str

    def generate_root(
        self,
        common_name: str,
        *,
        uri_sans: Sequence[str],
        key_type: str,
        key_bits: int,
        ttl: datetime.timedelta,
        now: datetime.datetime,
    ) -> Issuer: ...

    def adopt(self, issuer: Issuer) -> None:
        """Take back a root the CA completed (with its cross-signature) after generating it."""

    def config(self) -> dict[str, Any]:
        """Provider-specific keys shown in the CA configuration (secrets left out)."""


class ConsulProvider:
    name = "consul"

    def generate_root(
        self,
        common_name: str,
        *,
        uri_sans: Sequence[str],
        key_type: str,
        key_bits: int,
        ttl: datetime.timedelta,
        now: datetime.datetime,
    ) -> Issuer:
        return new_root(
            common_name, uri_sans=uri_sans, key_type=key_type, key_bits=key_bits, ttl=ttl, now=now
        )

    def adopt(self, issuer: Issuer) -> None:
        pass

    def config(self) -> dict[str, Any]:
        return {}


@dataclass
class CARoot:
    issuer: Issuer
    active: bool
    create_index: int
    modify_index: int
    # Cross-signatures by the roots before it, in order (Consul's IntermediateCerts).
    intermediates: list[str] = field(default_factory=list)
    retired_at: datetime.datetime | None = None


@dataclass(frozen=True)
class IssuedLeaf:
    service: str
    service_uri: str
    cert_pem: str
    key_pem: str = field(repr=False)
    serial: str
    valid_after: datetime.datetime
    valid_before: datetime.datetime
    soft_expiry: datetime.datetime
    root_id: str
    create_index: int
    modify_index: int


@dataclass(frozen=True)
class CASettings:
    """The common CA keys devstack honours; everything else sent is stored and echoed."""

    leaf_cert_ttl: float = 72 * HOUR
    intermediate_cert_ttl: float = 8760 * HOUR
    root_cert_ttl: float = 87600 * HOUR
    private_key_type: str = "ec"
    private_key_bits: int = 256


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _rfc3339(t: datetime.datetime) -> str:
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ConnectCA:
    def __init__(
        self,
        store: Store,
        *,
        datacenter: str,
        settings: CASettings,
        provider: RootProvider | None = None,
        min_leaf_ttl: float = HOUR,
        cluster_id: str | None = None,
        change_delay: float = 0.0,
    ) -> None:
        self.store = store
        self.datacenter = datacenter
        self.cluster_id = cluster_id or str(uuid.uuid4())
        self.trust_domain = f"{self.cluster_id}.consul"
        self.settings = settings
        self.provider: RootProvider = provider or ConsulProvider()
        self.min_leaf_ttl = min_leaf_ttl
        # Unknown keys sent in a PUT: stored and echoed, as for providers devstack fakes.
        self.extra_config: dict[str, Any] = {}
        # Consul stores Config as the caller wrote it and reads it back verbatim ("72h" stays
        # "72h"); None until the first PUT, when the defaults are shown.
        self.written_config: dict[str, Any] | None = None
        self.roots: list[CARoot] = []
        self.leaves: dict[str, IssuedLeaf] = {}
        self.config_create_index = 0
        self.config_modify_index = 0
        self._timers: list[asyncio.TimerHandle] = []
        self.closing = asyncio.Event()
        self.change_delay = change_delay
        # When the active root last changed: leaves of other roots are re-signed from
        # `rotated_at + change_delay` on.
        self.rotated_at: datetime.datetime | None = None

    # ---- roots -----------------------------------------------------------------------------

    def initialize(self) -> None:
        """Generate the first root (Consul does this when the leader establishes the CA)."""
        issuer = self._generate_root(self.settings)
        index = self.store._commit([ROOTS_TABLE, CONFIG_TABLE])
        self.roots = [CARoot(issuer, active=True, create_index=index, modify_index=index)]
        self.config_create_index = self.config_modify_index = index

    def _generate_root(self, settings: CASettings) -> Issuer:
        short = self.cluster_id[:8]
        name = f"pri-{uuid.uuid4().hex[:8]}.consul.ca.{short}.consul"
        return self.provider.generate_root(
            name,
            uri_sans=[trust_domain_uri(self.trust_domain)],
            key_type=settings.private_key_type,
            key_bits=settings.private_key_bits,
            ttl=datetime.timedelta(seconds=settings.root_cert_ttl),
            now=utcnow(),
        )

    @property
    def active(self) -> CARoot:
        return next(r for r in self.roots if r.active)

    def roots_index(self) -> int:
        return self.store.table_index(ROOTS_TABLE)

    def roots_json(self) -> dict[str, Any]:
        active = self.active
        return {
            "ActiveRootID": active.issuer.fingerprint,
            "TrustDomain": self.trust_domain,
            "Roots": [self._root_json(r) for r in self.roots],
        }

    def _root_json(self, root: CARoot) -> dict[str, Any]:
        cert = root.issuer.cert
        return {
            "ID": root.issuer.fingerprint,
            "Name": "Consul CA Primary Cert",
            "SerialNumber": cert.serial_number,
            "SigningKeyID": root.issuer.key_id,
            "ExternalTrustDomain": self.cluster_id,
            "NotBefore": _rfc3339(cert.not_valid_before_utc),
            "NotAfter": _rfc3339(cert.not_valid_after_utc),
            "RootCert": root.issuer.pem,
            "IntermediateCerts": list(root.intermediates) or None,
            "Active": root.active,
            "PrivateKeyType": root.issuer.key_type,
            "PrivateKeyBits": root.issuer.key_bits,
            "CreateIndex": root.create_index,
            "ModifyIndex": root.modify_index,
        }

    def roots_pem(self) -> str:
        return "".join(r.issuer.pem + "".join(r.intermediates) for r in self.roots)

    def rotate(
        self,
        settings: CASettings | None = None,
        provider: RootProvider | None = None,
        *,
        cross_sign: bool = True,
    ) -> None:
        """Make a new active root, cross-signed by the current one unless `cross_sign` is
        False (Consul's ForceWithoutCrossSigning)."""
        settings = settings or self.settings
        if provider is not None:
            self.provider = provider
        old = self.active
        fresh = self._generate_root(settings)
        intermediates: list[str] = []
        if cross_sign:
            cross = old.issuer.cross_sign(fresh.cert, utcnow())
            fresh = Issuer(
                name=fresh.name, key=fresh.key, cert=fresh.cert, chain=(cross,), id=fresh.id
            )
            intermediates = [cert_pem(cross)]
        self.provider.adopt(fresh)
        index = self.store._commit([ROOTS_TABLE])
        old.active = False
        old.modify_index = index
        old.retired_at = utcnow()
        self.rotated_at = old.retired_at
        self.roots.append(
            CARoot(
                fresh,
                active=True,
                create_index=index,
                modify_index=index,
                intermediates=intermediates,
            )
        )
        self.settings = settings
        log.info(
            "CA root rotated: %s -> %s (%s; old root stays trusted until its leaves expire)",
            old.issuer.fingerprint,
            fresh.fingerprint,
            "cross-signed" if cross_sign else "not cross-signed",
        )
        self._schedule_prune(self.settings.leaf_cert_ttl + PRUNE_GRACE)

    def replace(self, cluster_id: str, settings: CASettings | None = None) -> None:
        """Start over as a re-bootstrapped cluster: a new cluster ID and trust domain, one new
        root, the old roots gone (a devstack extension, see the module docstring)."""
        settings = settings or self.settings
        old = self.active
        self.cluster_id = cluster_id
        self.trust_domain = f"{cluster_id}.consul"
        fresh = self._generate_root(settings)
        self.provider.adopt(fresh)
        index = self.store._commit([ROOTS_TABLE])
        self.roots = [CARoot(fresh, active=True, create_index=index, modify_index=index)]
        self.settings = settings
        self.rotated_at = utcnow()
        log.info(
            "CA replaced: trust domain %s, root %s (old root %s dropped, not cross-signed)",
            self.trust_domain,
            fresh.fingerprint,
            old.issuer.fingerprint,
        )

    def resign_at(self, leaf: IssuedLeaf) -> datetime.datetime | None:
        """When a leaf of an inactive root is re-signed; None for a leaf of the active root."""
        if leaf.root_id == self.active.issuer.fingerprint:
            return None
        if self.rotated_at is None:
            return utcnow()
        return self.rotated_at + datetime.timedelta(seconds=self.change_delay)

    def _schedule_prune(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(delay, self._prune))

    def _prune(self) -> None:
        now = utcnow()
        newest_leaf = {leaf.root_id: leaf.valid_before for leaf in self.leaves.values()}
        keep = [
            r
            for r in self.roots
            if r.active
            or r.retired_at is None
            or now
            < max(
                r.retired_at + datetime.timedelta(seconds=self.settings.leaf_cert_ttl),
                newest_leaf.get(r.issuer.fingerprint, r.retired_at),
            )
        ]
        if len(keep) != len(self.roots):
            self.roots = keep
            self.store._commit([ROOTS_TABLE])

    def close(self) -> None:
        self.closing.set()
        for timer in self._timers:
            timer.cancel()

    # ---- configuration ---------------------------------------------------------------------

    def config_json(self) -> dict[str, Any]:
        s = self.settings
        config: dict[str, Any] = {
            **self.extra_config,
            **self.provider.config(),
            "LeafCertTTL": _as_configured(s.leaf_cert_ttl),
            "IntermediateCertTTL": _as_configured(s.intermediate_cert_ttl),
            "RootCertTTL": _as_configured(s.root_cert_ttl),
            "PrivateKeyType": s.private_key_type,
            "PrivateKeyBits": s.private_key_bits,
            **(self.written_config or {}),
        }
        return {
            "Provider": self.provider.name,
            "Config": config,
            "State": None,
            "ForceWithoutCrossSigning": False,
            "CreateIndex": self.config_create_index,
            "ModifyIndex": self.config_modify_index,
        }

    def update_config(
        self,
        provider: RootProvider,
        config: dict[str, Any],
        *,
        rotate_for: Sequence[str] = (),
        cross_sign: bool = True,
        cluster_id: str = "",
    ) -> bool:
        """Apply a PUT; True when it rotated (or replaced) the root. Validation errors are
        CAConfigError."""
        s = self.settings
        new = CASettings(
            leaf_cert_ttl=_ttl(config, "LeafCertTTL", s.leaf_cert_ttl),
            intermediate_cert_ttl=_ttl(config, "IntermediateCertTTL", s.intermediate_cert_ttl),
            root_cert_ttl=_ttl(config, "RootCertTTL", s.root_cert_ttl),
            private_key_type=str(config.get("PrivateKeyType", s.private_key_type)),
            private_key_bits=int(config.get("PrivateKeyBits", s.private_key_bits)),
        )
        self._validate(new)
        rotate = (
            provider.name != self.provider.name
            or new.private_key_type != s.private_key_type
            or new.private_key_bits != s.private_key_bits
            or any(config.get(k) not in (None, "") for k in rotate_for)
        )
        known = {"LeafCertTTL", "IntermediateCertTTL", "RootCertTTL", "PrivateKeyType"}
        known |= {"PrivateKeyBits", *rotate_for, *provider.config()}
        self.extra_config = {k: v for k, v in config.items() if k not in known}
        self.written_config = dict(config)
        if cluster_id and cluster_id != self.cluster_id:
            if provider is not self.provider:
                self.provider = provider
            self.replace(cluster_id, new)
            rotate = True
        elif rotate:
            self.rotate(new, provider, cross_sign=cross_sign)
        self.settings = new
        self.config_modify_index = self.store._commit([CONFIG_TABLE])
        return rotate

    def _validate(self, s: CASettings) -> None:
        # Consul's texts (agent/structs/connect_ca.go CommonCAProviderConfig.Validate).
        if s.leaf_cert_ttl < self.min_leaf_ttl:
            raise CAConfigError(f"LeafCertTTL must be at least {_duration(self.min_leaf_ttl)}")
        if s.leaf_cert_ttl >= 8760 * HOUR:
            raise CAConfigError("LeafCertTTL must be less than 8760h0m0s")
        if s.intermediate_cert_ttl < 3 * s.leaf_cert_ttl:
            raise CAConfigError(
                "Intermediate Cert TTL must be greater or equal than 3x of leaf_cert_ttl "
                f"(>= {_duration(3 * s.leaf_cert_ttl)})."
            )
        try:
            generate_key_spec_check(s.private_key_type, s.private_key_bits)
        except KeySpecError as err:
            raise CAConfigError(str(err)) from None

    # ---- leaves ------------------------------------------------------------------------------

    def leaf(self, service: str, now: datetime.datetime) -> IssuedLeaf:
        """The service's current leaf, issuing a new one when none is usable."""
        cached = self.leaves.get(service)
        if cached is not None and now < cached.soft_expiry:
            resign = self.resign_at(cached)
            if resign is None or now < resign:
                return cached
        return self._issue(service, now, cached)

    def _issue(self, service: str, now: datetime.datetime, old: IssuedLeaf | None) -> IssuedLeaf:
        root = self.active
        ident = service_identity(self.trust_domain, self.datacenter, service)
        key = generate_key(root.issuer.key_type, root.issuer.key_bits)
        cert = root.issuer.sign_leaf(
            key.public_key(),
            uri_sans=[ident.uri],
            ttl=datetime.timedelta(seconds=self.settings.leaf_cert_ttl),
            now=now,
        )
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        soft = cert.not_valid_before_utc + lifetime * random.uniform(*SOFT_EXPIRY)
        index = self.store._commit([], [f"connect-leaf/{service}"])
        leaf = IssuedLeaf(
            service=service,
            service_uri=ident.uri,
            cert_pem=cert_pem(cert) + "".join(cert_pem(c) for c in root.issuer.chain),
            key_pem=key_pem(key),
            serial=serial_text(cert.serial_number),
            valid_after=cert.not_valid_before_utc,
            valid_before=cert.not_valid_after_utc,
            soft_expiry=soft,
            root_id=root.issuer.fingerprint,
            create_index=old.create_index if old else index,
            modify_index=index,
        )
        self.leaves[service] = leaf
        log.info("issued leaf for %s, serial %s, until %s", service, leaf.serial, leaf.valid_before)
        return leaf

    def leaf_json(self, leaf: IssuedLeaf) -> dict[str, Any]:
        return {
            "SerialNumber": leaf.serial,
            "CertPEM": leaf.cert_pem,
            "PrivateKeyPEM": leaf.key_pem,
            "Service": leaf.service,
            "ServiceURI": leaf.service_uri,
            "ValidAfter": _rfc3339(leaf.valid_after),
            "ValidBefore": _rfc3339(leaf.valid_before),
            "CreateIndex": leaf.create_index,
            "ModifyIndex": leaf.modify_index,
        }


def generate_key_spec_check(key_type: str, bits: int) -> None:
    """Validate a key spec without the cost of generating a key."""
    if key_type == "ec" and bits in EC_CURVES:
        return
    if key_type == "rsa" and bits in RSA_BITS:
        return
    if key_type not in ("ec", "rsa"):
        raise KeySpecError(f"unknown private key type {key_type!r}; expected 'ec' or 'rsa'")
    raise KeySpecError(f"private key bits {bits} are not valid for type {key_type}")


def _ttl(config: dict[str, Any], key: str, default: float) -> float:
    if key not in config:
        return default
    try:
        return duration_from_json(config[key]) / 1e9
    except DurationError as err:
        raise CAConfigError(f"error decoding {key}: {err}") from None


def _duration(seconds: float) -> str:
    return format_duration(round(seconds * 1e9))


def _as_configured(seconds: float) -> str:
    # Consul's defaults read back as written in its config ("72h", "8760h"), not as Go prints.
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    return _duration(seconds)
