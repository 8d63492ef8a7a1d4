"""Resident memory of this process: its peak over a block of work (reported with every quantize
run), and handing memory that was freed back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading

__all__ = ["PeakMemory", "release_freed_memory"]


@functools.cache
def _malloc_trim():
    library = ctypes.util.find_library("c")
    function = getattr(ctypes.CDLL(library), "malloc_trim", None) if library else None
    if function is not None:
        function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
    return function


def release_freed_memory() -> None:
    """Return the heap's free pages to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    Why: torch's CPU tensors come from ``malloc``, and glibc keeps freed blocks below its dynamic
    mmap threshold (up to 32 MB) in its arenas for reuse. Layer after layer the resident size
    then climbs with memory nobody uses: on the default model, 2.9 GB by decoder layer 9 against
    1.7 GB when trimmed (measured). Called between layers, it costs milliseconds."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class PeakMemory:
    """Peak resident memory (MB) of this process while the ``with`` block runs, polled every 50 ms."""

    def __init__(self):
        self.peak_mb = 0.0
        self._stop = threading.Event()

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _poll(self):
        while not self._stop.wait(0.05):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    def __enter__(self):
        self.peak_mb = self._rss_mb()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss_mb())
