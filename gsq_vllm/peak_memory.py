"""Peak resident memory of this process over a block of work (reported with every quantize run)."""

from __future__ import annotations

import os
import threading


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
