"""Getting a pull's blobs into the local content cache: every source at once, the whole pull cut into chunks,
every blob checked against its digest before it is used.

The pull's missing bytes are one pool of work. ``connections`` workers (``-j``) each claim the next chunk --
the front of the first blob with unclaimed bytes -- and fetch it from the source :func:`~dao.pull.route.pick`
chooses: mirrors before the registry, the unmeasured first, then the fastest with a free connection (at most
``per_source`` each). A chunk is sized to ~``CHUNK_SECONDS`` of its source's measured per-connection speed,
and to a fair share of what is left once the pull nears its end, so every connection stays busy until the
last byte and a slow source never holds a big piece. A chunk that is a whole blob is a plain ``GET`` (what
``docker pull`` sends); others are ``Range`` requests. A source that ignores ``Range`` only gets whole blobs.

Failures: a mirror that errors, answers 429/5xx or stalls (no byte for ``stall_timeout``) is dropped for the
rest of the pull and its chunks go back to the pool; a 404 only rules it out for that blob. The last source
that can serve a blob is not dropped but retried with backoff, until ``resume_attempts`` tries in a row
brought no byte. When nothing is left to claim, an idle worker re-issues the slowest running chunk to a
source measured at least twice as fast; both write at the same cursor, first writer wins, the loser is
cancelled.

Integrity: a complete blob is hashed. On a mismatch, the byte runs each source wrote are fetched again from
another source and compared; a source whose bytes differ is reported and dropped, the other source's bytes
replace them, and the blob is hashed again. Without a second source (or when that finds nothing), the blob
is fetched again from scratch, at most ``VERIFY_ROUNDS`` times.

The cache lives in ``/var/cache/dao`` (root) or ``~/.cache/dao``: ``blobs/sha256/<hex>`` for verified blobs,
``partial/<hex>`` while one is being written, with ``<hex>.runs`` recording the byte runs it holds (saved
twice a second and when the pull stops, however it stops): a pull killed mid-blob resumes by asking only for
the missing ranges, from whichever source. A lock per blob makes a second ``dao pull`` of the same blob wait
for the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dao.aio import backoff, first_error
from dao.oci.digest import Digest
from dao.oci.manifest import Descriptor
from dao.pull.cache import BlobCache, load_runs
from dao.pull.partial import Claim, PartialBlob, Progress
from dao.pull.plan import PullError
from dao.pull.route import Peer, can_serve, pick
from dao.pull.verify import Verification
from dao.registry.download import skipping
from dao.registry.errors import RegistryClientError, UpstreamNotFound, UpstreamUnavailable

log = logging.getLogger(__name__)

MiB = 1024 * 1024
CHUNK_SECONDS = 4.0  # a chunk is this much of its source's measured per-connection speed...
FIRST_CHUNK = 4 * MiB  # ...or this before the source is measured
CHUNK_MIN = 512 * 1024  # below this a request's round trip costs too much of its time on a long path
CHUNK_MAX = 64 * MiB
REISSUE_ETA = 2.0  # seconds a running chunk must still need before a faster source races it
REISSUE_SPEEDUP = 2.0  # how much faster (measured) the second source must be
SPLIT_ETA = 1.5  # seconds a running chunk must still need before an idle connection takes half of it
SPLIT_MIN = 256 * 1024  # neither half smaller than this
RATE_SAMPLE = 1.0  # seconds between speed samples of a running chunk
IDLE_RECHECK = 0.5  # seconds an idle worker waits before looking for a chunk to race again


@dataclass(slots=True)
class Stats:
    bytes_by_source: dict[str, int] = field(default_factory=dict)
    cached_bytes: int = 0
    reissued: int = 0  # chunks raced by a second source
    split: int = 0  # running chunks halved for an idle connection
    started: float = field(default_factory=time.monotonic)

    def count(self, url: str, n: int) -> None:
        self.bytes_by_source[url] = self.bytes_by_source.get(url, 0) + n


class _RangeIgnored(Exception):
    pass


class Fetcher(Verification):
    """The pull's blobs from its sources; one per pull (the sources' measured speeds carry over between
    :meth:`fetch` calls)."""

    def __init__(
        self,
        cache: BlobCache,
        peers: list[Peer],
        stats: Stats,
        *,
        connections: int = 16,
        per_source: int = 16,
        resume_attempts: int = 3,
        stall_timeout: float = 15.0,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.cache = cache
        self.peers = peers
        self.stats = stats
        self.connections = max(1, connections)
        self.per_source = max(1, per_source)
        self.resume_attempts = resume_attempts
        self.stall_timeout = stall_timeout
        self.warn = warn or (lambda line: print(f"dao: warning: {line}", file=sys.stderr))
        self._blobs: list[PartialBlob] = []
        self._pulse = asyncio.Event()
        self._unresolved = 0
        self._checks: set[asyncio.Task[None]] = set()
        self._repairing = asyncio.Lock()
        self._repo = ""

    async def fetch(
        self,
        repo: str,
        blobs: list[Descriptor],
        progress: Callable[[Descriptor], Progress] = lambda d: lambda n, source: None,
        complete: Callable[[Descriptor, Path], None] = lambda d, p: None,
    ) -> dict[Digest, Path]:
        """Every blob's verified path in the cache. Raises PullError when one cannot be had.

        ``progress(blob)`` gives the callback told how many of the blob's bytes are in hand; ``complete(blob,
        path)`` is called as each blob is verified (or found in the cache), in the order that happens."""
        self._repo = repo
        unique = list({b.digest: b for b in blobs}.values())
        out: dict[Digest, Path] = {}
        for d in (self.cache.blobs / "sha256", self.cache.partial):
            d.mkdir(parents=True, exist_ok=True)
        mine: list[PartialBlob] = []
        self._unresolved = len(unique)

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
                        blob = PartialBlob(desc, order, self.cache, lock, have, progress(desc))
                        lock = -1  # the blob holds it now
                        mine.append(blob)
                        self._blobs.append(blob)
                        self._blobs.sort(key=lambda b: b.order)
                        if blob.complete():
                            self._check_soon(blob)
                        self._wake()
                        out[desc.digest] = await blob.done
                        complete(desc, out[desc.digest])
                        return
                finally:
                    if lock >= 0:
                        os.close(lock)
            self.stats.cached_bytes += desc.size
            progress(desc)(desc.size, "cache")
            out[desc.digest] = hit
            self._resolved()
            complete(desc, hit)

        try:
            async with asyncio.TaskGroup() as group:
                for order, desc in enumerate(unique):
                    group.create_task(prepare(order, desc))
                for _ in range(min(self.connections, 1 + sum(d.size for d in unique) // CHUNK_MIN)):
                    group.create_task(self._worker())
        except BaseExceptionGroup as eg:
            raise first_error(eg) from None
        finally:
            for task in self._checks:
                task.cancel()
            for blob in mine:
                self._blobs.remove(blob)
                if blob.fd >= 0:
                    blob.save()  # not finished: the next run starts from here
                blob.close()
        return out

    def _wake(self) -> None:
        """Idle workers look again: a chunk was released, a blob added or checked, a source dropped."""
        self._pulse.set()
        self._pulse = asyncio.Event()

    def _resolved(self) -> None:
        self._unresolved -= 1
        self._wake()

    # -- workers -------------------------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            while (job := self._next()) is None:
                if self._unresolved <= 0:
                    return
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that comes as the
                # pulse fires, and a worker that misses the task group's cancel would keep the pull waiting.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(IDLE_RECHECK):
                        await self._pulse.wait()
            peer, claim, cursor = job
            log.debug("%s bytes %d-%d from %s", claim.blob.digest.encoded[:12], cursor, claim.end - 1, peer.url)
            task = asyncio.create_task(self._race(peer, claim, cursor))
            claim.tasks.add(task)
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # the pull itself is being stopped
                # else: the other racer finished this chunk first, or its source was dropped (maybe before
                # the racer even started: so the bookkeeping is done here, not in the racer)
            finally:
                peer.active -= 1
                self._release(claim, task)
                self._wake()

    def _next(self) -> tuple[Peer, Claim, int] | None:
        """The next chunk and its source, or a slow running chunk to race; None when there is nothing to do."""
        remaining = 0
        candidates: list[tuple[PartialBlob, list[tuple[int, int]]]] = []
        for blob in self._blobs:
            if blob.done.done() or blob.checking:
                continue
            holes = blob.unclaimed()
            if not holes:
                continue
            remaining += sum(b - a for a, b in holes)
            candidates.append((blob, holes))
        for blob, holes in candidates:
            if not can_serve(self.peers, blob.digest):
                if not blob.claims:
                    self._fail(blob)
                continue
            peer = pick(self.peers, blob.digest, self.per_source)
            if peer is None:
                continue
            start, end = holes[0]
            if not peer.ranges:
                if blob.claims:
                    continue  # it can only send the whole blob; leave this one to the others
                end = blob.size
            else:
                size = self._chunk_size(peer, remaining)
                if end - start > size + CHUNK_MIN:
                    end = start + size
            claim = Claim(blob, start, end, peer)
            blob.claims.append(claim)
            peer.active += 1  # now: the next pick in this same loop turn must see it
            return peer, claim, start
        return self._reissue() or self._split()

    def _chunk_size(self, peer: Peer, remaining: int) -> int:
        target = peer.rate * CHUNK_SECONDS if peer.rate else FIRST_CHUNK
        fair = remaining // self.connections  # near the end: a share of what is left, so all finish together
        return int(max(CHUNK_MIN, min(CHUNK_MAX, target, max(fair, CHUNK_MIN))))

    def _reissue(self) -> tuple[Peer, Claim, int] | None:
        """The running chunk that would finish last, raced by a source measured much faster than it goes."""
        now = time.monotonic()
        best: tuple[float, Peer, Claim] | None = None
        for blob in self._blobs:
            for claim in blob.claims:
                left = claim.end - claim.pos
                if claim.raced or left < CHUNK_MIN // 4 or now - claim.started < 1.0:
                    continue
                rate = claim.rate(now)
                eta = left / max(rate, 1.0)
                if eta < REISSUE_ETA:
                    continue
                peer = pick(self.peers, blob.digest, self.per_source, exclude=claim.peer)
                if peer is None or peer.rate is None or peer.rate < REISSUE_SPEEDUP * rate:
                    continue
                if best is None or eta > best[0]:
                    best = (eta, peer, claim)
        if best is None:
            return None
        _, peer, claim = best
        claim.raced = True
        peer.active += 1
        self.stats.reissued += 1
        log.info("racing %s bytes %d-%d on %s", claim.blob.digest, claim.pos, claim.end - 1, peer.url)
        return peer, claim, claim.pos

    def _split(self) -> tuple[Peer, Claim, int] | None:
        """Nothing left to hand out and no faster source to race with: the running chunk with the most left
        gives its second half to this idle connection (the same source is welcome), so no connection idles
        while another still has seconds of work. The first request stops at the new boundary."""
        now = time.monotonic()
        best: tuple[int, Claim] | None = None
        for blob in self._blobs:
            if blob.done.done() or blob.checking:
                continue
            for claim in blob.claims:
                left = claim.end - claim.pos
                if claim.raced or left < 2 * SPLIT_MIN or now - claim.started < 0.5:
                    continue
                if left / max(claim.rate(now), 1.0) < SPLIT_ETA:
                    continue  # done soon anyway: a new request's round trips would cost more
                if best is None or left > best[0]:
                    best = (left, claim)
        if best is None:
            return None
        left, claim = best
        peer = pick(self.peers, claim.blob.digest, self.per_source)
        if peer is None or not peer.ranges:
            return None
        middle = claim.pos + left // 2
        second = Claim(claim.blob, middle, claim.end, peer)
        claim.end = middle
        claim.blob.claims.append(second)
        peer.active += 1
        self.stats.split += 1
        log.info("splitting %s at byte %d for %s", claim.blob.digest, middle, peer.url)
        return peer, second, middle

    # -- one request ---------------------------------------------------------------------------------------

    async def _race(self, peer: Peer, claim: Claim, cursor: int) -> None:
        """Fetch ``claim`` from ``cursor`` on. The worker that runs it keeps ``peer.active`` and releases the
        claim when it ends; failures release it at once, so others can take it during a backoff."""
        blob = claim.blob
        mark = began = time.monotonic()
        got = marked = 0
        try:
            rest = not peer.ranges  # a source known to ignore Range gets the rest of a blob, read from byte 0
            whole = rest or (cursor == 0 and claim.end == blob.size)
            source = peer.source.client.blob_source(self._repo, blob.digest)
            async with source.open(cursor, None if whole else claim.end - 1) as body:
                if body.size is not None and body.size != blob.size:
                    raise UpstreamUnavailable(f"says {blob.digest} has {body.size} bytes, not {blob.size}")
                skip = cursor - body.offset
                if skip < 0 or (skip > 0 and not rest):
                    peer.ranges = False  # this chunk goes back; the next claim is the blob's rest
                    raise _RangeIgnored
                async for view in skipping(body.chunks(), skip):
                    view = view[: claim.end - cursor]
                    if not view:
                        continue
                    got += len(view)
                    self.stats.count(peer.url, len(view))
                    now = peer.last_byte = time.monotonic()
                    if now - mark >= RATE_SAMPLE:  # measured while it runs: a slow source shows in a second
                        peer.measured(got - marked, now - mark)
                        mark, marked = now, got
                    fresh = claim.pos - cursor  # > 0: the other racer already wrote that much of this
                    if fresh < len(view):
                        blob.wrote(max(cursor, claim.pos), view[max(fresh, 0) :], peer)
                        claim.pos = cursor + len(view)
                    cursor += len(view)
                    if cursor >= claim.end or claim.pos >= claim.end:
                        break
            if claim.pos < claim.end and cursor < claim.end:
                raise UpstreamUnavailable(f"body ended at byte {cursor}, wanted {claim.end}")
        except _RangeIgnored:
            self._release(claim)
            return
        except UpstreamNotFound as exc:
            peer.missing.add(blob.digest)
            blob.errors[peer.url] = f"not found ({exc})"
            self._release(claim)
            return
        except (RegistryClientError, TimeoutError) as exc:
            self._release(claim)
            blob.errors[peer.url] = str(exc)
            if _stalled(exc) and time.monotonic() - peer.last_byte < self.stall_timeout:
                # Its other streams still flow: busy (a cold mirror fetching other parts first), not dead.
                peer.cap = max(1, peer.active - 1)
                log.info("%s is busy (a stream stalled while others flow): %d connections to it", peer.url, peer.cap)
                return
            await self._failed(peer, blob, exc, got)
            return
        if mark == began:  # a short chunk: one sample for all of it
            peer.measured(got, time.monotonic() - began)
        peer.failures = 0
        if peer.cap is not None:  # it kept up: one more connection (additive increase)
            peer.cap = None if peer.cap + 1 >= self.per_source else peer.cap + 1
        if claim.pos >= claim.end:
            self._finish(claim)

    def _release(self, claim: Claim, racer: asyncio.Task[None] | None = None) -> None:
        """This racer is out; with no other racer the chunk's unwritten rest is free for anyone."""
        claim.tasks.discard(racer or asyncio.current_task())  # type: ignore[arg-type]
        if not claim.tasks and claim in claim.blob.claims:
            claim.blob.claims.remove(claim)

    def _finish(self, claim: Claim) -> None:
        blob = claim.blob
        if claim in blob.claims:
            blob.claims.remove(claim)
        current = asyncio.current_task()
        for task in claim.tasks:
            if task is not current:
                task.cancel()  # the slower racer
        if blob.complete() and not blob.checking and not blob.done.done():
            self._check_soon(blob)

    async def _failed(self, peer: Peer, blob: PartialBlob, exc: BaseException, got: int) -> None:
        others = any(p is not peer and p.out is None and blob.digest not in p.missing for p in self.peers)
        if others:
            self._drop(peer, f"{peer.url} failed ({exc}); going on with the other sources")
            return
        peer.failures = 0 if got else peer.failures + 1
        if peer.failures >= self.resume_attempts:
            self._drop(peer, f"{peer.url} failed {peer.failures} times in a row ({exc})")
            return
        log.info("retrying %s after: %s", peer.url, exc)
        await asyncio.sleep(backoff(peer.failures, 0.2, 2.0))

    def _drop(self, peer: Peer, why: str, *, lied: bool = False) -> None:
        if peer.out is not None:
            return
        peer.out = why
        peer.lied = lied
        self.warn(why)
        current = asyncio.current_task()
        for blob in self._blobs:
            for claim in blob.claims:
                if claim.peer is peer and not claim.raced:
                    for task in claim.tasks:
                        if task is not current:
                            task.cancel()  # a stalled stream of a dropped source would hold its chunk
        self._wake()

    def _fail(self, blob: PartialBlob) -> None:
        if not blob.done.done():
            why = "; ".join(f"{url}: {err}" for url, err in blob.errors.items()) or "no source left"
            blob.done.set_exception(PullError(f"cannot get {blob.digest}: {why}"))
            self._resolved()  # resolved, badly: the workers need not wait for it



def _stalled(exc: BaseException | None) -> bool:
    """Whether a failure was a read timeout (no byte for the stall timeout), through the wrapping errors."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, TimeoutError):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


