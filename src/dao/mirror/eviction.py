"""Keeping the cache inside its limits: plan what to remove, then remove exactly that.

The cache has a size limit (``cache_max``: blobs plus manifests) and/or a free-space watermark
(``cache_min_free`` where the store lives). When either is crossed, blobs go least recently used first,
orphans (referenced by no cached manifest) before the rest; a blob that cached manifests reference goes
*together with* those manifests and the tag records that point at them, so the cache never holds a manifest
whose blobs it threw away.

Everything here goes through the storage Protocols (:class:`~dao.mirror.storage.base.BlobCollection`, the
manifest and origin stores): listing with sizes and last use, deletion, the blobs being read right now, the
space fetches in progress take. So an object-store backend is collected the same way. The filesystem's
"last use" is the blob file's mtime, written in batches (see :mod:`.storage.access`). Blobs being read right
now are skipped. Blobs still being fetched are not candidates at all, but the space they take counts toward
the limit, so many large fetches at once make room in the cache instead of overrunning it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from dao.mirror.storage.base import BlobCollection, ManifestCollection, OriginForgetter
from dao.oci.digest import Digest, DigestError

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
    spool_bytes: int = 0  # of cache_bytes: fetches in progress (not removable, but they take the space)

    @property
    def freed(self) -> int:
        return sum(i.size for i in self.items)


class Collector:
    def __init__(
        self,
        blobs: BlobCollection,
        manifests: ManifestCollection,
        origins: OriginForgetter,
        *,
        max_bytes: int = 0,
        min_free: int = 0,
    ) -> None:
        self.blobs = blobs
        self.manifests = manifests
        self.origins = origins
        self.max_bytes = max_bytes
        self.min_free = min_free

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 or self.min_free > 0

    async def plan(self) -> Plan:
        """What to remove now. Empty when within bounds."""
        blobs = {b.digest: b for b in await self.blobs.listing()}
        manifests = {m.digest: m for m in await self.manifests.listing()}
        spool = await self.blobs.spool_bytes()
        cache = sum(b.size for b in blobs.values()) + sum(m.size for m in manifests.values()) + spool
        target = await self._target(cache)
        plan = Plan(cache, target, spool_bytes=spool)
        if cache <= target:
            return plan
        referrers: dict[str, set[str]] = {}
        for digest, refs in (await self.manifests.references(list(manifests))).items():
            for ref in refs:
                referrers.setdefault(ref, set()).add(digest)
        reading = self.blobs.in_use()
        candidates = sorted(
            (d for d in blobs if d not in reading), key=lambda d: (d in referrers, blobs[d].last_used, d)
        )
        gone: set[str] = set()
        remaining = cache
        for digest in candidates:
            if remaining <= target:
                break
            blob = blobs[digest]
            users = referrers.get(digest, set())
            reason = "least recently used" if users else "referenced by no cached manifest"
            plan.items.append(Item("blob", digest, blob.size, blob.last_used, reason))
            remaining -= blob.size
            for manifest in sorted(users - gone):
                gone.add(manifest)
                m = manifests[manifest]
                plan.items.append(Item("manifest", manifest, m.size, m.last_used, f"references evicted blob {digest}"))
                remaining -= m.size
        return plan

    async def apply(self, plan: Plan) -> int:
        """Remove the plan's items (re-checking that a blob is not being read); returns how many went."""
        removed = 0
        manifests: set[str] = set()
        for item in plan.items:
            if item.kind == "manifest":
                manifests.add(item.digest)
                continue
            if item.digest in self.blobs.in_use():
                continue
            try:
                gone = await self.blobs.delete(Digest.parse(item.digest))
            except DigestError:
                continue
            if gone:
                removed += 1
                await self.origins.forget(item.digest)
        if manifests:
            removed += await self.manifests.delete(manifests)
            for digest in manifests:
                await self.origins.forget(digest)
        return removed

    async def _target(self, cache: int) -> int:
        target = self.max_bytes if self.max_bytes > 0 else cache
        if self.min_free > 0:
            free = await self.blobs.free_bytes()
            if free is not None and free < self.min_free:
                target = min(target, max(cache - (self.min_free - free), 0))
        return target


async def collecting(
    collector: Collector, evicted: Callable[[int], None], interval: float, app: object = None
) -> AsyncIterator[None]:
    """An aiohttp cleanup context: every ``interval`` seconds record the blobs' uses, and evict when over a
    limit (``evicted`` learns how many items went). The uses are recorded once more at a clean stop."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                if not collector.enabled:
                    await collector.blobs.record_uses()
                    continue
                plan = await collector.plan()
                if plan.items:
                    removed = await collector.apply(plan)
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
    await collector.blobs.record_uses()
