"""The data plane's hot modules compiled with mypyc, when asked.

    pip install mypy <meshlet's dependencies>     # e.g. `pip install ./meshlet mypy`
    MESHLET_MYPYC=1 pip install --no-build-isolation --no-deps --force-reinstall ./meshlet

pyproject.toml holds everything else; this file only adds the extension modules. mypyc
type-checks what it compiles against the installed dependencies, hence no build isolation.
Compiled, the HTTP pair spends about a fifth less CPU per request (bench/README.md, "mypyc");
the code is the same mypy-strict source, so the pure-Python modules stay the reference and
the fallback: without `MESHLET_MYPYC=1`, or without mypy, a C compiler or Python's headers,
nothing is compiled. Never set it for an editable install (`pip install -e`): the compiled
modules would sit next to the sources and shadow every later edit of them.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

# The per-request path of both listeners, and what it calls per request. Everything else
# (the agent, control-plane code, startup) gains nothing measurable from compiling. Not the
# modules whose dataclasses travel in data-plane snapshots (connect/routes.py, cluster.py,
# balancer.py): mypyc erases their field types (`tuple[Route, ...]` becomes `tuple`), which the
# snapshot codec (connect/dataplane/codec.py) reads to decode them.
HOT = [
    "connect/http1_headers.py",
    "connect/http1/wire.py",
    "connect/http1/exchange.py",
    "connect/http1/upstream.py",
    "connect/http1/downstream.py",
    "connect/http1/origin.py",
    "connect/http_target.py",
    "connect/l4.py",
]


def _can_compile() -> str:
    """Why mypyc cannot build here, or empty."""
    if shutil.which(os.environ.get("CC", "cc")) is None:
        return "no C compiler"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "no Python.h (the python3-dev headers)"
    return ""


def _ext_modules() -> list[object]:
    if os.environ.get("MESHLET_MYPYC") != "1":
        return []
    why = _can_compile()
    if not why:
        try:
            from mypyc.build import mypycify
        except ImportError:
            why = "no mypy in the build environment (use --no-build-isolation)"
    if why:
        print(f"meshlet: MESHLET_MYPYC=1 but {why}: installing pure Python", file=sys.stderr)
        return []
    return list(mypycify(HOT, opt_level="3"))


if __name__ == "__main__":  # as setuptools runs it; `make test-compiled` reads HOT only
    setup(ext_modules=_ext_modules())
