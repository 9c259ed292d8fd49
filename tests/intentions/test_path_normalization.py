"""The request-path normalizer, pure: each origin-form target in each mode (Istio's BASE,
MERGE_SLASHES, DECODE_AND_MERGE_SLASHES, and reject-if-not-normal). The same targets go over
real sockets in tests/connect/test_http_paths.py."""

from __future__ import annotations

import pytest

from intentions.errors import BadRequest
from intentions.path_normalization import MODES, normalize_path, target_normalizer

_ = None  # BadRequest (400)
# target; then the result in base, merge_slashes, decode_and_merge_slashes, reject.
TABLE: list[tuple[str, str | None, str | None, str | None, str | None]] = [
    ("/", "/", "/", "/", "/"),
    ("/public", "/public", "/public", "/public", "/public"),
    ("/public/x?y=1", "/public/x?y=1", "/public/x?y=1", "/public/x?y=1", "/public/x?y=1"),
    ("/admin/../public", "/public", "/public", "/public", _),
    ("//admin", "//admin", "/admin", "/admin", _),
    ("///admin//x", "///admin//x", "/admin/x", "/admin/x", _),
    ("/ADMIN", "/ADMIN", "/ADMIN", "/ADMIN", "/ADMIN"),
    ("/%2Fadmin", "/%2Fadmin", "/%2Fadmin", "/admin", _),
    ("/%2fadmin", "/%2fadmin", "/%2fadmin", "/admin", _),
    ("/public/..%2fadmin", "/public/..%2fadmin", "/public/..%2fadmin", "/admin", _),
    ("/public/%2e%2e/admin", "/admin", "/admin", "/admin", _),
    ("/public/%2E%2E/admin", "/admin", "/admin", "/admin", _),
    ("/public/.%2e/admin", "/admin", "/admin", "/admin", _),
    ("/;x/admin", "/;x/admin", "/;x/admin", "/;x/admin", "/;x/admin"),
    (
        "/public/..;/admin",
        "/public/..;/admin",
        "/public/..;/admin",
        "/public/..;/admin",
        "/public/..;/admin",
    ),
    ("/public#/../admin", "/public", "/public", "/public", "/public"),
    ("/public?x=1#frag", "/public?x=1", "/public?x=1", "/public?x=1", "/public?x=1"),
    ("/public/./admin", "/public/admin", "/public/admin", "/public/admin", _),
    ("/a/b/../../admin", "/admin", "/admin", "/admin", _),
    ("/a/./b/.", "/a/b/", "/a/b/", "/a/b/", _),
    ("/a/b/..", "/a/", "/a/", "/a/", _),
    ("/a//../b", "/a/b", "/a/b", "/a/b", _),
    ("/a/..//b", "//b", "/b", "/b", _),
    ("\\admin", "/admin", "/admin", "/admin", _),
    ("/public\\..\\admin", "/admin", "/admin", "/admin", _),
    ("/%5cadmin", "/%5cadmin", "/%5cadmin", "/admin", _),
    ("/%5Cadmin", "/%5Cadmin", "/%5Cadmin", "/admin", _),
    ("/x/..%5c..%5cadmin", "/x/..%5c..%5cadmin", "/x/..%5c..%5cadmin", "/admin", _),
    ("/%61dmin", "/admin", "/admin", "/admin", _),
    ("/%41%2d%5f%7e%7E%30", "/A-_~~0", "/A-_~~0", "/A-_~~0", _),
    ("/%2561dmin", "/%2561dmin", "/%2561dmin", "/%2561dmin", "/%2561dmin"),
    # Decoded once, as Istio says: `%32` is `2`, and the `%2e` that makes is not decoded again.
    ("/x/%%32e%%32e/admin", *["/x/%2e%2e/admin"] * 3, _),
    ("/a%20b%3F", "/a%20b%3F", "/a%20b%3F", "/a%20b%3F", "/a%20b%3F"),
    ("/a%zz%", "/a%zz%", "/a%zz%", "/a%zz%", "/a%zz%"),
    ("/public?x=/../admin", *["/public?x=/../admin"] * 4),
    ("/public?x=%2e%2e#y", *["/public?x=%2e%2e"] * 4),
    ("/..", "/", "/", "/", _),
    ("/../admin", "/admin", "/admin", "/admin", _),
    ("/../..", "/", "/", "/", _),
    ("/.well-known/x", "/.well-known/x", "/.well-known/x", "/.well-known/x", "/.well-known/x"),
    ("/a/..b/.c", "/a/..b/.c", "/a/..b/.c", "/a/..b/.c", "/a/..b/.c"),
    ("/public//", "/public//", "/public/", "/public/", _),
    ("/admin%00", _, _, _, _),
    ("/%00/../public", _, _, _, _),
    ("/public?q=%00", *["/public?q=%00"] * 4),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("row", TABLE, ids=[row[0] for row in TABLE])
def test_each_target_in_each_mode(
    row: tuple[str, str | None, str | None, str | None, str | None], mode: str
) -> None:
    normalize = target_normalizer(mode)  # type: ignore[arg-type]
    want = row[1 + MODES.index(mode)]  # type: ignore[arg-type]
    if want is None:
        with pytest.raises(BadRequest):
            normalize(row[0].encode())
    else:
        assert normalize(row[0].encode()) == want.encode()


def test_reject_accepts_what_decode_and_merge_slashes_forwards() -> None:
    """Its outputs are normal, so `reject` would let them through unchanged; the one
    exception is what only a second decoding would change (decoding happens once)."""
    normalize = target_normalizer("decode_and_merge_slashes")
    reject = target_normalizer("reject")
    for row in TABLE:
        try:
            once = normalize(row[0].encode())
        except BadRequest:
            continue
        if "%%32e" in row[0]:
            with pytest.raises(BadRequest):
                reject(once)
        else:
            assert reject(once) == once, row[0]


def test_reject_says_what_the_path_would_be() -> None:
    with pytest.raises(BadRequest, match=r"not in normal form.*'/admin'"):
        target_normalizer("reject")(b"/public/../admin")
    with pytest.raises(BadRequest, match="%00"):
        target_normalizer("base")(b"/a%00")


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown path normalization 'none'"):
        target_normalizer("none")  # type: ignore[arg-type]


def test_the_text_form_keeps_non_paths_and_non_ascii() -> None:
    assert normalize_path("*") == "*"
    assert normalize_path("/é/../a%41") == "/aA"
