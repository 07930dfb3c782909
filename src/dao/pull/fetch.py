"""Getting blobs into the local content cache: several at once, big ones in parallel ranges, every one checked
against its digest before it is used, from the first source that delivers.

The cache lives in ``/var/cache/dao`` (root) or ``~/.cache/dao``: ``blobs/sha256/<hex>`` for verified blobs,
``partial/<hex>`` while one is being written, with ``<hex>.runs`` recording which byte runs it holds (saved
twice a second and when the pull stops, however it stops): a pull killed mid-blob resumes by asking only for
the missing ranges, from whichever source. A blob already in the cache is re-hashed and used without a byte of
network. A lock per blob makes a second ``dao pull`` of the same blob wait for the first.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dao.oci.digest import Digest
from dao.oci.manifest import Descriptor
from dao.pull.plan import PullError, Source
from dao.registry.download import Download, DownloadPolicy, Runs
from dao.registry.errors import RegistryClientError, UpstreamUnavailable

HASH_CHUNK = 4 * 1024 * 1024
SAVE_EVERY = 0.5  # seconds between saves of a partial blob's written runs


def default_cache_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/cache/dao")
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dao"


@dataclass(slots=True)
class Stats:
    bytes_by_source: dict[str, int] = field(default_factory=dict)
    cached_bytes: int = 0
    dropped: set[str] = field(default_factory=set)  # sources that sent bytes not matching a digest
    started: float = field(default_factory=time.monotonic)


class _Recorder:
    """Download listener: counts bytes, and keeps the written runs on disk (``<partial>.runs``) at most
    every ``SAVE_EVERY`` seconds, so a killed pull resumes from what it had written."""

    def __init__(self, runs: Runs, runs_file: Path, on_bytes: Callable[[int], None]) -> None:
        self.runs = runs
        self.runs_file = runs_file
        self.on_bytes = on_bytes
        self.size: int | None = None
        self._saved = time.monotonic()

    def on_size(self, size: int | None) -> None:
        self.size = size

    def on_data(self, offset: int, data: memoryview) -> None:
        self.runs.add(offset, offset + len(data))
        self.on_bytes(len(data))
        if time.monotonic() - self._saved >= SAVE_EVERY:
            self.save()

    def save(self) -> None:
        tmp = self.runs_file.with_suffix(".runs-tmp")
        tmp.write_text(json.dumps({"size": self.size, "runs": self.runs.runs}))
        os.replace(tmp, self.runs_file)
        self._saved = time.monotonic()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _unlocked(lock: Path) -> bool:
    """True when no running pull holds this blob's lock."""
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _load_runs(partial: Path, runs_file: Path, size: int) -> Runs:
    """What an earlier, interrupted pull wrote; nothing when the record is missing or for another size."""
    if not partial.exists():
        return Runs()
    try:
        doc = json.loads(runs_file.read_text())
        if doc.get("size") not in (size, None):
            return Runs()
        return Runs([(int(a), int(b)) for a, b in doc["runs"] if 0 <= int(a) < int(b) <= size])
    except (OSError, ValueError, KeyError, TypeError):
        return Runs()


class BlobCache:
    def __init__(
        self, root: Path, policy: DownloadPolicy | None = None, warn: Callable[[str], None] | None = None
    ) -> None:
        self.root = root
        self.warn = warn or (lambda line: print(f"dao: warning: {line}", file=sys.stderr))
        self.blobs = root / "blobs"
        self.partial = root / "partial"
        # Fewer, quicker resume attempts than the mirror's: a pull has other sources to turn to.
        self.policy = policy or DownloadPolicy(connections=4, resume_attempts=3, backoff_base=0.2, backoff_max=1.0)

    def prune(self, max_bytes: int, keep: frozenset[Digest] = frozenset()) -> tuple[int, int]:
        """Bring the cache down to ``max_bytes``: partial downloads no running pull holds go first, then
        verified blobs least recently used first; ``keep`` (the image just pulled) stays. Returns (items
        removed, bytes freed). Blocking."""
        items: list[tuple[float, int, list[Path]]] = []
        for lock in self.partial.glob("*.lock"):
            group = [lock.with_suffix(""), lock.with_suffix(".runs"), lock]
            if _unlocked(lock):
                items.append((0.0, sum(_size(p) for p in group), group))
        for path in self.blobs.glob("*/*"):
            if Digest(path.parent.name, path.name) in keep:
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            items.append((max(st.st_atime, st.st_mtime), st.st_size, [path]))
        total = sum(_size(p) for p in self.blobs.glob("*/*")) + sum(_size(p) for p in self.partial.glob("*"))
        removed = freed = 0
        for _, size, group in sorted(items, key=lambda item: item[0]):
            if total <= max_bytes:
                break
            for path in group:
                path.unlink(missing_ok=True)
            total -= size
            removed += 1
            freed += size
        return removed, freed

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
            await asyncio.to_thread(os.utime, final)  # last use, for pruning
            return final
        for d in (final.parent, self.partial):
            d.mkdir(parents=True, exist_ok=True)
        partial = self.partial / blob.digest.encoded
        runs_file = partial.with_suffix(".runs")
        lock = os.open(partial.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)  # another dao pull of the same blob waits
            if final.exists() and await asyncio.to_thread(_hash_file, final, blob.digest) == blob.digest:
                stats.cached_bytes += blob.size
                progress(blob.size)
                return final
            return await self._download(repo, blob, sources, stats, progress, partial, runs_file, final)
        finally:
            os.close(lock)

    async def _download(
        self,
        repo: str,
        blob: Descriptor,
        sources: list[Source],
        stats: Stats,
        progress: Callable[[int], None],
        partial: Path,
        runs_file: Path,
        final: Path,
    ) -> Path:
        errors = []
        first = True
        for source in sources:
            if source.url in stats.dropped:
                continue
            have = await asyncio.to_thread(_load_runs, partial, runs_file, blob.size)
            if first and have.covered():  # resumed: what an earlier run wrote counts as local
                stats.cached_bytes += have.covered()
                progress(have.covered())
            first = False

            def count(n: int, source: Source = source) -> None:
                stats.bytes_by_source[source.url] = stats.bytes_by_source.get(source.url, 0) + n
                progress(n)

            recorder = _Recorder(have, runs_file, count)
            fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if have.covered() < blob.size:
                    body = source.client.blob_source(repo, blob.digest)
                    await Download(body, fd, recorder, self.policy, have=have, size=blob.size).run()
                os.fsync(fd)
            except RegistryClientError as exc:
                errors.append(f"{source.url}: {exc}")
                if isinstance(exc, UpstreamUnavailable):  # gone or broken, not just without this blob
                    stats.dropped.add(source.url)
                    self.warn(f"{source.url} failed ({exc}); going on with the next source")
                continue
            finally:
                os.close(fd)
                recorder.save()  # also when interrupted: the next run starts from here
            actual = await asyncio.to_thread(_hash_file, partial, blob.digest)
            if actual != blob.digest:
                await asyncio.to_thread(_remove, partial, runs_file)
                errors.append(f"{source.url}: the bytes hash to {actual}, not {blob.digest}")
                stats.dropped.add(source.url)  # a source that lies once is not asked again in this pull
                self.warn(f"{source.url} sent corrupt bytes for {blob.digest}; not using it again")
                continue
            os.replace(partial, final)
            await asyncio.to_thread(_remove, runs_file)
            return final
        raise PullError(f"cannot get {blob.digest}: " + "; ".join(errors))


def _hash_file(path: Path, want: Digest) -> Digest:
    h = hashlib.new(want.algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return Digest(want.algorithm, h.hexdigest())
