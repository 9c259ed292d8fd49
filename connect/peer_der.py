"""What a mesh peer's leaf says, read from its DER bytes without an X.509 library.

The data-plane process decides on a peer after every handshake but must not load
`cryptography` (about 14 MB of a 30 MB budget): OpenSSL has already verified the chain to
the current roots, and the decision only needs a few fields of the leaf (connect.identity):

    facts = leaf_facts(der)
    facts.not_before, facts.not_after    # aware UTC datetimes
    facts.is_ca                          # BasicConstraints cA
    facts.self_issued                    # issuer == subject, byte for byte
    facts.uris                           # the URI SANs, in order

Strict: anything this reader does not understand fails closed with `ValueError` (so the peer
is refused as unparsable): a high tag number, an indefinite or non-minimal length, trailing
bytes, a duplicated extension, a time that is not UTCTime/GeneralizedTime in Z form.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

__all__ = ["LeafFacts", "leaf_facts"]

_SEQUENCE = 0x30
_INTEGER = 0x02
_BOOLEAN = 0x01
_OID = 0x06
_OCTET_STRING = 0x04
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18
_VERSION = 0xA0  # [0] EXPLICIT
_EXTENSIONS = 0xA3  # [3] EXPLICIT
_URI = 0x86  # GeneralName uniformResourceIdentifier, [6] IMPLICIT IA5String

_BASIC_CONSTRAINTS = bytes.fromhex("551d13")  # 2.5.29.19
_SUBJECT_ALT_NAME = bytes.fromhex("551d11")  # 2.5.29.17


@dataclass(frozen=True, slots=True)
class LeafFacts:
    not_before: datetime.datetime
    not_after: datetime.datetime
    is_ca: bool
    self_issued: bool
    uris: tuple[str, ...]


def _tlv(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of contents) of the element at `pos`, within `end`."""
    if pos + 2 > end:
        raise ValueError("truncated element")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise ValueError("high tag numbers are not used in certificates")
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > end:
            raise ValueError("bad length")
        length = int.from_bytes(data[pos : pos + count], "big")
        if length < 0x80 or data[pos] == 0:
            raise ValueError("non-minimal length (not DER)")
        pos += count
    if pos + length > end:
        raise ValueError("element runs past its container")
    return tag, pos, pos + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    pos = start
    while pos < end:
        tag, cstart, cend = _tlv(data, pos, end)
        out.append((tag, cstart, cend))
        pos = cend
    return out


def _expect(element: tuple[int, int, int], tag: int, what: str) -> tuple[int, int]:
    if element[0] != tag:
        raise ValueError(f"{what}: tag {element[0]:#04x}, expected {tag:#04x}")
    return element[1], element[2]


def _time(data: bytes, element: tuple[int, int, int]) -> datetime.datetime:
    tag, start, end = element
    text = data[start:end].decode("ascii")
    if tag == _UTC_TIME and len(text) == 13 and text.endswith("Z"):
        year = int(text[:2])
        # RFC 5280 4.1.2.5.1: YY >= 50 is 19YY, else 20YY.
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif not (tag == _GENERALIZED_TIME and len(text) == 15 and text.endswith("Z")):
        raise ValueError("validity time is not UTCTime or GeneralizedTime in Z form")
    if not text[:-1].isdigit():
        raise ValueError("validity time has non-digits")
    return datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=datetime.UTC)


def _extensions(data: bytes, start: int, end: int) -> dict[bytes, bytes]:
    """extnID -> extnValue contents; a repeated extension is refused (RFC 5280 4.2)."""
    (seq,) = _children(data, start, end) or [(0, 0, 0)]
    out: dict[bytes, bytes] = {}
    for ext in _children(data, *_expect(seq, _SEQUENCE, "extensions")):
        parts = _children(data, *_expect(ext, _SEQUENCE, "extension"))
        if len(parts) not in (2, 3):
            raise ValueError("extension has the wrong number of fields")
        oid = data[slice(*_expect(parts[0], _OID, "extension id"))]
        if len(parts) == 3:
            _expect(parts[1], _BOOLEAN, "extension critical flag")
        value = data[slice(*_expect(parts[-1], _OCTET_STRING, "extension value"))]
        if oid in out:
            raise ValueError("duplicated extension")
        out[oid] = value
    return out


def _is_ca(value: bytes | None) -> bool:
    if value is None:
        return False
    (seq,) = _children(value, 0, len(value)) or [(0, 0, 0)]
    fields = _children(value, *_expect(seq, _SEQUENCE, "basicConstraints"))
    if not fields or fields[0][0] != _BOOLEAN:
        return False  # cA absent: DEFAULT FALSE
    start, end = fields[0][1], fields[0][2]
    if end - start != 1:
        raise ValueError("bad BOOLEAN")
    return value[start] != 0


def _uris(value: bytes | None) -> tuple[str, ...]:
    if value is None:
        return ()
    (seq,) = _children(value, 0, len(value)) or [(0, 0, 0)]
    names = _children(value, *_expect(seq, _SEQUENCE, "subjectAltName"))
    return tuple(value[s:e].decode("ascii") for tag, s, e in names if tag == _URI)


def leaf_facts(der: bytes) -> LeafFacts:
    """The fields of `der` the peer decision reads; `ValueError` for anything else."""
    try:
        return _leaf_facts(der)
    except (IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed certificate: {exc}") from None


def _leaf_facts(der: bytes) -> LeafFacts:
    top = _children(der, 0, len(der))
    if len(top) != 1:
        raise ValueError("not one DER element")
    cert = _children(der, *_expect(top[0], _SEQUENCE, "certificate"))
    if len(cert) != 3:
        raise ValueError("certificate has the wrong number of fields")
    tbs = _children(der, *_expect(cert[0], _SEQUENCE, "tbsCertificate"))
    if tbs and tbs[0][0] == _VERSION:
        tbs = tbs[1:]
    if len(tbs) < 6:
        raise ValueError("tbsCertificate is short")
    _expect(tbs[0], _INTEGER, "serial number")
    _expect(tbs[1], _SEQUENCE, "signature algorithm")
    issuer = der[slice(*_expect(tbs[2], _SEQUENCE, "issuer"))]
    validity = _children(der, *_expect(tbs[3], _SEQUENCE, "validity"))
    subject = der[slice(*_expect(tbs[4], _SEQUENCE, "subject"))]
    _expect(tbs[5], _SEQUENCE, "subject public key")
    if len(validity) != 2:
        raise ValueError("validity has the wrong number of fields")
    extensions: dict[bytes, bytes] = {}
    for tag, start, end in tbs[6:]:
        if tag == _EXTENSIONS:
            extensions = _extensions(der, start, end)
    return LeafFacts(
        not_before=_time(der, validity[0]),
        not_after=_time(der, validity[1]),
        is_ca=_is_ca(extensions.get(_BASIC_CONSTRAINTS)),
        self_issued=issuer == subject,
        uris=_uris(extensions.get(_SUBJECT_ALT_NAME)),
    )
