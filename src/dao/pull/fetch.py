"""Getting blobs into the local content cache: several at once, big ones in parallel ranges, every one checked
against its digest before it is used, from the first source that delivers.

The cache lives in ``/var/cache/dao`` (root) or ``~/.cache/dao``: ``blobs/sha256/<hex>`` for verified blobs,
``partial/<hex>`` while one is being written. A blob already in the cache is re-hashed and used without a
byte of network.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dao.oci.digest import Digest
from dao.oci.manifest import Descriptor
from dao.pull.plan import PullError, Source
from dao.registry.download import Download, DownloadPolicy
from dao.registry.errors import RegistryClientError

HASH_CHUNK = 4 * 1024 * 1024


def default_cache_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/cache/dao")
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dao"


@dataclass(slots=True)
class Stats:
    bytes_by_source: dict[str, int] = field(default_factory=dict)
    cached_bytes: int = 0
    started: float = field(default_factory=time.monotonic)


class _Counter:
    """Download listener: counts bytes for the summary and the progress callback."""

    def __init__(self, on_bytes: Callable[[int], None]) -> None:
        self.on_bytes = on_bytes

    def on_size(self, size: int | None) -> None:
        pass

    def on_data(self, offset: int, data: memoryview) -> None:
        self.on_bytes(len(data))


class BlobCache:
    def __init__(self, root: Path, policy: DownloadPolicy | None = None) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.partial = root / "partial"
        self.policy = policy or DownloadPolicy(connections=4)

    def path(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.encoded

    async def get(
        self,
        repo: str,
        blob: Descriptor,
        sources: list[Source],
        stats: Stats,
        progress: Callable[[int], None] = lambda n: None,
    ) -> Path:
        """The verified blob's path; tries each source in turn. Raises PullError when none delivers."""
        final = self.path(blob.digest)
        if final.exists() and await asyncio.to_thread(_hash_file, final, blob.digest) == blob.digest:
            stats.cached_bytes += blob.size
            progress(blob.size)
            return final
        for d in (final.parent, self.partial):
            d.mkdir(parents=True, exist_ok=True)
        errors = []
        for source in sources:
            partial = self.partial / f"{blob.digest.encoded}.{os.getpid()}"
            fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            got = 0

            def count(n: int, source: Source = source) -> None:
                nonlocal got
                got += n
                stats.bytes_by_source[source.url] = stats.bytes_by_source.get(source.url, 0) + n
                progress(n)

            try:
                body = source.client.blob_source(repo, blob.digest)
                size = await Download(body, fd, _Counter(count), self.policy).run()
                os.fsync(fd)
            except RegistryClientError as exc:
                errors.append(f"{source.url}: {exc}")
                progress(-got)
                continue
            finally:
                os.close(fd)
            actual = await asyncio.to_thread(_hash_file, partial, blob.digest)
            if actual != blob.digest or size != blob.size:
                partial.unlink(missing_ok=True)
                errors.append(f"{source.url}: sent {size} bytes hashing to {actual}, not {blob.digest}")
                progress(-got)
                continue
            os.replace(partial, final)
            return final
        raise PullError(f"cannot get {blob.digest}: " + "; ".join(errors))


def _hash_file(path: Path, want: Digest) -> Digest:
    h = hashlib.new(want.algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return Digest(want.algorithm, h.hexdigest())
