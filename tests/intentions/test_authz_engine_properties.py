"""The compiled engine against a naive reading of Consul's documented precedence rules."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from intentions.engine import Identity, compile_snapshot, http_request
from intentions.entries import ServiceIntentions, load_entry, precedence

NAMESPACES = ["default", "dev"]
DESTINATIONS = [("default", "api"), ("default", "*"), ("*", "*"), ("dev", "api"), ("dev", "*")]
SOURCES = [("default", "web"), ("default", "*"), ("*", "*"), ("dev", "web"), ("dev", "*")]
PATHS = ["/a", "/b", "/c"]


@st.composite
def entry_sets(draw: st.DrawFn) -> list[dict[str, Any]]:
    chosen = draw(st.lists(st.sampled_from(DESTINATIONS), unique=True, max_size=4))
    bodies = []
    for ns, name in chosen:
        wildcard = "*" in (ns, name)
        sources = []
        for src_ns, src_name in draw(
            st.lists(st.sampled_from(SOURCES), unique=True, min_size=1, max_size=4)
        ):
            source: dict[str, Any] = {"Name": src_name, "Namespace": src_ns}
            if not wildcard and draw(st.booleans()):
                perms = draw(
                    st.lists(
                        st.tuples(st.sampled_from(["allow", "deny"]), st.sampled_from(PATHS)),
                        min_size=1,
                        max_size=3,
                    )
                )
                source["Permissions"] = [{"Action": a, "HTTP": {"PathPrefix": p}} for a, p in perms]
            else:
                source["Action"] = draw(st.sampled_from(["allow", "deny"]))
            sources.append(source)
        bodies.append(
            {"Kind": "service-intentions", "Name": name, "Namespace": ns, "Sources": sources}
        )
    return bodies


def _naive(
    entries: list[ServiceIntentions],
    default: bool,
    dst: tuple[str, str],
    src: tuple[str, str],
    path: str | None,
) -> bool:
    """Every matching intention sorted by precedence; the first decides."""

    def hit(pattern: tuple[str, str], value: tuple[str, str]) -> bool:
        return pattern[0] in ("*", value[0]) and pattern[1] in ("*", value[1])

    candidates = [
        (precedence(e.namespace_or_default, e.name, s.namespace, s.name), s)
        for e in entries
        if hit((e.namespace_or_default, e.name), dst)
        for s in e.sources
        if hit((s.namespace, s.name), src)
    ]
    if not candidates:
        return default
    _, winner = max(candidates, key=lambda c: c[0])
    if not winner.permissions:
        return winner.action == "allow"
    if path is None:
        return False  # an L7 intention answers an L4 question with deny
    for perm in winner.permissions:
        assert perm.http is not None
        if path.startswith(perm.http.path_prefix):
            return perm.action == "allow"
    return default


@settings(max_examples=600, deadline=None)
@given(
    entry_sets(),
    st.booleans(),
    st.lists(
        st.tuples(
            st.sampled_from([("default", "api"), ("dev", "api"), ("default", "db")]),
            st.tuples(st.sampled_from(NAMESPACES), st.sampled_from(["web", "db"])),
            st.one_of(st.none(), st.sampled_from(PATHS)),
        ),
        min_size=1,
        max_size=10,
    ),
)
def test_engine_matches_documented_precedence(
    bodies: list[dict[str, Any]],
    default: bool,
    queries: list[tuple[tuple[str, str], tuple[str, str], str | None]],
) -> None:
    entries = [load_entry(b) for b in bodies]
    snapshot = compile_snapshot(entries, default_allow=default)
    for dst, src, path in queries:
        want = _naive(entries, default, dst, src, path)
        destination, source = Identity(dst[1], dst[0]), Identity(src[1], src[0])
        if path is None:
            got = snapshot.decide_connection(destination, source)
        else:
            got = snapshot.decide_request(destination, source, http_request("GET", path))
        assert got.allowed == want, (dst, src, path, got.reason)
