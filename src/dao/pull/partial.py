"""One blob of a pull while it is fetched: a :class:`~dao.transfer.job.Job` whose file is the cache's
partial file, whose written runs are saved beside it (so a killed pull resumes), and which becomes the
cache's blob when it verifies."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from dao.oci.manifest import Descriptor
from dao.pull.cache import BlobCache
from dao.registry.runs import Runs
from dao.transfer.job import Job

# Bytes of the blob now in hand (it can go down when bad bytes are dropped) and where the latest came from
# (a source's URL; "cache" for the local content cache).
Progress = Callable[[int, str], None]


class _Told:
    """The transfer's events as the pull's progress callback sees them."""

    def __init__(self, blob: PartialBlob, progress: Progress) -> None:
        self.blob, self.progress = blob, progress

    def on_size(self, size: int | None) -> None:
        pass

    def on_data(self, offset: int, data: memoryview, url: str) -> None:
        self.progress(self.blob.have.covered(), url)

    def on_lost(self, covered: int) -> None:
        self.progress(covered, "")


class PartialBlob(Job):
    def __init__(
        self, desc: Descriptor, repo: str, order: int, cache: BlobCache, lock: int, have: Runs, progress: Progress
    ) -> None:
        self.partial = cache.partial / desc.digest.encoded
        self.final: Path = cache.path(desc.digest)
        self.lock = lock
        super().__init__(
            desc.digest,
            desc.size,
            os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o644),
            repo=repo,
            order=order,
            have=have,
            listener=_Told(self, progress),
            verify=True,
            runs_file=self.partial.with_suffix(".runs"),
        )
        progress(have.covered(), "cache")

    def commit(self) -> None:
        os.close(self.fd)
        self.fd = -1
        os.replace(self.partial, self.final)
        assert self.runs_file is not None
        self.runs_file.unlink(missing_ok=True)

    def close(self) -> None:
        """Once only: the lock's descriptor number may belong to another file after it is closed."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.lock >= 0:
            os.close(self.lock)
            self.lock = -1
