"""Hypothesis strategies for the fuzz properties: valid inputs bent at one place, and HTTP/1.1
request streams as an attacker writes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

CORPUS = Path(__file__).resolve().parent / "corpus"

# ---- JSON and YAML documents ----------------------------------------------------------------

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False),
    st.sampled_from(["", "*", "/", "default", "api", "web", "-1", "1.5", "10s", "a" * 300, "\x00"]),
    st.text(max_size=12),
)
hostile = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
"""Any JSON value, wrong types and odd strings included."""


def seeds(target: str) -> list[Any]:
    """The corpus seeds of a JSON or YAML target, decoded (what the mutations start from)."""
    out: list[Any] = []
    for path in sorted((CORPUS / target).iterdir()):
        data = path.read_bytes()
        if target == "consul_results":
            data = data[1:]
        try:
            out.append(json.loads(data))
            continue
        except ValueError:
            pass
        try:
            out.extend(d for d in yaml.safe_load_all(data) if d is not None)
        except yaml.YAMLError:
            continue  # a crash input kept as a seed for atheris: not a base to bend
    return out


def paths_in(value: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [here]
    if isinstance(value, dict):
        for k, v in value.items():
            found += paths_in(v, (*here, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += paths_in(v, (*here, i))
    return found


def replaced(value: Any, path: tuple[Any, ...], new: Any, how: str) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        out = dict(value)
        if not rest and how == "delete":
            del out[head]
        elif not rest and how == "rename":
            out[f"{head}x" if isinstance(head, str) else head] = out.pop(head)
        else:
            out[head] = replaced(value[head], rest, new, how)
        return out
    out_list = list(value)
    if not rest and how == "delete":
        del out_list[head]
    elif not rest and how == "duplicate":
        out_list.insert(head, out_list[head])
    else:
        out_list[head] = replaced(value[head], rest, new, how)
    return out_list


@st.composite
def mutated(draw: st.DrawFn, bases: list[Any]) -> Any:
    """A seed with one to three places changed: a value replaced by any JSON value or by a
    value taken from elsewhere in a seed (right type, wrong place), a key dropped or misspelt,
    a list item repeated."""
    value = draw(st.sampled_from(bases))
    for _ in range(draw(st.integers(1, 3))):
        paths = paths_in(value)
        path = draw(st.sampled_from(paths))
        how = draw(st.sampled_from(["replace", "transplant", "delete", "rename", "duplicate"]))
        if how in ("delete", "rename", "duplicate") and not path:
            how = "replace"
        if how == "duplicate" and not isinstance(value_at(value, path[:-1]), list):
            how = "rename"
        if how == "rename" and not isinstance(value_at(value, path[:-1]), dict):
            how = "replace"
        if how == "transplant":
            donor_base = draw(st.sampled_from(bases))
            new = value_at(donor_base, draw(st.sampled_from(paths_in(donor_base))))
        else:
            new = draw(hostile)
        value = replaced(value, path, new, how)
    return value


def value_at(value: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        value = value[step]
    return value


def as_json(value: Any) -> bytes:
    return json.dumps(value).encode()


def as_yaml(value: Any) -> bytes:
    return yaml.safe_dump(value, allow_unicode=True).encode()


# ---- filter expressions ----------------------------------------------------------------------

_SELECTORS = [
    "Service.Service",
    "Service.Tags",
    "Service.Meta.version",
    "Service.Meta",
    "Service.Port",
    "Service.Weights.Passing",
    "Node.Node",
    "Node.TaggedAddresses.lan",
    "Checks.Status",
    "Checks",
    "Nope",
    "Service.Nope",
    "Service.Meta.",
]
_VALUES = ['"api"', "`api`", "api", "1", "-1", "8080", "1e3", "true", '"\\u00e9"', '"\\x"', '""']
_MATCH = st.one_of(
    st.builds(
        "{} {} {}".format,
        st.sampled_from(_SELECTORS),
        st.sampled_from(["==", "!=", "matches", "not matches", "contains", "not contains"]),
        st.sampled_from([*_VALUES, '"^a(b"', '"[a-z]+"', '"(?i)x"', '"\\\\d"']),
    ),
    st.builds(
        "{} {} {}".format,
        st.sampled_from(_VALUES),
        st.sampled_from(["in", "not in"]),
        st.sampled_from(_SELECTORS),
    ),
    st.builds(
        "{} {}".format, st.sampled_from(_SELECTORS), st.sampled_from(["is empty", "is not empty"])
    ),
)
filter_expressions = st.recursive(
    _MATCH,
    lambda inner: st.one_of(
        st.builds("({})".format, inner),
        st.builds("not {}".format, inner),
        st.builds("{} and {}".format, inner, inner),
        st.builds("{} or {}".format, inner, inner),
    ),
    max_leaves=6,
) | st.text(alphabet='ServiceNod.=!"`()aimtchsonry 0-9\\', max_size=40)


# ---- HTTP/1.1 request streams ----------------------------------------------------------------

_METHODS = [b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"CONNECT", b"get", b"G\x00T"]
_TARGETS = [
    b"/public",
    b"/private",
    b"/private/x",
    b"/PRIVATE",
    b"//private",
    b"/public/../private",
    b"/public/%2e%2e/private",
    b"/%70rivate",
    b"/public/..%2fprivate",
    b"/public\\..\\private",
    b"/public?x=/private",
    b"/public#/../private",
    b"http://api/private",
    b"http://api:80/public/../private",
    b"HTTP://API//private",
    b"http://user@api/private",
    b"*",
    b"api:443",
    b"",
    b"/public/\xff",
    b"/p%00",
]
_PLAIN_TARGETS = [b"/public", b"/private/x", b"/x", b"/public/a?b=c", b"/private"]
_VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 x", b"http/1.1", b""]
_HEADERS = [
    b"Host: api",
    b"Host: evil",
    b"Host:",
    b"Host: api\r\nHost: api",
    b"Content-Length: 0",
    b"Content-Length: 5",
    b"Content-Length: 40",
    b"Content-Length: -1",
    b"Content-Length: +5",
    b"Content-Length: 5, 5",
    b"Content-Length: 5\r\nContent-Length: 6",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: chunked, identity",
    b"Transfer-Encoding: identity",
    b"Transfer-Encoding:\tchunked",
    b"Transfer-Encoding : chunked",
    b"Transfer-Encoding: xchunked",
    b"Connection: close",
    b"Connection: keep-alive",
    b"Connection: Upgrade\r\nUpgrade: websocket",
    b"Connection: Upgrade\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__",
    b"Upgrade: websocket",
    b"Expect: 100-continue",
    b"X-Forwarded-Client-Cert: By=forged;URI=spiffe://forged",
    b"x-meshlet-peer: spiffe://forged",
    b"x-deny: 1",
    b"X-Request-Id: abc",
    b"X-Fold: a\r\n b",
    b"Bad Header: x",
    b"Te: trailers",
]
_BODIES = [
    b"",
    b"hello",
    b"5\r\nhello\r\n0\r\n\r\n",
    b"0\r\n\r\n",
    b"0\r\n\r\nGET /private HTTP/1.1\r\nHost: api\r\n\r\n",
    b"2d\r\nGET /private HTTP/1.1\r\nHost: api\r\n\r\n\r\n0\r\n\r\n",
    b"ffffffffffffffffff\r\n",
    b"5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n",
]


_BENIGN = [
    b"Accept: */*",
    b"User-Agent: fuzz",
    b"X-Request-Id: abc",
    b"Connection: keep-alive",
]


def _rarely(draw: st.DrawFn, odds: int = 4) -> bool:
    """True about once in `odds` draws; shrinks to False (the well-formed choice)."""
    return draw(st.sampled_from([False] * (odds - 1) + [True]))


@st.composite
def request(draw: st.DrawFn) -> bytes:
    """Mostly a well-formed request (so that many reach the app and the decision matters),
    with one or more odd pieces now and then: the shapes smuggling and bypasses are made of."""
    eol = draw(st.sampled_from([b"\n", b"\r"])) if _rarely(draw, 12) else b"\r\n"
    method = draw(st.sampled_from(_METHODS)) if _rarely(draw) else b"GET"
    target = draw(st.sampled_from(_TARGETS if _rarely(draw, 2) else _PLAIN_TARGETS))
    version = draw(st.sampled_from(_VERSIONS)) if _rarely(draw, 6) else b"HTTP/1.1"
    headers = [] if _rarely(draw, 8) else [b"Host: api"]
    headers += draw(st.lists(st.sampled_from(_BENIGN), max_size=2))
    if _rarely(draw, 3):
        headers += draw(st.lists(st.sampled_from(_HEADERS), min_size=1, max_size=3))
    headers = draw(st.permutations(headers))
    body = b""
    if method in (b"POST", b"PUT") and not _rarely(draw, 3):
        payload = draw(st.sampled_from([b"hello", b"x" * 100, b"GET /private HTTP/1.1\r\n\r\n"]))
        if _rarely(draw, 2):
            headers.append(b"Transfer-Encoding: chunked")
            body = b"%x\r\n" % len(payload) + payload + b"\r\n0\r\n\r\n"
        else:
            headers.append(b"Content-Length: %d" % len(payload))
            body = payload
    if _rarely(draw, 6):
        body += draw(st.sampled_from(_BODIES))
    head = eol.join([b" ".join([method, target, version]), *headers]) + eol + eol
    return head + body


@st.composite
def request_streams(draw: st.DrawFn) -> tuple[str, list[bytes]]:
    """(way in, the writes): one to four requests back to back, sometimes with a byte
    changed, cut into one to three writes."""
    stream = b"".join(draw(st.lists(request(), min_size=1, max_size=4)))
    if stream and _rarely(draw, 6):
        at = draw(st.integers(0, len(stream) - 1))
        stream = stream[:at] + bytes([draw(st.integers(0, 255))]) + stream[at + 1 :]
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=2)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    via = draw(st.sampled_from(["direct", "http-upstream"]))
    return via, [c for c in chunks if c]
