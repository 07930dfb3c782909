"""Getting a pull's blobs into the local content cache: every source at once, the whole pull one pool of
chunks, every blob checked against its digest before it is used.

The downloading is :class:`~dao.transfer.fetch.Transfer`'s (the chunk scheduler, sources chosen by measured
speed, races and splits, failover, verification and blame: see :mod:`dao.transfer`). This module is what a
pull adds: the cache, and resuming.

The cache lives in ``/var/cache/dao`` (root) or ``~/.cache/dao``: ``blobs/sha256/<hex>`` for verified blobs,
``partial/<hex>`` while one is being written, with ``<hex>.runs`` recording the byte runs it holds (saved
twice a second and when the pull stops, however it stops): a pull killed mid-blob resumes by asking only for
the missing ranges, from whichever source. A lock per blob makes a second ``dao pull`` of the same blob wait
for the first.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Callable
from pathlib import Path

from dao.oci.digest import Digest
from dao.oci.manifest import Descriptor
from dao.pull.cache import BlobCache, load_runs
from dao.pull.partial import PartialBlob, Progress
from dao.transfer.fetch import Transfer
from dao.transfer.schedule import Policy, Stats
from dao.transfer.sources import Peer

START_CONNECTIONS = 16  # what a pull opens first; more while that makes it faster, up to -j


class Fetcher:
    """The pull's blobs from its sources; one per pull (the sources' measured speeds carry over between
    :meth:`fetch` calls)."""

    def __init__(
        self,
        cache: BlobCache,
        peers: list[Peer],
        stats: Stats,
        *,
        connections: int = 32,
        per_source: int = 32,
        resume_attempts: int = 3,
        stall_timeout: float = 15.0,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.cache = cache
        policy = Policy(
            connections=min(START_CONNECTIONS, connections),
            max_connections=max(1, connections),
            per_source=max(1, per_source),
            resume_attempts=resume_attempts,
            stall_timeout=stall_timeout,
        )
        self.transfer = Transfer(peers, policy, stats, warn)
        self.stats = stats

    async def fetch(
        self,
        repo: str,
        blobs: list[Descriptor],
        progress: Callable[[Descriptor], Progress] = lambda d: lambda n, source: None,
        complete: Callable[[Descriptor, Path], None] = lambda d, p: None,
    ) -> dict[Digest, Path]:
        """Every blob's verified path in the cache. Raises :class:`~dao.transfer.fetch.Unavailable` when one
        cannot be had.

        ``progress(blob)`` gives the callback told how many of the blob's bytes are in hand; ``complete(blob,
        path)`` is called as each blob is verified (or found in the cache), in the order that happens."""
        unique = list({b.digest: b for b in blobs}.values())
        out: dict[Digest, Path] = {}
        for d in (self.cache.blobs / "sha256", self.cache.partial):
            d.mkdir(parents=True, exist_ok=True)
        mine: list[PartialBlob] = []

        async def prepare(order: int, desc: Descriptor) -> None:
            hit = await self.cache.cached(desc)
            if hit is None:
                lock = os.open(self.cache.partial / f"{desc.digest.encoded}.lock", os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)  # another dao pull of it: wait
                    hit = await self.cache.cached(desc)
                    if hit is None:
                        partial = self.cache.partial / desc.digest.encoded
                        have = await asyncio.to_thread(load_runs, partial, partial.with_suffix(".runs"), desc.size)
                        self.stats.cached_bytes += have.covered()  # resumed: an earlier run's bytes are local
                        blob = PartialBlob(desc, repo, order, self.cache, lock, have, progress(desc))
                        lock = -1  # the blob holds it now
                        mine.append(blob)
                        self.transfer.add(blob)
                        await blob.done
                        # In the cache now: its lock goes at once, not when the whole pull ends. Another dao
                        # pull may wait on it while holding the lock of a blob this one waits on.
                        blob.close()
                        out[desc.digest] = blob.final
                        complete(desc, blob.final)
                        return
                finally:
                    if lock >= 0:
                        os.close(lock)
            self.stats.cached_bytes += desc.size
            progress(desc)(desc.size, "cache")
            out[desc.digest] = hit
            self.transfer.skip()
            complete(desc, hit)

        workers = 1 + sum(d.size for d in unique) // self.transfer.policy.chunk_min
        try:
            await self.transfer.run([prepare(order, desc) for order, desc in enumerate(unique)], workers)
        finally:
            for blob in mine:
                if blob.fd >= 0:
                    blob.save()  # not finished: the next run starts from here
                blob.close()
        return out
