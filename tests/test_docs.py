"""The documentation shipped in the repository: links resolve, commands shown parse.

The rules, for anyone writing a page (docs/README.md says the same in a sentence):

* Links are relative and stay inside the repository: every ``[text](target)`` and
  ``[label]: target`` outside code must name a file or folder that exists here, and a
  ``#fragment`` on a Markdown file must name one of its headings (GitHub's anchor rules).
* No ``http://`` or ``https://`` outside code at all: the docs must be readable from a clone
  with no network. Inside code blocks and code spans URLs are example values (``curl
  http://127.0.0.1:8500/...``, ``CONSUL_HTTP_ADDR``), not links, and are not checked.
* No page, and no comment in the packages, cites the design notes that do not ship with the
  repository (``DESIGN.md``, ``consul-api.md``, ...): say the fact itself.
* Every command in a ```` ```sh ````, ```` ```bash ````, ```` ```shell ```` or
  ```` ```console ```` block that runs ``meshlet`` parses with meshlet's own argument parser.
  In ``console`` blocks only ``$ ``-prompted lines are commands (the rest is output).
  ``<placeholder>`` words are replaced by a sample value. Blocks without a language (or with
  ``text``) hold output and synopses such as ``meshlet x [--flag]`` and are not parsed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
# Folders that are not the project's own documentation: tool caches, the virtualenv,
# py-consul's unpacked sdist (compat/run.py), build output.
SKIP_DIRS = {"build", "dist", "node_modules"}
# Design notes that live next to the repository, not in it; their section numbers mean
# nothing to someone reading a clone.
UNSHIPPED = (
    "DESIGN.md",
    "consul-api.md",
    "authz.md",
    "perf.md",
    "traffic-nomad-vault.md",
    "review-2026-12.md",
    "aesthetics.md",
    "../shared/",
)
CODE_PACKAGES = ("agent", "connect", "intentions", "devstack", "traffic", "bench", "compat")
SHELL_LANGS = {"sh", "bash", "shell", "console"}


def markdown_files() -> list[Path]:
    found: list[Path] = []
    for path in sorted(ROOT.rglob("*.md")):
        rel = path.relative_to(ROOT)
        if any(part.startswith(".") or part in SKIP_DIRS for part in rel.parts[:-1]):
            continue
        if any(part.endswith(".egg-info") for part in rel.parts):
            continue
        found.append(path)
    return found


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


MARKDOWN = markdown_files()


@dataclass(frozen=True)
class Block:
    lang: str
    first_line: int
    lines: tuple[str, ...]


@dataclass(frozen=True)
class Page:
    """A Markdown file split into prose (code spans blanked) and fenced code blocks."""

    path: Path
    prose: tuple[tuple[int, str], ...]  # (line number, text without code spans)
    blocks: tuple[Block, ...]


# Any indentation: fences nested in list items are indented with the item.
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def read_page(path: Path) -> Page:
    prose: list[tuple[int, str]] = []
    blocks: list[Block] = []
    fence: str | None = None
    lang = ""
    start = 0
    body: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        opened = FENCE.match(line)
        if fence is None:
            if opened:
                fence, lang, start, body = opened.group(1), opened.group(2).lower(), number, []
                continue
            prose.append((number, CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)))
        elif line.strip().startswith(fence) and not line.strip()[len(fence) :].strip():
            blocks.append(Block(lang, start + 1, tuple(body)))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"{path}: code block opened at line {start} is never closed"
    return Page(path, tuple(prose), tuple(blocks))


# --- links ----------------------------------------------------------------------------------

INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
URL = re.compile(r"\bhttps?://", re.IGNORECASE)


def links(page: Page) -> Iterator[tuple[int, str]]:
    for number, text in page.prose:
        for match in INLINE_LINK.finditer(text):
            yield number, match.group(1)
        ref = REFERENCE_DEF.match(text)
        if ref:
            yield number, ref.group(1)


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lowercased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _real_heading_texts(path: Path) -> dict[int, str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return {n: lines[n - 1] for n, _ in read_page(path).prose}


def anchors_of(path: Path) -> set[str]:
    # Headings with code spans (`meshlet sidecar ...`) keep their words in the anchor.
    real = _real_heading_texts(path)
    seen: dict[str, int] = {}
    result: set[str] = set()
    for number, text in read_page(path).prose:
        heading = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", real[number])
        if not heading or not re.match(r"^ {0,3}#", text):
            continue
        slug = github_anchor(heading.group(1).replace("`", ""))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def link_problems(path: Path, root: Path = ROOT) -> list[str]:
    page = read_page(path)
    rel = path.relative_to(root)
    problems: list[str] = []
    for number, text in page.prose:
        if URL.search(text):
            problems.append(f"{rel}:{number}: a web address outside code: {text.strip()}")
    for number, target in links(page):
        where = f"{rel}:{number}: link {target!r}"
        if not target:
            problems.append(f"{where}: empty target")
            continue
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            if not URL.match(target):  # http(s) was reported above with its line
                problems.append(f"{where}: only relative links to files in the repository")
            continue
        file_part, _, fragment = target.partition("#")
        if file_part.startswith("/"):
            problems.append(f"{where}: absolute path; link relative to {rel.parent}/")
            continue
        resolved = (path.parent / file_part).resolve() if file_part else path
        try:
            resolved.relative_to(root)
        except ValueError:
            problems.append(f"{where}: points outside the repository")
            continue
        if not resolved.exists():
            problems.append(f"{where}: {resolved.relative_to(root)} does not exist")
            continue
        if fragment and resolved.suffix == ".md" and fragment not in anchors_of(resolved):
            problems.append(f"{where}: no heading #{fragment} in {resolved.relative_to(root)}")
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for name in UNSHIPPED:
            if name in text and not _names_repo_file(text, name, root):
                problems.append(f"{rel}:{number}: cites {name}, which is not in the repository")
    return problems


def _names_repo_file(text: str, name: str, root: Path = ROOT) -> bool:
    # "perf.md" is unshipped, but a path such as docs/proxy.md merely ends like another name.
    return any(
        (root / m).is_file() for m in re.findall(r"[\w./-]*" + re.escape(name), text) if "/" in m
    )


@pytest.mark.parametrize("path", MARKDOWN, ids=_ids(MARKDOWN))
def test_links_resolve_inside_the_repository(path: Path) -> None:
    assert not link_problems(path), "\n".join(link_problems(path))


def test_a_broken_link_is_caught(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "ops.md").write_text("# Ops\n\n## Reload (SIGHUP)\n")
    page = tmp_path / "docs" / "index.md"
    page.write_text(
        "[ok](ops.md#reload-sighup) [gone](missing.md) [anchor](ops.md#reload)\n"
        "[out](../../elsewhere.md) [web](https://example.com) [mail](mailto:x) see DESIGN.md\n"
        "`curl http://127.0.0.1:8500/v1/status/leader` is code\n"
        "```sh\nopen https://example.com  # in code: an example, not a link\n```\n"
    )
    problems = link_problems(page, root=tmp_path)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "a web address outside code: [out](../../elsewhere.md) [web](https://example.com) "
        "[mail](mailto:x) see DESIGN.md",
        "link 'missing.md': docs/missing.md does not exist",
        "link 'ops.md#reload': no heading #reload in docs/ops.md",
        "link '../../elsewhere.md': points outside the repository",
        "link 'mailto:x': only relative links to files in the repository",
        "cites DESIGN.md, which is not in the repository",
    ], problems


def test_the_docs_are_found() -> None:
    names = set(_ids(MARKDOWN))
    assert {"README.md", "docs/README.md", "bench/README.md", "compat/README.md"} <= names


def test_anchor_rules_match_github() -> None:
    assert github_anchor("Running on a VM with systemd") == "running-on-a-vm-with-systemd"
    assert github_anchor("Reload (SIGHUP)") == "reload-sighup"
    assert github_anchor("meshlet sidecar --workers N: more") == "meshlet-sidecar---workers-n-more"
    assert github_anchor("Sidecar pair vs haproxy (proxy_bench.py)") == (
        "sidecar-pair-vs-haproxy-proxy_benchpy"
    )


def code_files() -> list[Path]:
    return sorted(p for pkg in CODE_PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_code_comments_cite_no_unshipped_notes() -> None:
    problems = [
        f"{path.relative_to(ROOT)}:{number}: cites {name}"
        for path in code_files()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        for name in UNSHIPPED
        if name in line and not _names_repo_file(line, name)
    ]
    assert not problems, "\n".join(problems)


# --- commands -------------------------------------------------------------------------------

MESHLET = re.compile(r"^(?:\S*/)?meshlet$")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SEPARATORS = {"&&", "||", ";", "|", "&"}


def placeholder_value(name: str) -> str:
    """A value of the right shape for ``<name>``, so typed options still parse."""
    lowered = name.lower()
    if "port" in lowered:
        return "21000"
    if "addr" in lowered:
        return "127.0.0.1:8500"
    if any(word in lowered for word in ("file", "path", "dir", "yaml")):
        return "/tmp/placeholder"
    if lowered in ("n", "count", "workers"):
        return "2"
    return "web"


def commands(block: Block) -> Iterator[tuple[int, str]]:
    """Logical command lines of a shell block: prompts stripped, continuations joined."""
    pending = ""
    pending_line = 0
    for offset, raw in enumerate(block.lines):
        number = block.first_line + offset
        line = raw.rstrip()
        if not pending:
            if block.lang == "console":
                stripped = line.lstrip()
                if not stripped.startswith(("$ ", "# ")):
                    continue
                line = stripped[2:]
            pending_line = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield pending_line, pending + line
        pending = ""
    if pending:
        yield pending_line, pending


def meshlet_invocations(command: str) -> Iterator[list[str]]:
    command = re.sub(r"<([^<>\s]+)>", lambda m: placeholder_value(m.group(1)), command)
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    segment: list[str] = []
    for token in [*list(lexer), ";"]:
        if token in SEPARATORS or set(token) <= set(";&|"):
            while segment and (ASSIGNMENT.match(segment[0]) or segment[0] in ("sudo", "exec")):
                segment.pop(0)
            if segment and MESHLET.match(segment[0]):
                yield segment[1:]
            segment = []
        else:
            segment.append(token)


@dataclass(frozen=True)
class Shown:
    where: str
    argv: tuple[str, ...]


def shown_commands() -> list[Shown]:
    found: list[Shown] = []
    for path in MARKDOWN:
        for block in read_page(path).blocks:
            if block.lang not in SHELL_LANGS:
                continue
            for number, command in commands(block):
                for argv in meshlet_invocations(command):
                    where = f"{path.relative_to(ROOT)}:{number}"
                    found.append(Shown(where, tuple(argv)))
    return found


def parse_problem(argv: tuple[str, ...]) -> str | None:
    parser = build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(list(argv))
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            return err.getvalue().strip().splitlines()[-1] if err.getvalue() else str(exit_)
    except argparse.ArgumentError as error:
        return str(error)
    return None


SHOWN = shown_commands()


@pytest.mark.parametrize("shown", SHOWN, ids=[f"{s.where} {' '.join(s.argv)}" for s in SHOWN])
def test_shown_meshlet_commands_parse(shown: Shown) -> None:
    problem = parse_problem(shown.argv)
    assert problem is None, f"{shown.where}: meshlet {' '.join(shown.argv)}\n{problem}"


def test_commands_are_found_in_every_kind_of_block() -> None:
    block = Block(
        "console",
        1,
        (
            "$ CONSUL_HTTP_TOKEN=x .venv/bin/meshlet status \\",
            "    --json  # the whole state",
            "state  ready",
            "$ meshlet dev --http-addr <addr> & sleep 1; meshlet version | head -1",
        ),
    )
    argvs = [argv for _, cmd in commands(block) for argv in meshlet_invocations(cmd)]
    assert argvs == [["status", "--json"], ["dev", "--http-addr", "127.0.0.1:8500"], ["version"]]
    assert len(SHOWN) > 20, "the docs show meshlet commands; the scanner lost them"


def test_a_wrong_command_is_caught() -> None:
    assert parse_problem(("sidecar", "--no-such-flag")) is not None
    assert parse_problem(("sidecar", "-c", "/etc/meshlet/web.yaml")) is None
