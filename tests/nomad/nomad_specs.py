"""The job specs in nomad/, parsed with python-hcl2 into plain Python values.

python-hcl2 keeps string quotes, marks blocks with `__is_block__`, keeps comments and returns
heredocs with their markers; `plain` turns that into what Nomad's own parser would hand over,
so the tests below read fields as a job author writes them.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hcl2

NOMAD_DIR = Path(__file__).resolve().parents[2] / "nomad"

_HEREDOC = re.compile(r"<<(-?)([A-Z]+)\n(.*)\n\s*\2\Z", re.S)
_INTERPOLATION = re.compile(r"\$\{([^}]+)\}")
_TEMPLATE_ENV = re.compile(r'\{\{\s*env\s+"([^"]+)"\s*\}\}')


def _string(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = json.loads(text) if "\\" in text else text[1:-1]
    heredoc = _HEREDOC.fullmatch(text)
    if heredoc:
        body = heredoc.group(3) + "\n"
        return textwrap.dedent(body) if heredoc.group(1) else body
    return text


def plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            _string(k): plain(v)
            for k, v in value.items()
            if k not in ("__is_block__", "__comments__", "__inline_comments__")
        }
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, str):
        return _string(value)
    return value


def load_job(name: str) -> tuple[str, dict[str, Any]]:
    """(job name, job body) of nomad/<name>; exactly one job per file."""
    with (NOMAD_DIR / name).open() as f:
        doc = plain(hcl2.load(f))
    jobs = doc["job"]
    assert len(jobs) == 1 and len(jobs[0]) == 1, f"{name}: expected one job"
    ((job_name, body),) = jobs[0].items()
    return job_name, body


def labelled(blocks: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """`group "api" {...}` blocks by label."""
    out: dict[str, dict[str, Any]] = {}
    for block in blocks or []:
        for label, body in block.items():
            assert label not in out, f"duplicate block {label!r}"
            out[label] = body
    return out


def one(blocks: list[dict[str, Any]] | None, what: str) -> dict[str, Any]:
    assert blocks is not None and len(blocks) == 1, f"expected exactly one {what} block"
    return blocks[0]


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Nomad's ${...} interpolation with test values; an unknown variable fails the test."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        assert name in variables, f"no test value for ${{{name}}} in {text!r}"
        return variables[name]

    return _INTERPOLATION.sub(sub, text)


def render_template(data: str, env: Mapping[str, str]) -> str:
    """The `{{ env "X" }}` calls of a template stanza, the only function these specs use."""
    rest = re.sub(r"\{\{.*?\}\}", "", _TEMPLATE_ENV.sub("", data))
    assert "{{" not in rest, f"template uses more than env: {data!r}"

    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in env, f"template reads {m.group(1)}, which the task does not have"
        return env[m.group(1)]

    return _TEMPLATE_ENV.sub(sub, data)


def mentions(value: Any, word: str) -> list[str]:
    """Paths of every key or string in `value` that contains `word`."""
    found: list[str] = []

    def walk(v: Any, path: str) -> None:
        if isinstance(v, dict):
            for k, item in v.items():
                if word in k:
                    found.append(f"{path}.{k}")
                walk(item, f"{path}.{k}")
        elif isinstance(v, list):
            for i, item in enumerate(v):
                walk(item, f"{path}[{i}]")
        elif isinstance(v, str) and word in v:
            found.append(path)

    walk(value, "")
    return found
