"""`meshlet COMMAND --help` for every command and subcommand is what it was before the
subcommand modules' imports were made lazy (agent/cli.py builds the parser in every
`meshlet` process, the long-running agent and sidecar included, so those modules import
their translators and templates only when their command runs).

cli_help.txt was captured from the commit before that change. A deliberate change to a
command's flags or text updates it: `COLUMNS=80 python tests/agent/test_cli_help.py >
tests/agent/cli_help.txt`."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

GOLDEN = Path(__file__).with_name("cli_help.txt")


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def every_help() -> str:
    """What `meshlet [COMMAND...] --help` prints, through `main`, for each command path."""
    from agent.cli import build_parser, main

    out = []
    for path in _commands(build_parser()):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            main([*path, "--help"])
        out.append(f"=== meshlet {' '.join(path)} --help\n{buf.getvalue()}")
    return "".join(out)


def test_every_commands_help_is_unchanged() -> None:
    # A fresh interpreter (this file as a script: it imports only the installed meshlet) at a
    # fixed width, as argparse wraps to the terminal's COLUMNS.
    out = subprocess.run(
        [sys.executable, __file__],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONSAFEPATH": "1", "COLUMNS": "80"},
        timeout=60,
        check=True,
    )
    assert out.stdout == GOLDEN.read_text()
    assert out.stdout.count("=== meshlet ") == 24  # every command and subcommand was reached


if __name__ == "__main__":
    assert os.environ.get("COLUMNS") == "80", "COLUMNS=80: the width cli_help.txt is at"
    sys.stdout.write(every_help())
