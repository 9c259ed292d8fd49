"""YAML that is valid but hostile to the policy loader is a PolicyError naming the problem,
never a Python exception escaping `meshlet intentions translate/apply/check`. Found by the
atheris `policy` target (tests/fuzz): a complex mapping key (`? {source: ...}`) raised
TypeError (unhashable type: 'dict') in the duplicate-key check; a document nested thousands of
levels deep raised RecursionError."""

from __future__ import annotations

import pytest

from intentions.errors import PolicyError
from intentions.policy import load_policies

HEAD = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: foo}
spec:
  rules:
  - from:
"""


@pytest.mark.parametrize(
    ("key", "where"),
    [
        ("    ? source: {principals: [cluster.local/ns/foo/sa/sleep]}\n    : x\n", "line 7"),
        ("    ? [a, b]\n    : x\n", "line 7"),
    ],
)
def test_a_mapping_or_list_as_a_key_is_refused_with_its_line(key: str, where: str) -> None:
    with pytest.raises(PolicyError) as info:
        load_policies(HEAD + key, origin="p.yaml")
    assert str(info.value).startswith("p.yaml: not valid YAML: found unhashable key"), info.value
    assert where in str(info.value)


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, "{a: " * 5000 + "1" + "}" * 5000])
def test_nesting_too_deep_for_the_parser_is_refused(text: str) -> None:
    with pytest.raises(PolicyError) as info:
        load_policies(text, origin="p.yaml")
    assert str(info.value) == "p.yaml: not valid YAML: nested too deeply"


def alias_bomb(levels: int) -> tuple[str, str]:
    """YAML lines defining `&a<levels-1>`, a list of 9**levels items in a few hundred bytes
    (aliases are references: cheap to load, huge to print), and the alias that names it."""
    lines = ["  x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"  x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines), f"*a{levels - 1}"


@pytest.mark.parametrize("where", ["kind", "paths"])
def test_an_alias_bomb_is_quoted_short_in_the_error(where: str) -> None:
    """On the original code the message for 6 levels was 3.8 MB (9 levels: gigabytes)."""
    lines, bomb = alias_bomb(6)
    text = f"lol:\n{lines}\n" + (
        f"kind: {bomb}\n"
        if where == "kind"
        else HEAD.replace("  - from:\n", f"  - to: [{{operation: {{paths: {bomb}}}}}]\n")
    )
    with pytest.raises(PolicyError) as info:
        load_policies(text, origin="p.yaml")
    message = str(info.value)
    assert len(message) < 5000, len(message)
    assert ("kind: [[" if where == "kind" else "paths[0]: must be a string, got list [[") in message


@pytest.mark.parametrize("items", ["58427", "abc", "{a: 1}"])
def test_a_list_whose_items_are_not_a_list_is_refused(items: str) -> None:
    """Found by atheris (policy target): `kind: List` with `items: 58427` raised TypeError
    ('int' object is not iterable); a string or a mapping was walked character by character or
    key by key."""
    with pytest.raises(PolicyError) as info:
        load_policies(f"apiVersion: v1\nkind: List\nitems: {items}\n", origin="p.yaml")
    assert str(info.value) == "p.yaml: items: must be a list of AuthorizationPolicy objects"
