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
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dao.aio import backoff
from dao.oci.digest import Digest
from dao.oci.manifest import Descriptor
from dao.paths import cache_dir
from dao.pull.plan import PullError
from dao.pull.route import Peer, can_serve, pick
from dao.registry.download import Runs, first_error, skipping
from dao.registry.errors import RegistryClientError, UpstreamNotFound, UpstreamUnavailable

log = logging.getLogger(__name__)

MiB = 1024 * 1024
HASH_CHUNK = 4 * MiB
SAVE_EVERY = 0.5  # seconds between saves of a partial blob's written runs
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
VERIFY_ROUNDS = 3  # full re-fetches of one blob before the pull gives up on it
UNDO_MAX = 64 * MiB  # differing bytes kept to put back when a comparison proves nothing


def default_cache_dir() -> Path:
    return cache_dir()


@dataclass(slots=True)
class Stats:
    bytes_by_source: dict[str, int] = field(default_factory=dict)
    cached_bytes: int = 0
    reissued: int = 0  # chunks raced by a second source
    split: int = 0  # running chunks halved for an idle connection
    started: float = field(default_factory=time.monotonic)

    def count(self, url: str, n: int) -> None:
        self.bytes_by_source[url] = self.bytes_by_source.get(url, 0) + n


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
        if final.exists() and await asyncio.to_thread(_hash_file, final, blob.digest) == blob.digest:
            await asyncio.to_thread(os.utime, final)  # last use, for pruning
            return final
        return None


# Bytes of the blob now in hand (it can go down when bad bytes are dropped) and where the latest came from
# (a source's URL; "cache" for the local content cache).
Progress = Callable[[int, str], None]


@dataclass(eq=False)
class _Claim:
    """A byte range [start, end) being fetched; ``pos``: the first byte of it nobody has written yet."""

    blob: _Blob
    start: int
    end: int
    peer: Peer  # who it was first given to
    pos: int = 0
    started: float = field(default_factory=time.monotonic)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    raced: bool = False

    def __post_init__(self) -> None:
        self.pos = self.start

    def rate(self, now: float) -> float:
        return (self.pos - self.start) / max(now - self.started, 1e-3)


class _Blob:
    """One blob being fetched: its partial file, the runs written, who wrote which, and the running claims."""

    def __init__(
        self, desc: Descriptor, order: int, cache: BlobCache, lock: int, have: Runs, progress: Progress
    ) -> None:
        self.order = order  # its place in the image: earlier layers are fetched first
        self.digest = desc.digest
        self.size = desc.size
        self.partial = cache.partial / desc.digest.encoded
        self.runs_file = self.partial.with_suffix(".runs")
        self.final = cache.path(desc.digest)
        self.lock = lock
        self.fd = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o644)
        self.have = have
        self.pieces: list[tuple[int, int, Peer | None]] = [(a, b, None) for a, b in have.runs]  # None: earlier run
        self.claims: list[_Claim] = []
        self.progress = progress
        self.checking = False  # hashing or repairing: no new claims
        self.rounds = 0
        self.errors: dict[str, str] = {}
        self.done: asyncio.Future[Path] = asyncio.get_running_loop().create_future()
        self._saved = time.monotonic()
        progress(have.covered(), "cache")

    def unclaimed(self) -> list[tuple[int, int]]:
        taken = Runs([(a, b) for a, b in self.have.runs])
        for claim in self.claims:
            if claim.pos < claim.end:
                taken.add(claim.pos, claim.end)
        return taken.holes(0, self.size)

    def wrote(self, start: int, data: memoryview, peer: Peer) -> None:
        done = 0
        while done < len(data):  # page-cache writes: microseconds, not worth a thread hop per chunk
            done += os.pwrite(self.fd, data[done:], start + done)
        end = start + len(data)
        self.have.add(start, end)
        last = self.pieces[-1] if self.pieces else None
        if last is not None and last[1] == start and last[2] is peer:
            self.pieces[-1] = (last[0], end, peer)
        else:
            self.pieces.append((start, end, peer))
        self.progress(self.have.covered(), peer.url)
        if time.monotonic() - self._saved >= SAVE_EVERY:
            self.save()

    def complete(self) -> bool:
        return self.have.covered() >= self.size

    def forget(self, peer: Peer | None) -> None:
        """Drop every byte ``peer`` wrote: they will be fetched again."""
        keep = [(a, b, p) for a, b, p in self.pieces if p is not peer]
        self.pieces = keep
        self.have = Runs([(a, b) for a, b, _ in keep])
        self.progress(self.have.covered(), "")
        self.save()

    def reset(self) -> None:
        self.pieces = []
        self.have = Runs()
        self.progress(0, "")
        self.save()

    def runs_of(self, peer: Peer | None) -> list[tuple[int, int]]:
        return Runs([(a, b) for a, b, p in self.pieces if p is peer]).runs  # type: ignore[return-value]

    def save(self) -> None:
        tmp = self.runs_file.with_suffix(".runs-tmp")
        tmp.write_text(json.dumps({"size": self.size, "runs": self.have.runs}))
        os.replace(tmp, self.runs_file)
        self._saved = time.monotonic()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        os.close(self.lock)


class _RangeIgnored(Exception):
    pass


class Fetcher:
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
        self._blobs: list[_Blob] = []
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
        mine: list[_Blob] = []
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
                        have = await asyncio.to_thread(_load_runs, partial, partial.with_suffix(".runs"), desc.size)
                        self.stats.cached_bytes += have.covered()  # resumed: an earlier run's bytes are local
                        blob = _Blob(desc, order, self.cache, lock, have, progress(desc))
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

    def _next(self) -> tuple[Peer, _Claim, int] | None:
        """The next chunk and its source, or a slow running chunk to race; None when there is nothing to do."""
        remaining = 0
        candidates: list[tuple[_Blob, list[tuple[int, int]]]] = []
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
            claim = _Claim(blob, start, end, peer)
            blob.claims.append(claim)
            peer.active += 1  # now: the next pick in this same loop turn must see it
            return peer, claim, start
        return self._reissue() or self._split()

    def _chunk_size(self, peer: Peer, remaining: int) -> int:
        target = peer.rate * CHUNK_SECONDS if peer.rate else FIRST_CHUNK
        fair = remaining // self.connections  # near the end: a share of what is left, so all finish together
        return int(max(CHUNK_MIN, min(CHUNK_MAX, target, max(fair, CHUNK_MIN))))

    def _reissue(self) -> tuple[Peer, _Claim, int] | None:
        """The running chunk that would finish last, raced by a source measured much faster than it goes."""
        now = time.monotonic()
        best: tuple[float, Peer, _Claim] | None = None
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

    def _split(self) -> tuple[Peer, _Claim, int] | None:
        """Nothing left to hand out and no faster source to race with: the running chunk with the most left
        gives its second half to this idle connection (the same source is welcome), so no connection idles
        while another still has seconds of work. The first request stops at the new boundary."""
        now = time.monotonic()
        best: tuple[int, _Claim] | None = None
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
        second = _Claim(claim.blob, middle, claim.end, peer)
        claim.end = middle
        claim.blob.claims.append(second)
        peer.active += 1
        self.stats.split += 1
        log.info("splitting %s at byte %d for %s", claim.blob.digest, middle, peer.url)
        return peer, second, middle

    # -- one request ---------------------------------------------------------------------------------------

    async def _race(self, peer: Peer, claim: _Claim, cursor: int) -> None:
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

    def _release(self, claim: _Claim, racer: asyncio.Task[None] | None = None) -> None:
        """This racer is out; with no other racer the chunk's unwritten rest is free for anyone."""
        claim.tasks.discard(racer or asyncio.current_task())  # type: ignore[arg-type]
        if not claim.tasks and claim in claim.blob.claims:
            claim.blob.claims.remove(claim)

    def _finish(self, claim: _Claim) -> None:
        blob = claim.blob
        if claim in blob.claims:
            blob.claims.remove(claim)
        current = asyncio.current_task()
        for task in claim.tasks:
            if task is not current:
                task.cancel()  # the slower racer
        if blob.complete() and not blob.checking and not blob.done.done():
            self._check_soon(blob)

    async def _failed(self, peer: Peer, blob: _Blob, exc: BaseException, got: int) -> None:
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

    def _fail(self, blob: _Blob) -> None:
        if not blob.done.done():
            why = "; ".join(f"{url}: {err}" for url, err in blob.errors.items()) or "no source left"
            blob.done.set_exception(PullError(f"cannot get {blob.digest}: {why}"))
            self._resolved()  # resolved, badly: the workers need not wait for it

    # -- verification --------------------------------------------------------------------------------------

    def _check_soon(self, blob: _Blob) -> None:
        blob.checking = True
        task = asyncio.get_running_loop().create_task(self._check(blob))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _check(self, blob: _Blob) -> None:
        try:
            actual = await asyncio.to_thread(_sync_and_hash, blob.fd, blob.digest)
            if actual != blob.digest:
                actual = await self._repair(blob, actual)
                if not blob.complete():
                    return  # a known liar's bytes were dropped: the workers fetch them again
            if actual == blob.digest:
                os.close(blob.fd)
                blob.fd = -1
                os.replace(blob.partial, blob.final)
                blob.runs_file.unlink(missing_ok=True)
                blob.done.set_result(blob.final)
                for peer in {p for _, _, p in blob.pieces if p is not None}:
                    peer.proven += 1
                log.debug("%s verified", blob.digest.encoded[:12])
                self._resolved()
                return
            blob.rounds += 1
            if blob.rounds >= VERIFY_ROUNDS:
                blob.errors["verify"] = f"the bytes hash to {actual}, not {blob.digest}, {blob.rounds} times"
                self._fail(blob)
                return
            self.warn(f"{blob.digest}: the bytes hash to {actual}; fetching it again")
            blob.reset()
        except Exception as exc:  # whatever broke, the pull must hear of it, not hang
            if not blob.done.done():
                blob.done.set_exception(exc)
                self._resolved()
        finally:
            blob.checking = False
            self._wake()

    async def _repair(self, blob: _Blob, actual: Digest) -> Digest:
        """Find who sent the bad bytes: each source's runs fetched again from another source and compared.

        Differing bytes only say that one of the two lies, so the blame goes to the writer only when its bytes
        replaced by the checker's make the digest right; otherwise ours go back and the search goes on. One
        repair at a time, so each knows who the ones before caught."""
        async with self._repairing:
            writers = list(dict.fromkeys(p for _, _, p in blob.pieces))
            liars = [p for p in writers if p is not None and p.lied]
            for peer in liars:  # already caught lying elsewhere: just drop what they wrote
                blob.forget(peer)
            if liars:
                return actual
            # The least proven first: an earlier run's bytes, then sources by blobs verified, then bytes written.
            writers.sort(key=lambda p: (p is not None, p.proven if p else 0, sum(b - a for a, b in blob.runs_of(p))))
            for writer in writers:
                runs = blob.runs_of(writer)
                for checker in self._checkers(blob, writer):
                    try:
                        undo = await self._compare(blob, runs, checker)
                    except (RegistryClientError, TimeoutError) as exc:
                        log.info("could not check %s against %s: %s", blob.digest, checker.url, exc)
                        continue
                    if not undo:
                        break  # the same bytes: this writer is not the one
                    actual = await asyncio.to_thread(_sync_and_hash, blob.fd, blob.digest)
                    where = _where([(pos, pos + len(data)) for pos, data in undo])
                    if actual == blob.digest:
                        self._blame(blob, writer, checker, where, undo)
                        return actual
                    for pos, data in undo:  # inconclusive: maybe the checker lies; our bytes go back
                        os.pwrite(blob.fd, data, pos)
                    log.info(
                        "%s: bytes %s differ between %s and %s; no proof yet",
                        blob.digest,
                        where,
                        writer.url if writer else "the partial file",
                        checker.url,
                    )
            return actual

    def _blame(
        self, blob: _Blob, writer: Peer | None, checker: Peer, where: str, undo: list[tuple[int, bytes]]
    ) -> None:
        if writer is not None:
            why = f"{writer.url} sent corrupt bytes for {blob.digest} (bytes {where} differ from {checker.url}'s)"
            self._drop(writer, f"{why}; not using it again", lied=True)
        else:
            self.warn(f"the partial download of {blob.digest} had bad bytes ({where}); replaced them")
        for pos, data in undo:  # those bytes are the checker's now
            start, end = pos, pos + len(data)
            blob.pieces = [
                piece
                for a, b, p in blob.pieces
                for piece in ((a, min(b, start), p), (max(a, end), b, p))
                if piece[0] < piece[1]
            ] + [(start, end, checker)]

    def _checkers(self, blob: _Blob, writer: Peer | None) -> list[Peer]:
        """Who to compare ``writer``'s bytes with: other live sources, those whose bytes verified first, then
        mirrors, fastest first."""
        usable = [p for p in self.peers if p is not writer and p.out is None and blob.digest not in p.missing]
        return sorted(usable, key=lambda p: (-p.proven, not p.source.mirror, -(p.rate or 0.0), p.rank))

    async def _compare(self, blob: _Blob, runs: list[tuple[int, int]], checker: Peer) -> list[tuple[int, bytes]]:
        """Fetch ``runs`` from ``checker`` (in chunks, several at once); where its bytes differ, they replace
        ours. Returns what they replaced (offset, our bytes), to put back if that proves nothing."""
        source = checker.source.client.blob_source(self._repo, blob.digest)
        undo: list[tuple[int, bytes]] = []
        kept = 0
        pieces = [(a, min(a + FIRST_CHUNK, end)) for start, end in runs for a in range(start, end, FIRST_CHUNK)]
        gate = asyncio.Semaphore(self.per_source)

        async def one(start: int, end: int) -> None:
            nonlocal kept
            pos = start
            async with gate, source.open(start, None if (start, end) == (0, blob.size) else end - 1) as body:
                if body.offset != start:
                    raise UpstreamUnavailable(f"answered from byte {body.offset}, wanted {start}")
                async for chunk in body.chunks():
                    theirs = memoryview(chunk)[: end - pos]
                    self.stats.count(checker.url, len(theirs))
                    ours = os.pread(blob.fd, len(theirs), pos)
                    if ours != theirs:
                        kept += len(ours)
                        if kept > UNDO_MAX:
                            raise UpstreamUnavailable(f"more than {UNDO_MAX} bytes differ: not a bad chunk")
                        os.pwrite(blob.fd, theirs, pos)
                        undo.append((pos, ours))
                    pos += len(theirs)
                    if pos >= end:
                        break
            if pos < end:
                raise UpstreamUnavailable(f"body ended at byte {pos}, wanted {end}")

        checker.active += 1
        try:
            async with asyncio.TaskGroup() as group:
                for start, end in pieces:
                    group.create_task(one(start, end))
        except BaseExceptionGroup as eg:
            for pos, data in undo:
                os.pwrite(blob.fd, data, pos)
            raise first_error(eg) from None
        finally:
            checker.active -= 1
        return sorted(undo)


def _stalled(exc: BaseException | None) -> bool:
    """Whether a failure was a read timeout (no byte for the stall timeout), through the wrapping errors."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, TimeoutError):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _where(runs: list[tuple[int, int]]) -> str:
    merged = Runs(runs).runs
    return ", ".join(f"{a}-{b - 1}" for a, b in merged[:3]) + (" ..." if len(merged) > 3 else "")


def _sync_and_hash(fd: int, want: Digest) -> Digest:
    os.fsync(fd)
    h = hashlib.new(want.algorithm)
    pos = 0
    while chunk := os.pread(fd, HASH_CHUNK, pos):
        h.update(chunk)
        pos += len(chunk)
    return Digest(want.algorithm, h.hexdigest())


def _hash_file(path: Path, want: Digest) -> Digest:
    h = hashlib.new(want.algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return Digest(want.algorithm, h.hexdigest())
