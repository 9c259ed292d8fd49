"""A structure-aware mutator for atheris: JSON and YAML inputs are decoded, bent at one to
three places (a value replaced, moved from elsewhere, a key dropped or renamed to another
field's name, a list item repeated) and encoded again, so that libFuzzer's coverage feedback
works on documents that still parse, rather than on bytes that mostly do not. One time in five
it falls back to libFuzzer's own byte mutations (the parsers' error paths need those)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import yaml

from tests.fuzz.strategies import paths_in, replaced, seeds, value_at

ByteMutator = Callable[[bytes, int], bytes]

_ODD_STRINGS = ["", "*", "/", "default", "-1", "1e400", "10s", "-5s", "\x00", "é", "a" * 300]


def _keys(value: Any, found: set[str]) -> set[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            found.add(str(k))
            _keys(v, found)
    elif isinstance(value, list):
        for v in value:
            _keys(v, found)
    return found


class StructuredMutator:
    def __init__(self, target: str, fmt: str, prefix: int, fallback: ByteMutator) -> None:
        self.fmt = fmt
        self.prefix = prefix
        self.fallback = fallback
        self.vocabulary = sorted(_keys(seeds(target), set()))

    def _decode(self, body: bytes) -> Any:
        if self.fmt == "json":
            return json.loads(body)
        return yaml.safe_load(body.decode("utf-8"))

    def _encode(self, value: Any) -> bytes:
        if self.fmt == "json":
            return json.dumps(value).encode()
        return yaml.safe_dump(value, allow_unicode=True).encode()

    def _new_value(self, rng: random.Random, whole: Any) -> Any:
        roll = rng.randrange(9)
        if roll == 0:
            return value_at(whole, rng.choice(paths_in(whole)))  # right type, wrong place
        if roll == 1:
            return rng.choice([None, True, False, 0, -1, 2**63, 2**64, 1.5, -0.0, 1e308])
        if roll == 2:
            return rng.choice(_ODD_STRINGS)
        if roll == 3:
            return rng.choice(self.vocabulary) if self.vocabulary else ""
        if roll == 4:
            return [] if rng.random() < 0.5 else {}
        if roll == 5:
            return {rng.choice(self.vocabulary or ["k"]): rng.choice(_ODD_STRINGS)}
        if roll == 6:
            return rng.randint(-(2**16), 2**16)
        if roll == 7:
            return "".join(chr(rng.randrange(32, 0x250)) for _ in range(rng.randrange(12)))
        return [self._new_value(rng, whole) for _ in range(rng.randrange(1, 4))]

    def _bend(self, value: Any, rng: random.Random) -> Any:
        path = rng.choice(paths_in(value))
        parent = value_at(value, path[:-1]) if path else None
        how = rng.choice(["replace", "replace", "delete", "rename", "duplicate"])
        if how == "rename" and isinstance(parent, dict) and self.vocabulary:
            new_key = rng.choice(self.vocabulary)
            bent = dict(parent)
            bent[new_key] = bent.pop(path[-1])
            return replaced(value, path[:-1], bent, "replace")
        if how in ("delete", "duplicate") and isinstance(parent, list | dict):
            if how == "duplicate" and not isinstance(parent, list):
                how = "delete"
            return replaced(value, path, None, how)
        return replaced(value, path, self._new_value(rng, value), "replace")

    def __call__(self, data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        head, body = data[: self.prefix], data[self.prefix :]
        if rng.randrange(5) == 0:
            return self.fallback(data, max_size)
        try:
            value = self._decode(body)
        except (ValueError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
            return self.fallback(data, max_size)
        try:
            for _ in range(rng.randint(1, 3)):
                value = self._bend(value, rng)
        except RecursionError:  # a document nested deeper than the walk can go
            return self.fallback(data, max_size)
        if self.prefix and rng.randrange(10) == 0:
            head = bytes([rng.randrange(256)])
        try:
            out = head + self._encode(value)
        except (ValueError, RecursionError, yaml.YAMLError):
            return self.fallback(data, max_size)
        return out if len(out) <= max_size else self.fallback(data, max_size)


FORMATS = {
    "policy": ("yaml", 0),
    "agent_config": ("yaml", 0),
    "intentions_entry": ("json", 0),
    "traffic_entry": ("json", 0),
    "traffic_chain": ("json", 0),
    "consul_results": ("json", 1),
    "catalog": ("json", 0),
}
