"""A hostile settings file is a ConfigError naming the file and the problem, short, never a
Python exception or a message of gigabytes. Found while fuzzing the config loader
(tests/fuzz): PyYAML recurses once per nesting level (RecursionError escaped `load`), and a
YAML alias bomb (a few hundred bytes naming a list of 9**levels items) was quoted in full in
`expected an integer, got ...`."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load
from tests.intentions.test_policy_hostile_yaml import alias_bomb


def test_nesting_too_deep_for_the_parser_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError) as info:
        load(path, {})
    assert str(info.value) == f"{path}: not valid YAML: nested too deeply"


@pytest.mark.parametrize(
    ("section", "where"),
    [
        ("service: {{name: web, port: {bomb}}}", "service.port: expected an integer, got [["),
        ("service: {{name: web, port: 80}}\nsidecar: {{protocol: {bomb}}}", "sidecar.protocol"),
        ("service: {{name: web, port: 80, check: {{ttl: 10s, interval: {bomb}}}}}", "interval"),
    ],
)
def test_an_alias_bomb_is_quoted_short(tmp_path: Path, section: str, where: str) -> None:
    """On the original code: 34 MB of message for 7 levels (9 levels: gigabytes)."""
    lines, bomb = alias_bomb(7)
    path = tmp_path / "bomb.yaml"
    path.write_text(f"x-lol:\n{lines}\n" + section.format(bomb=bomb) + "\n")
    with pytest.raises(ConfigError) as info:
        load(path, {})
    message = str(info.value)
    assert len(message) < 2000, len(message)
    assert where in message
