"""Keeping the filesystem cache inside its disk: plan what to remove, then remove exactly that.

The cache has a size limit (``cache_max``: blobs plus manifests) and/or a free-space watermark
(``cache_min_free`` on the data directory's filesystem). When either is crossed, blobs go least recently used
first, orphans (referenced by no cached manifest) before the rest; a blob that cached manifests reference goes
*together with* those manifests and the tag records that point at them, so the cache never holds a manifest
whose blobs it threw away.

"Last used" is the file's mtime. Serving a blob only notes the time in memory (:meth:`AccessLog.touch`); the
times are written to the files (``utime``, no fsync) in one batch before each plan, so a hit costs a dict
update, and the order survives restarts. Blobs being read right now are skipped (a reader keeps its open file
anyway: unlinking never breaks a transfer in progress). Blobs still being fetched live in ``tmp/`` and are not
candidates at all, but the disk they take (allocated blocks: spool files fill out of order) counts toward the
limit, so many large fetches at once make room in the cache instead of overrunning it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dao.mirror.storage.access import AccessLog, blob_path
from dao.oci.digest import Digest, DigestError
from dao.oci.manifest import descriptors

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Item:
    kind: str  # "blob" or "manifest"
    digest: str
    size: int
    last_used: float
    reason: str


@dataclass(slots=True)
class Plan:
    cache_bytes: int  # blobs, manifests and partial downloads
    target_bytes: int  # remove until the cache is at most this big
    items: list[Item] = field(default_factory=list)
    spool_bytes: int = 0  # of cache_bytes: partial downloads in tmp/ (not removable, but they take the disk)

    @property
    def freed(self) -> int:
        return sum(i.size for i in self.items)


@dataclass(slots=True)
class _Entry:
    path: Path
    size: int
    mtime: float


class Collector:
    def __init__(self, root: Path, *, max_bytes: int = 0, min_free: int = 0, access: AccessLog | None = None) -> None:
        self.root = root
        self.blobs_dir = root / "blobs"
        self.manifests_dir = root / "manifests"
        self.tags_dir = root / "tags"
        self.max_bytes = max_bytes
        self.min_free = min_free
        self.access = access or AccessLog()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 or self.min_free > 0

    def plan(self) -> Plan:
        """What to remove now (blocking: walks the cache). Empty when within bounds."""
        self.access.persist(self.blobs_dir)
        blobs = dict(self._walk(self.blobs_dir))
        manifests: dict[str, _Entry] = {}
        for digest, entry in self._walk(self.manifests_dir):
            type_file = entry.path.with_suffix(".type")
            entry.size += type_file.stat().st_size if type_file.exists() else 0
            manifests[digest] = entry
        spool = self._spool_bytes()
        cache = sum(e.size for e in blobs.values()) + sum(e.size for e in manifests.values()) + spool
        target = self._target(cache)
        plan = Plan(cache, target, spool_bytes=spool)
        if cache <= target:
            return plan
        referrers: dict[str, set[str]] = {}
        for digest, entry in manifests.items():
            for ref in self._references(entry.path):
                referrers.setdefault(ref, set()).add(digest)
        reading = self.access.reading.copy()  # atomic under the GIL; the loop thread keeps updating it
        candidates = sorted((d for d in blobs if d not in reading), key=lambda d: (d in referrers, blobs[d].mtime, d))
        gone: set[str] = set()
        remaining = cache
        for digest in candidates:
            if remaining <= target:
                break
            entry = blobs[digest]
            users = referrers.get(digest, set())
            reason = "least recently used" if users else "referenced by no cached manifest"
            plan.items.append(Item("blob", digest, entry.size, entry.mtime, reason))
            remaining -= entry.size
            for manifest in sorted(users - gone):
                gone.add(manifest)
                m = manifests[manifest]
                plan.items.append(Item("manifest", manifest, m.size, m.mtime, f"references evicted blob {digest}"))
                remaining -= m.size
        return plan

    def apply(self, plan: Plan) -> int:
        """Remove the plan's items (re-checking that a blob is not being read); returns how many went."""
        removed = 0
        manifests: set[str] = set()
        for item in plan.items:
            if item.kind == "blob" and item.digest in self.access.reading:
                continue
            base = self.blobs_dir if item.kind == "blob" else self.manifests_dir
            path = blob_path(base, item.digest)
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                continue
            if item.kind == "manifest":
                path.with_suffix(".type").unlink(missing_ok=True)
                manifests.add(item.digest)
            blob_path(self.root / "origins", item.digest).unlink(missing_ok=True)
        if manifests:
            self._drop_tags(manifests)
        return removed

    def _target(self, cache: int) -> int:
        target = self.max_bytes if self.max_bytes > 0 else cache
        if self.min_free > 0:
            st = os.statvfs(self.root)
            free = st.f_bavail * st.f_frsize
            target = min(target, max(cache - (self.min_free - free), 0)) if free < self.min_free else target
        return target

    def _spool_bytes(self) -> int:
        total = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root / "tmp"):
                with contextlib.suppress(FileNotFoundError):
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_blocks * 512
        return total

    def _drop_tags(self, manifests: set[str]) -> None:
        for record in self.tags_dir.rglob("*.json"):
            try:
                if json.loads(record.read_bytes()).get("digest") in manifests:
                    record.unlink()
            except (OSError, ValueError, AttributeError):
                continue

    @staticmethod
    def _walk(base: Path) -> Iterable[tuple[str, _Entry]]:
        if not base.is_dir():
            return
        for algorithm in base.iterdir():
            for prefix in algorithm.iterdir() if algorithm.is_dir() else ():
                for path in prefix.iterdir():
                    if path.suffix:  # .type files ride with their manifest
                        continue
                    try:
                        Digest.parse(f"{algorithm.name}:{path.name}")
                        st = path.stat()
                    except (DigestError, FileNotFoundError):
                        continue
                    yield f"{algorithm.name}:{path.name}", _Entry(path, st.st_size, st.st_mtime)

    @staticmethod
    def _references(path: Path) -> list[str]:
        try:
            return [str(d.digest) for d in descriptors(path.read_bytes())]
        except (OSError, ValueError, KeyError, TypeError):
            return []


async def collecting(
    collector: Collector, evicted: Callable[[int], None], interval: float, app: object = None
) -> AsyncIterator[None]:
    """An aiohttp cleanup context: every ``interval`` seconds write the blobs' last-use times, and evict when
    over a limit (file walks and unlinks in a thread; ``evicted`` learns how many items went). The last-use
    times are written once more at a clean stop."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                if not collector.enabled:
                    await asyncio.to_thread(collector.access.persist, collector.blobs_dir)
                    continue
                plan = await asyncio.to_thread(collector.plan)
                if plan.items:
                    removed = await asyncio.to_thread(collector.apply, plan)
                    evicted(removed)
                    log.info(
                        "cache at %d bytes, limit %d: removed %d items, %d bytes",
                        plan.cache_bytes,
                        plan.target_bytes,
                        removed,
                        plan.freed,
                    )
            except OSError as exc:
                log.warning("cache eviction failed, will retry: %s", exc)

    task = asyncio.get_running_loop().create_task(loop(), name="cache eviction")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.to_thread(collector.access.persist, collector.blobs_dir)
