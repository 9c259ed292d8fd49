"""Every case of the authorization case files, through translation and the engine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from authz_casefile import options_for, run_case

SAMPLE = Path(__file__).with_name("authz-cases-sample.yaml")
OWN = Path(__file__).with_name("authz-cases-meshlet.yaml")
# The acceptance corpus is not in the repository; point at it to run it here too.
EXTRA = os.environ.get("MESHLET_AUTHZ_CASES")


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert data["schema_version"] == 1
    return data


def _params() -> list[Any]:
    params = []
    for path in [SAMPLE, OWN, *([Path(EXTRA)] if EXTRA else [])]:
        data = _load(path)
        for case in data["cases"]:
            params.append(pytest.param(data["conventions"], case, id=f"{path.stem}:{case['name']}"))
    return params


@pytest.mark.parametrize(("conventions", "case"), _params())
def test_case(conventions: dict[str, Any], case: dict[str, Any]) -> None:
    result = run_case(case, options_for(conventions))
    assert not result.failures, "\n".join(result.failures)


def test_sample_is_complete() -> None:
    # The runner must see every case and every request of the sample, not a silent subset.
    data = _load(SAMPLE)
    results = [run_case(c, options_for(data["conventions"])) for c in data["cases"]]
    assert len(results) == len(data["cases"]) == 11
    evaluated = sum(r.requests for r in results)
    expected = sum(len(c.get("requests") or ()) for c in data["cases"] if not c.get("expect_error"))
    assert evaluated == expected
    assert [r.name for r in results if r.rejected] == ["deny-without-rules-is-invalid"]
