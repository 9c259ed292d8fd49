"""Why a dial to an upstream's sidecar failed, as a counter name and words for a log line. Pure.

Who refused whom matters to an operator: `server_*` kinds mean this sidecar refused the
upstream's certificate (the upstream holds a leaf our roots do not vouch for); the alert kinds
(`unknown_ca`, `bad_certificate`, `expired`, ...) mean the upstream refused ours, and say why.

A TLS 1.3 client finishes its handshake before the server has checked the client's
certificate, and neither asyncio nor uvloop reports the alert the server may send afterwards:
the connection just closes. `peer_refused` counts those (a full handshake whose connection
closed before the server sent its session ticket, which a server sends only once it has
accepted the client); the upstream's own `handshake_failures` says which check failed.
"""

from __future__ import annotations

import ssl

__all__ = ["KINDS", "dial_failure"]

# OpenSSL X509_V_ERR_* codes (x509_vfy.h) that mean "not signed by a root we trust".
_UNKNOWN_CA = frozenset({2, 18, 19, 20, 21})
_EXPIRED = 10  # X509_V_ERR_CERT_HAS_EXPIRED
# SSL_R_* reasons for an alert the peer sent (the peer refused our certificate).
_ALERTS = {
    "TLSV1_ALERT_UNKNOWN_CA": "unknown_ca",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad_certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "bad_certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "bad_certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "expired",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "certificate_required",
    "TLSV1_ALERT_ACCESS_DENIED": "access_denied",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "handshake_failure",
}

KINDS = (
    "unknown_ca",
    "bad_certificate",
    "expired",
    "certificate_required",
    "access_denied",
    "handshake_failure",
    "peer_refused",
    "server_unknown_ca",
    "server_expired",
    "server_certificate",
    "identity_mismatch",
    "identity_refused",
    "timeout",
    "connect_refused",
    "closed",
    "other",
)
"""Every kind `dial_failure` and the dialer count, for documentation and tests."""


def dial_failure(exc: BaseException) -> tuple[str, str]:
    """(kind, detail) for an exception raised while connecting and handshaking."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = f"server certificate refused: {exc.verify_message}"
        if exc.verify_code in _UNKNOWN_CA:
            return "server_unknown_ca", detail
        if exc.verify_code == _EXPIRED:
            return "server_expired", detail
        return "server_certificate", detail
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "closed", "closed by the peer during the handshake"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        kind = _ALERTS.get(reason)
        if kind is not None:
            return kind, f"the peer refused our certificate ({reason.lower()})"
        return "other", f"TLS: {reason.lower().replace('_', ' ') or exc}"
    if isinstance(exc, TimeoutError):
        return "timeout", "connect or handshake timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connect_refused", "connection refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "closed", "closed by the peer during the handshake"
    return "other", f"{type(exc).__name__}: {exc}"
