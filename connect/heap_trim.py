"""Giving the heap back to the OS once a burst of connections has drained.

What a connection allocates outside Python (OpenSSL's SSL object and handshake buffers, about
55 KiB; uvloop's 256 KiB SSL read buffer; transports) comes from glibc's malloc. Freed, it
stays in the process: glibc returns memory on `free` only from the top of the heap, and a
burst leaves its free chunks interleaved with live ones. Measured on an uncapped InboundL4
under uvloop in a process of its own: 2,000 connections that started a handshake took RSS
from 57 MB to 164 MB, it stayed at 167 MB once they closed, and a second burst reached
261 MB (the chunks are reused at other offsets, so other pages get touched). `malloc_trim(0)`
gives every free page back (glibc >= 2.8 also releases whole free pages inside the heap):
64 MB after it, in 12 ms; 0.04 ms when there is nothing to give back. It runs on the event
loop: in a thread it would take the same arena locks the loop's allocations wait on.

`HeapTrimmer` calls it, checking every `interval` seconds (never on the data path), once at
least `min_ended` connections have ended since the last trim and the listeners hold at most
half of their peak since then: after a burst has drained, not under steady churn (the count
stays near its peak). Where `malloc_trim` does not exist (not glibc) it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

log = logging.getLogger("meshlet.proxy.heap")

__all__ = [
    "Gauged",
    "HeapTrimmer",
    "keep_read_buffers_on_heap",
    "libc_malloc_trim",
    "settle_garbage_collector",
]

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
READ_BUFFER_BYTES = 256 * 1024
"""What uvloop's TLS transport asks `SSLObject.read` for on every read: CPython allocates
that much, reads into it, then shrinks the bytes (asyncio's reads into a buffer it keeps)."""


def keep_read_buffers_on_heap() -> bool:
    """Serve every TLS read's buffer from the heap instead of a fresh mapping; False where
    the C library has no `mallopt` (not glibc).

    A TLS read allocates READ_BUFFER_BYTES, above glibc's initial mmap threshold (128 KiB),
    so it is mmap'd; CPython then shrinks it to the bytes read (mremap) and frees it
    (munmap). glibc raises its threshold only when a mapped chunk larger than it is freed,
    and the shrunk one never is, so whether a process pays this depends on what it happened
    to free before: in the benchmark's topology the server sidecar paid mmap, mremap, munmap
    and the page faults of a new mapping on every request in 4 runs of 6 (strace -c: 2,058
    of each for 4,113 reads in the L4 one), about 6 us of CPU each time, while the client
    sidecars made none. Setting the threshold once makes the heap the rule: 1 MiB keeps the
    read buffers there (larger allocations are still mapped), and the trim threshold (which
    an explicit mmap threshold no longer adjusts) is raised with it, so freeing one does not
    shrink the heap by brk on every read either. HeapTrimmer still returns what a burst of
    connections leaves behind."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    threshold = 4 * READ_BUFFER_BYTES
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 2 * threshold)
    )


class Gauged(Protocol):
    """A listener's connection counts (connect.listener.ListeningSocket)."""

    @property
    def open_connections(self) -> int: ...

    @property
    def peak_connections(self) -> int: ...

    @property
    def accepted_connections(self) -> int: ...

    def reset_peak(self) -> None: ...


def libc_malloc_trim() -> Callable[[], int] | None:
    """glibc's `malloc_trim(0)`, or None where the C library has none."""
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return lambda: int(fn(0))


class HeapTrimmer:
    def __init__(
        self,
        listeners: Callable[[], Iterable[Gauged]],
        *,
        min_ended: int = 64,
        interval: float = 2.0,
        trim: Callable[[], int] | None = None,
    ) -> None:
        self._listeners = listeners
        self.min_ended = min_ended
        """About 3 MiB of heap when each ended connection had started a TLS handshake."""
        self.interval = interval
        self._trim = trim if trim is not None else libc_malloc_trim()
        self.trims = 0
        self._accepted = 0
        self._open = 0
        """The listeners' accepted and open totals at the last trim."""

    def check(self) -> bool:
        """Trim if a burst has drained since the last trim; True if it trimmed."""
        if self._trim is None:
            return False
        listeners = list(self._listeners())
        accepted = sum(lst.accepted_connections for lst in listeners)
        now = sum(lst.open_connections for lst in listeners)
        peak = sum(lst.peak_connections for lst in listeners)
        ended = (accepted - self._accepted) - (now - self._open)
        if ended < self.min_ended or now * 2 > peak:
            return False
        for lst in listeners:
            lst.reset_peak()
        self._accepted, self._open = accepted, now
        started = time.perf_counter()
        self._trim()
        self.trims += 1
        log.debug(
            "heap trimmed after %d connections ended (%.1f ms)",
            ended, (time.perf_counter() - started) * 1000,
        )  # fmt: skip
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.check()


def settle_garbage_collector() -> None:
    """Once serving: what start-up built (modules, config, first snapshots) leaves the cyclic
    collector's generations, and young collections become rarer. Requests allocate many
    short-lived containers that reference counting frees; without this, a full collection
    walks every long-lived object and stalls the event loop (the proxy benchmark's
    sidecars run with the same settings)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
