"""Normalization of an origin-form request target, decided once for authorization and forwarding.

What Istio does before its authorization filter, and what the sidecar then forwards, so the app
receives the path that was authorized (istio.io/latest/docs/reference/config/security/
normalization: "The normalized request will be used for both the evaluation of authorization
policies and the request that is ultimately sent to the backend server"). Modes, as Istio's
`meshConfig.pathNormalization` names them (applied in this order: decode `%2F`/`%5C`, Envoy's
`normalize_path`, merge slashes):

* `base` (Istio's default): `\\` becomes `/`; percent-encoded unreserved characters
  (`ALPHA DIGIT - . _ ~`, hex case-insensitive) are decoded, once; dot segments are removed
  (RFC 3986 §5.2.4). `//` and `%2F`/`%5C` are kept.
* `merge_slashes`: `base`, then runs of `/` become one.
* `decode_and_merge_slashes`: `%2F` and `%5C` (any case) are decoded first, then
  `merge_slashes`.
* `reject`: nothing is rewritten; a path that `decode_and_merge_slashes` would change is refused.

In every mode the fragment is dropped, the query is kept byte for byte, `%00` in the path is
refused (Istio: always a 400) and letter case is kept: paths are case-sensitive.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal, get_args

from intentions.errors import BadRequest

__all__ = ["MODES", "PathNormalization", "normalize_path", "target_normalizer"]

PathNormalization = Literal["base", "merge_slashes", "decode_and_merge_slashes", "reject"]
MODES: tuple[PathNormalization, ...] = get_args(PathNormalization)

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT = re.compile(rb"%([0-9A-Fa-f]{2})")
_ESCAPED_SLASH = re.compile(rb"%(?:2[Ff]|5[Cc])")
_SLASHES = re.compile(rb"//+")
_NUL = re.compile(rb"%00")


def _decode_unreserved(m: re.Match[bytes]) -> bytes:
    value = int(m.group(1), 16)
    return bytes((value,)) if value in _UNRESERVED else m.group(0)


def _decode_slash(m: re.Match[bytes]) -> bytes:
    return b"/" if m.group(0)[1] == 0x32 else b"\\"  # %2F or %5C


def _remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 §5.2.4 on an absolute path; `..` never climbs above the root."""
    segments = path.split(b"/")[1:]
    out: list[bytes] = []
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        if seg == b".":
            if i == last:
                out.append(b"")
        elif seg == b"..":
            if out:
                out.pop()
            if i == last:
                out.append(b"")
        else:
            out.append(seg)
    return b"/" + b"/".join(out)


def _rewrite(path: bytes, decode_slashes: bool, merge: bool) -> bytes:
    if decode_slashes:
        path = _ESCAPED_SLASH.sub(_decode_slash, path)
    path = path.replace(b"\\", b"/")
    path = _PCT.sub(_decode_unreserved, path)
    path = _remove_dot_segments(path)
    if merge:
        path = _SLASHES.sub(b"/", path)
    return path


# What may make a path change under a mode, plus the query and fragment delimiters: a target
# without any of them is already normal, and that one scan is all it costs.
_SUSPECT_BASE = re.compile(rb"[?#%\\]|/\.")
_SUSPECT_MERGE = re.compile(rb"[?#%\\]|/\.|//")


def target_normalizer(mode: PathNormalization) -> Callable[[bytes], bytes]:
    """A function from an origin-form target (`/path[?query][#fragment]`) to the target to
    authorize and forward: the normalized path and the query, without the fragment. Raises
    BadRequest for `%00` in the path, and in `reject` mode for a path that is not normal."""
    if mode not in MODES:
        raise ValueError(f"unknown path normalization {mode!r}: expected one of {MODES}")
    decode_slashes = mode in ("decode_and_merge_slashes", "reject")
    merge = mode != "base"
    reject = mode == "reject"
    suspect = (_SUSPECT_BASE if mode == "base" else _SUSPECT_MERGE).search

    def normalize(target: bytes) -> bytes:
        m = suspect(target)
        if m is None:
            return target
        pos = m.start()
        if target[pos] == 0x3F:  # `?`: the path before it is normal; only a fragment may follow
            cut = target.find(b"#", pos)
            return target if cut == -1 else target[:cut]
        cut = len(target)
        for sep in b"?#":
            found = target.find(sep, pos)
            if found != -1 and found < cut:
                cut = found
        path, rest = target[:cut], target[cut:]
        if rest[:1] == b"#":
            rest = b""
        else:
            hash_at = rest.find(b"#")
            if hash_at != -1:
                rest = rest[:hash_at]
        if _NUL.search(path):
            raise BadRequest("the path contains %00")
        normal = _rewrite(path, decode_slashes, merge)
        if reject:
            if normal != path:
                raise BadRequest(
                    f"the path is not in normal form (it would be {normal.decode('latin-1')!r})"
                )
            return path + rest
        return normal + rest

    return normalize


_BASE = target_normalizer("base")


def normalize_path(target: str) -> str:
    """`base` normalization of a request target given as text (the engine's `http_request`
    and `meshlet intentions check`). A target starting with neither `/` nor `\\` (`*`) is
    returned as it is."""
    if not target.startswith(("/", "\\")):
        return target
    return _BASE(target.encode("utf-8", "surrogateescape")).decode("utf-8", "surrogateescape")
