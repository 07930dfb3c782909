"""dao pull's content cache: verified blobs by digest, and the partial downloads an interrupted pull left
(the file, the byte runs it holds, and a lock a running pull keeps), pruned least recently used first."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
from pathlib import Path

from dao.oci.digest import Digest
from dao.oci.manifest import Descriptor
from dao.paths import cache_dir
from dao.registry.runs import Runs

HASH_CHUNK = 4 * 1024 * 1024


def default_cache_dir() -> Path:
    return cache_dir()


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


def load_runs(partial: Path, runs_file: Path, size: int) -> Runs:
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
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.partial = root / "partial"

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

    async def cached(self, blob: Descriptor) -> Path | None:
        """The blob's path when the cache holds it with the right bytes (re-hashed: a cache is not proof)."""
        final = self.path(blob.digest)
        if final.exists() and await asyncio.to_thread(hash_file, final, blob.digest) == blob.digest:
            await asyncio.to_thread(os.utime, final)  # last use, for pruning
            return final
        return None


def hash_file(path: Path, want: Digest) -> Digest:
    h = hashlib.new(want.algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return Digest(want.algorithm, h.hexdigest())
