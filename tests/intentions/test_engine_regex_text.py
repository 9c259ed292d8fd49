"""The engine's RE2 matchers take any Python string the callers can hand them. A path or header
given on the command line (`meshlet intentions check`, argv decoded with surrogateescape) or
in a JSON case file may hold a lone surrogate, which has no UTF-8 form: RE2 then raised
UnicodeEncodeError out of the decision. It is matched as U+FFFD, as Go and Envoy read invalid
text."""

from __future__ import annotations

import pytest

from intentions.engine import Identity, compile_snapshot, http_request
from intentions.entries import load_entry


@pytest.mark.parametrize(
    ("permission", "path", "headers", "allowed"),
    [
        ({"PathRegex": "/a.*"}, "/a\udcff", {}, False),
        ({"PathRegex": "/b.*"}, "/a\udcff", {}, True),
        ({"Header": [{"Name": "x-u", "Regex": "a.b"}]}, "/", {"x-u": ["a\ud800b"]}, False),
    ],
)
def test_a_lone_surrogate_is_matched_as_a_replacement_character(
    permission: dict[str, object], path: str, headers: dict[str, list[str]], allowed: bool
) -> None:
    source = {"Name": "web", "Permissions": [{"Action": "deny", "HTTP": permission}]}
    entry = load_entry({"Kind": "service-intentions", "Name": "api", "Sources": [source]})
    policy = compile_snapshot([entry], default_allow=True).for_destination(
        "api", "default", "default"
    )
    request = http_request("GET", path, "api", headers, normalize=False)
    assert policy.decide_request(Identity("web"), request).allowed is allowed
