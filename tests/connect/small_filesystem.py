"""A real, small filesystem to fill: a tmpfs of a few hundred KiB mounted for one test, so a
write on it fails with ENOSPC as on a full disk, and space comes back when the filler file
goes. Mounting needs root (CAP_SYS_ADMIN), as on CI and the project's machines; elsewhere
the test is skipped with the reason. (/dev/full never gets space back, and RLIMIT_FSIZE
fails writes with EFBIG, not the disk-full error.)"""

from __future__ import annotations

import contextlib
import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

FILLER = "filler"


@contextlib.contextmanager
def small_filesystem(where: Path, size_kib: int = 256) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        # Lazy: a process that still holds a file there lets go of it when it ends.
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def fill(fs: Path) -> int:
    """Take every free byte of `fs` with a filler file; returns its size."""
    size = 0
    with open(fs / FILLER, "ab", buffering=0) as f:
        chunk = b"\0" * 65536
        while True:
            try:
                n = f.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return size
            size += n or 0


def free(fs: Path) -> None:
    """Give the space back."""
    (fs / FILLER).unlink()
