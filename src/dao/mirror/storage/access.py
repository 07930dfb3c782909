"""When each cached blob was last used, and who is reading one right now: what eviction decides by.

A hit only notes the time in memory (:meth:`AccessLog.touch`); :meth:`AccessLog.persist` writes the times to the
files' mtimes (``utime``, no fsync) in one batch, so a hit costs a dict update and the order survives restarts.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path


def blob_path(base: Path, digest: str) -> Path:
    """``base/<algorithm>/<first two hex digits>/<hex>``: the filesystem backend's layout for a digest."""
    algorithm, _, encoded = digest.partition(":")
    return base / algorithm / encoded[:2] / encoded


class AccessLog:
    """Blob digest -> last use, in memory, flushed to file mtimes in batches; and who is reading now."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._touched: dict[str, float] = {}
        self.reading: dict[str, int] = {}

    def touch(self, digest: str) -> None:
        self._touched[digest] = self.clock()

    def opened(self, digest: str) -> None:
        self.reading[digest] = self.reading.get(digest, 0) + 1

    def closed(self, digest: str) -> None:
        left = self.reading.get(digest, 0) - 1
        if left > 0:
            self.reading[digest] = left
        else:
            self.reading.pop(digest, None)

    def persist(self, blobs_dir: Path) -> None:
        touched, self._touched = self._touched, {}
        for digest, at in touched.items():
            with contextlib.suppress(FileNotFoundError):
                os.utime(blob_path(blobs_dir, digest), (at, at))
