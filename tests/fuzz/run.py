"""Coverage-guided fuzzing of one target with atheris (libFuzzer), seeded from the corpus kept
in the repository.

    python -m tests.fuzz.run TARGET [--runs N] [--max-len BYTES]

The repository's corpus (tests/fuzz/corpus/TARGET) is read, never written: inputs libFuzzer
finds interesting go to a scratch directory (tests/fuzz/.work/TARGET, ignored by git), so the
committed seeds stay small and reviewed. A crash is written there too (`crash-<sha1>`), and the
process exits non-zero; replay it with `python -m tests.fuzz.run TARGET --replay FILE`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import atheris

from tests.fuzz.mutator import FORMATS, StructuredMutator

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
WORK = HERE / ".work"

NAMES = (
    "policy",
    "intentions_entry",
    "traffic_entry",
    "traffic_chain",
    "filter_expression",
    "agent_config",
    "consul_results",
    "catalog",
    "http_proxy",
)
OURS = ["agent", "connect", "intentions", "traffic", "devstack"]


def _load(name: str) -> Callable[[bytes], None]:
    # Our packages are instrumented for coverage as they are imported, so import them here.
    with atheris.instrument_imports(include=OURS):
        if name == "http_proxy":
            from tests.fuzz.http_proxy import http_target

            return http_target
        from tests.fuzz.targets import TARGETS

        return TARGETS[name]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run")
    parser.add_argument("target", choices=NAMES)
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--replay", type=Path, help="run one input (a crash file) and exit")
    parser.add_argument(
        "--bytes-only", action="store_true", help="libFuzzer's byte mutations only (no JSON/YAML)"
    )
    args = parser.parse_args()
    target = _load(args.target)
    if args.replay is not None:
        target(args.replay.read_bytes())
        print(f"{args.replay}: no failure")
        return
    work = WORK / args.target
    work.mkdir(parents=True, exist_ok=True)
    seeds = CORPUS / args.target
    libfuzzer = [
        sys.argv[0],
        f"-runs={args.runs}",
        f"-max_len={args.max_len}",
        f"-artifact_prefix={work}/",
        "-timeout=20",
        "-rss_limit_mb=4096",
        "-print_final_stats=1",
        str(work),
        str(seeds),
    ]
    setup: dict[str, object] = {}
    if args.target in FORMATS and not args.bytes_only:
        fmt, prefix = FORMATS[args.target]
        # atheris.Mutate is looked up per call: Fuzz() replaces the module's stub.
        setup["custom_mutator"] = StructuredMutator(
            args.target,
            fmt,
            prefix,
            lambda data, size: atheris.Mutate(data, size),  # noqa: PLW0108
        )
    atheris.Setup(libfuzzer, target, **setup)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
