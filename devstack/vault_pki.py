"""A Vault PKI secrets engine mount, in memory: issuers, roles, issue and sign.

The subset of https://developer.hashicorp.com/vault/api-docs/secret/pki that meshlet and
Consul's Vault CA provider use. Operations return the `data` of
Vault's answer or raise `VaultError` with Vault's status and message; the HTTP envelope is
`vault_server.py`'s business.
"""

from __future__ import annotations

import datetime
import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from devstack.durations import DurationError, duration_from_json, format_duration
from devstack.issuer import (
    Issuer,
    KeySpecError,
    cert_pem,
    generate_key,
    key_pem,
    key_spec,
    new_root,
    public_key_of_csr,
    serial_hex,
)

# Vault's system defaults for a mount without tuning (default_lease_ttl / max_lease_ttl).
DEFAULT_LEASE_TTL = 768 * 3600.0
EC_DEFAULT_BITS = 256
RSA_DEFAULT_BITS = 2048


class VaultError(Exception):
    def __init__(self, status: int, *messages: str) -> None:
        super().__init__("; ".join(messages))
        self.status = status
        self.messages = list(messages)


def user_error(message: str) -> VaultError:
    return VaultError(400, message)


def seconds_param(value: Any, what: str) -> float:
    try:
        if isinstance(value, str) and value.isdigit():
            return float(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            # Vault reads a bare number of a duration field as seconds.
            return float(value)
        return duration_from_json(value) / 1e9 if value not in ("", None) else 0.0
    except DurationError:
        raise user_error(f"error converting input {value} for field {what!r}") from None


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).lower() in ("1", "t", "true")


def _list(value: Any) -> list[str]:
    if value in (None, ""):
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


ROLE_DEFAULTS: dict[str, Any] = {
    "ttl": 0,
    "max_ttl": 0,
    "allow_localhost": True,
    "allowed_domains": [],
    "allow_bare_domains": False,
    "allow_subdomains": False,
    "allow_glob_domains": False,
    "allow_any_name": False,
    "enforce_hostnames": True,
    "allow_ip_sans": True,
    "allowed_uri_sans": [],
    "allowed_uri_sans_template": False,
    "server_flag": True,
    "client_flag": True,
    "key_type": "rsa",
    "key_bits": 0,
    "require_cn": True,
    "use_csr_common_name": True,
    "use_csr_sans": True,
    "no_store": False,
    "generate_lease": False,
    "not_before_duration": 30,
    "issuer_ref": "default",
}
_LIST_FIELDS = {"allowed_domains", "allowed_uri_sans"}
_DURATION_FIELDS = {"ttl", "max_ttl", "not_before_duration"}


def make_role(
    params: Mapping[str, Any], existing: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    role = dict(existing or ROLE_DEFAULTS)
    for key, value in params.items():
        if key not in ROLE_DEFAULTS:
            continue  # Vault ignores (and warns about) fields a role does not have
        default = ROLE_DEFAULTS[key]
        if key in _LIST_FIELDS:
            role[key] = _list(value)
        elif key in _DURATION_FIELDS:
            role[key] = int(seconds_param(value, key))
        elif isinstance(default, bool):
            role[key] = _bool(value)
        elif isinstance(default, int):
            role[key] = int(value)
        else:
            role[key] = str(value)
    if role["key_type"] not in ("rsa", "ec", "ed25519", "any"):
        raise user_error(f"unknown key_type {role['key_type']}")
    if role["key_bits"] == 0 and role["key_type"] in ("rsa", "ec"):
        role["key_bits"] = EC_DEFAULT_BITS if role["key_type"] == "ec" else RSA_DEFAULT_BITS
    return role


@dataclass
class PKIMount:
    path: str
    default_lease_ttl: float = DEFAULT_LEASE_TTL
    max_lease_ttl: float = DEFAULT_LEASE_TTL
    issuers: dict[str, Issuer] = field(default_factory=dict)
    default_issuer: str = ""
    roles: dict[str, dict[str, Any]] = field(default_factory=dict)
    urls: dict[str, Any] = field(default_factory=dict)

    # ---- issuers -----------------------------------------------------------------------------

    def add_issuer(self, issuer: Issuer, *, make_default: bool) -> None:
        self.issuers[issuer.id] = issuer
        if make_default or not self.default_issuer:
            self.default_issuer = issuer.id

    def issuer(self, ref: str = "default") -> Issuer:
        if ref in ("", "default"):
            if not self.default_issuer:
                raise user_error("no default issuer currently configured")
            return self.issuers[self.default_issuer]
        found = self.issuers.get(ref) or next(
            (i for i in self.issuers.values() if i.name == ref), None
        )
        if found is None:
            raise user_error(f"unable to find PKI issuer for reference: {ref}")
        return found

    def chain_of(self, issuer: Issuer) -> list[str]:
        """`ca_chain`: the issuer, then the certificates linking it to older roots."""
        return [issuer.pem, *(cert_pem(c) for c in issuer.chain)]

    def generate_root(self, params: Mapping[str, Any], now: datetime.datetime) -> dict[str, Any]:
        common_name = str(params.get("common_name", ""))
        if not common_name:
            raise user_error("the common_name field is required")
        ttl = seconds_param(params.get("ttl"), "ttl") or self.max_lease_ttl
        key_type = str(params.get("key_type", "rsa"))
        bits = int(params.get("key_bits", 0)) or (
            EC_DEFAULT_BITS if key_type == "ec" else RSA_DEFAULT_BITS
        )
        try:
            issuer = new_root(
                common_name,
                uri_sans=_list(params.get("uri_sans")),
                key_type=key_type,
                key_bits=bits,
                ttl=datetime.timedelta(seconds=ttl),
                now=now,
            )
        except KeySpecError as err:
            raise user_error(str(err)) from None
        self.add_issuer(issuer, make_default=False)
        return {
            "certificate": issuer.pem,
            "issuing_ca": issuer.pem,
            "serial_number": serial_hex(issuer.cert.serial_number),
            "expiration": int(issuer.cert.not_valid_after_utc.timestamp()),
            "issuer_id": issuer.id,
            "issuer_name": str(params.get("issuer_name", "")),
            "key_id": issuer.id,
            "key_name": "",
        }

    def ca_chain_pem(self) -> str:
        return "".join(self.chain_of(self.issuer()))

    def issuers_list(self) -> dict[str, Any]:
        return {
            "keys": list(self.issuers),
            "key_info": {
                i.id: {"issuer_name": "", "is_default": i.id == self.default_issuer}
                for i in self.issuers.values()
            },
        }

    def issuer_json(self, ref: str) -> dict[str, Any]:
        issuer = self.issuer(ref)
        return {
            "issuer_id": issuer.id,
            "issuer_name": "",
            "certificate": issuer.pem,
            "ca_chain": self.chain_of(issuer),
            "key_id": issuer.id,
            "leaf_not_after_behavior": "err",
            "usage": "crl-signing,issuing-certificates,ocsp-signing,read-only",
        }

    # ---- roles ---------------------------------------------------------------------------------

    def write_role(self, name: str, params: Mapping[str, Any]) -> dict[str, Any]:
        self.roles[name] = make_role(params, self.roles.get(name))
        return self.roles[name]

    def role(self, name: str) -> dict[str, Any]:
        role = self.roles.get(name)
        if role is None:
            raise user_error(f"unknown role: {name}")
        return role

    # ---- issue and sign --------------------------------------------------------------------

    def issue(
        self, role_name: str, params: Mapping[str, Any], now: datetime.datetime
    ) -> tuple[dict[str, Any], list[str]]:
        role = self.role(role_name)
        if role["key_type"] == "any":
            raise user_error(
                'role key type "any" not allowed for issuing certificates, only signing'
            )
        try:
            key = generate_key(role["key_type"], role["key_bits"])
        except KeySpecError as err:
            raise user_error(str(err)) from None
        data, warnings = self._sign(role, params, key.public_key(), None, now)
        data["private_key"] = key_pem(key)
        data["private_key_type"] = role["key_type"]
        return data, warnings

    def sign(
        self, role_name: str, params: Mapping[str, Any], now: datetime.datetime
    ) -> tuple[dict[str, Any], list[str]]:
        role = self.role(role_name)
        raw = str(params.get("csr", ""))
        if not raw:
            raise user_error('"csr" is empty')
        try:
            csr = x509.load_pem_x509_csr(raw.encode())
        except ValueError:
            raise user_error("certificate request could not be parsed") from None
        if not csr.is_signature_valid:
            raise user_error("request signature invalid")
        try:
            public_key = public_key_of_csr(csr)
        except KeySpecError as err:
            raise user_error(str(err)) from None
        kind, _ = key_spec(public_key)
        if role["key_type"] not in ("any", kind):
            raise user_error(f"role requires keys of type {role['key_type']}")
        return self._sign(role, params, public_key, csr, now)

    def _sign(
        self,
        role: dict[str, Any],
        params: Mapping[str, Any],
        public_key: Any,
        csr: x509.CertificateSigningRequest | None,
        now: datetime.datetime,
    ) -> tuple[dict[str, Any], list[str]]:
        warnings: list[str] = []
        common_name = str(params.get("common_name") or "")
        uris = _list(params.get("uri_sans"))
        dns = _list(params.get("alt_names"))
        if csr is not None:
            if not common_name and role["use_csr_common_name"]:
                attrs = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
                common_name = str(attrs[0].value) if attrs else ""
            if role["use_csr_sans"]:
                try:
                    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                    uris += san.value.get_values_for_type(x509.UniformResourceIdentifier)
                    dns += san.value.get_values_for_type(x509.DNSName)
                except x509.ExtensionNotFound:
                    pass
        if not common_name and role["require_cn"]:
            raise user_error(
                "the common_name field is required, or must be provided in a CSR with "
                '"use_csr_common_name" set to true, unless "require_cn" is set to false'
            )
        for name in ([common_name] if common_name else []) + dns:
            if not _name_allowed(role, name):
                raise user_error(f"subject alternate name {name} not allowed by this role")
        uris = list(dict.fromkeys(uris))
        for uri in uris:
            if not any(fnmatch.fnmatchcase(uri, pattern) for pattern in role["allowed_uri_sans"]):
                raise user_error(f"URI Subject Alternative Name {uri} not allowed by this role")
        ttl = self._ttl(role, params, warnings)
        issuer = self.issuer(str(role.get("issuer_ref") or "default"))
        if now + datetime.timedelta(seconds=ttl) > issuer.cert.not_valid_after_utc:
            raise user_error(
                "cannot satisfy request, as TTL would result in notAfter of "
                f"{(now + datetime.timedelta(seconds=ttl)).isoformat()} that is beyond the "
                f"expiration of the CA certificate at {issuer.cert.not_valid_after_utc.isoformat()}"
            )
        exclude_cn = _bool(params.get("exclude_cn_from_sans", False))
        dns_sans = (
            dns if exclude_cn or not common_name else list(dict.fromkeys([common_name, *dns]))
        )
        cert = issuer.sign_leaf(
            public_key,
            uri_sans=uris,
            dns_sans=dns_sans,
            common_name=common_name,
            ttl=datetime.timedelta(seconds=ttl),
            now=now,
        )
        chain = self.chain_of(issuer)
        if _bool(params.get("remove_roots_from_chain", False)):
            chain = chain[1:]
        data = {
            "certificate": cert_pem(cert),
            "issuing_ca": issuer.pem,
            "ca_chain": chain,
            "serial_number": serial_hex(cert.serial_number),
            "expiration": int(cert.not_valid_after_utc.timestamp()),
        }
        return data, warnings

    def _ttl(self, role: dict[str, Any], params: Mapping[str, Any], warnings: list[str]) -> float:
        requested = seconds_param(params.get("ttl"), "ttl")
        max_ttl = float(role["max_ttl"]) or self.max_lease_ttl
        ttl = requested or float(role["ttl"]) or self.default_lease_ttl
        if ttl > max_ttl:
            if requested:
                warnings.append(
                    f'TTL "{_go(requested)}" is longer than permitted maxTTL "{_go(max_ttl)}", '
                    "so maxTTL is being used"
                )
            ttl = max_ttl
        return ttl


def _go(seconds: float) -> str:
    return format_duration(round(seconds * 1e9))


def _name_allowed(role: Mapping[str, Any], name: str) -> bool:
    if role["allow_any_name"]:
        return True
    if role["allow_localhost"] and name == "localhost":
        return True
    for domain in role["allowed_domains"]:
        if role["allow_bare_domains"] and name == domain:
            return True
        if role["allow_subdomains"] and name.endswith("." + domain):
            return True
        if role["allow_glob_domains"] and fnmatch.fnmatchcase(name, domain):
            return True
    return False


def mount_ttls(config: Mapping[str, Any]) -> tuple[float, float]:
    default = config.get("default_lease_ttl")
    maximum = config.get("max_lease_ttl")
    d = seconds_param(default, "default_lease_ttl") if default not in (None, "", "0") else 0.0
    m = seconds_param(maximum, "max_lease_ttl") if maximum not in (None, "", "0") else 0.0
    return d or DEFAULT_LEASE_TTL, m or DEFAULT_LEASE_TTL


class VaultProvider:
    """Consul's Vault CA provider over an in-process mount: roots live in the PKI engine, so
    leaves signed through Consul and through Vault's API chain to the same issuers."""

    name = "vault"

    def __init__(self, mount: PKIMount, address: str) -> None:
        self.mount = mount
        self.address = address

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
        issuer = new_root(
            common_name, uri_sans=uri_sans, key_type=key_type, key_bits=key_bits, ttl=ttl, now=now
        )
        # Consul's provider sets the new issuer as the mount's default (Vault >= 1.11).
        self.mount.add_issuer(issuer, make_default=True)
        return issuer

    def adopt(self, issuer: Issuer) -> None:
        """Record a cross-signed version of a root the CA made (so `ca_chain` links it)."""
        self.mount.issuers[issuer.id] = issuer

    def config(self) -> dict[str, Any]:
        return {
            "Address": self.address,
            "RootPKIPath": self.mount.path + "/",
            "IntermediatePKIPath": self.mount.path + "/",
        }
