"""Every seed of the corpus (tests/fuzz/corpus/<target>/) through its target: the seeds are
the regression inputs of the fuzzers, so what once broke a target stays fixed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuzz.http_proxy import HTTPProxyHarness, check
from tests.fuzz.targets import TARGETS

CORPUS = Path(__file__).resolve().parent / "corpus"


def _seeds(target: str) -> list[Path]:
    return sorted((CORPUS / target).iterdir())


def test_every_target_has_seeds() -> None:
    for target in [*TARGETS, "http_proxy"]:
        assert _seeds(target), target


@pytest.mark.parametrize(
    ("target", "seed"),
    [(t, p) for t in TARGETS for p in _seeds(t)],
    ids=lambda v: v.name if isinstance(v, Path) else v,
)
def test_seed(target: str, seed: Path) -> None:
    TARGETS[target](seed.read_bytes())


@pytest.fixture(scope="module")
def proxy() -> Iterator[HTTPProxyHarness]:
    h = HTTPProxyHarness()
    yield h
    h.close()


@pytest.mark.parametrize("seed", _seeds("http_proxy"), ids=lambda p: p.name)
def test_http_seed(proxy: HTTPProxyHarness, seed: Path) -> None:
    data = seed.read_bytes()
    via = "direct" if data[0] & 1 == 0 else "http-upstream"
    check(proxy.exchange(via, [data[1:]]), proxy)
