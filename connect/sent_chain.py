"""Send the leaf chain we loaded, as loaded: turn off OpenSSL's "auto chain" on a context.

When a context's certificate comes without intermediates, OpenSSL builds the chain it sends
from the context's trust store at every handshake (a chain verification of our own leaf), and
sends what it built, the root included. For a mesh leaf signed by the root itself, that is one
more certificate on the wire, one more chain build on our side and one more certificate for
the peer to decode (OpenSSL 3.0's decoders are the expensive part of a handshake) and check,
for nothing: the peer trusts the root already or refuses us anyway. Consul's leaf endpoint
gives the intermediates a peer may need with the leaf (connect.leaf.Leaf.chain_pem), and
Envoy, fed the same leaf, sends exactly that chain (BoringSSL builds none).

Python's ssl has no setter for SSL_CTX modes, so `send_loaded_chain_only` calls OpenSSL's
SSL_CTX_ctrl through ctypes on the context's SSL_CTX pointer, which CPython keeps right after
the object header of an `ssl.SSLContext`. The pointer is trusted only after OpenSSL confirms it
is that very context (its options and verify mode read through it equal what Python reports,
and a probe option set through Python shows up through it); anything else leaves the context
as it was and returns False: the handshake is then only slower, never different in what it
verifies. Nothing here touches verification: it changes what we send, not what we accept.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import ssl
from functools import cache

__all__ = ["send_loaded_chain_only"]

log = logging.getLogger("meshlet.connect.tls")

_SSL_CTRL_MODE = 33
_SSL_MODE_NO_AUTO_CHAIN = 0x8
# An option with no effect on a handshake of ours (renegotiation is TLS 1.2's, and refused
# anyway), toggled to prove the pointer is the context's.
_PROBE_OPTION = getattr(ssl, "OP_NO_RENEGOTIATION", 0x40000000)
# ssl's verify modes as OpenSSL's SSL_VERIFY_* flags (PEER = 1, FAIL_IF_NO_PEER_CERT = 2).
_VERIFY_FLAGS = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}


class _Libssl:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self.ctrl = lib.SSL_CTX_ctrl
        self.ctrl.restype = ctypes.c_long
        self.ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self.get_options = lib.SSL_CTX_get_options
        self.get_options.restype = ctypes.c_uint64
        self.get_options.argtypes = [ctypes.c_void_p]
        self.get_verify_mode = lib.SSL_CTX_get_verify_mode
        self.get_verify_mode.restype = ctypes.c_int
        self.get_verify_mode.argtypes = [ctypes.c_void_p]


@cache
def _libssl() -> _Libssl | None:
    """libssl as the `_ssl` extension links it (the same library, so the same SSL_CTX type)."""
    if platform.python_implementation() != "CPython" or not ssl.OPENSSL_VERSION.startswith(
        "OpenSSL 3."
    ):
        return None
    try:
        return _Libssl(ctypes.CDLL(ssl._ssl.__file__))  # type: ignore[attr-defined]
    except (OSError, AttributeError):
        return None


def _ctx_pointer(ctx: ssl.SSLContext, lib: _Libssl) -> int | None:
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
        return None
    if (
        lib.get_options(ptr) != int(ctx.options)
        or lib.get_verify_mode(ptr) != _VERIFY_FLAGS[ctx.verify_mode]
    ):
        return None
    # Equal values could be a coincidence: change one through Python, see it through the pointer.
    before = ctx.options
    try:
        ctx.options = before ^ _PROBE_OPTION
        seen = lib.get_options(ptr) == int(ctx.options)
    finally:
        ctx.options = before
    return ptr if seen and lib.get_options(ptr) == int(before) else None


def send_loaded_chain_only(ctx: ssl.SSLContext) -> bool:
    """Make `ctx` send the certificate chain it loaded and nothing it could build. Returns
    whether it could (False: unchanged, see the module's docstring)."""
    lib = _libssl()
    ptr = _ctx_pointer(ctx, lib) if lib is not None else None
    if lib is None or ptr is None:
        log.debug("cannot set SSL_MODE_NO_AUTO_CHAIN here: handshakes send the built chain")
        return False
    mode = lib.ctrl(ptr, _SSL_CTRL_MODE, _SSL_MODE_NO_AUTO_CHAIN, None)
    return bool(mode & _SSL_MODE_NO_AUTO_CHAIN)
