"""Single-flight upstream fetches that many clients read while they grow.

The first request for a missing blob starts one :class:`Fetch`; every concurrent request for the same digest
joins it. The fetch writes the upstream bytes into a spool file and hashes them as they pass (parallel
ranges that land ahead are hashed from the file, in a thread, once the gap before them fills); readers
``pread`` the same file descriptor as far as it has been written. Only when the digest checks is the file
committed to the store. On any failure the spool file is removed, every reader's stream raises
:class:`FetchFailed` (so the handler can break the connection rather than end a short body cleanly), and
the fetch leaves the map so the next request starts afresh.

A reader whose range reaches the end of the blob is held one byte short until the digest is verified: no
client ever receives a complete, well-terminated response carrying bytes we have not checked.

Work per client is bounded: a new fetch takes a slot of :class:`FetchGate` (``max_fetches`` at once, and
``per_client`` started by one client address), waiting up to ``queue_timeout`` for one (:class:`FetchQueueFull`
then: our own queue, not an upstream failure). A fetch nobody reads any more stops after ``ORPHAN_GRACE``
seconds unless at least ``ORPHAN_KEEP`` of it is in (then finishing costs less than fetching again).
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

from dao.config import MirrorConfig
from dao.mirror.storage.base import BlobIngester, Origin
from dao.oci.digest import Digest, Verifier
from dao.registry.errors import RegistryClientError, UpstreamUnavailable
from dao.registry.runs import Runs
from dao.transfer.download import Download, upstream_policy
from dao.transfer.schedule import Policy
from dao.transfer.sources import BlobSource, Peer

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
Span = tuple[int, int]
HASH_CHUNK = 4 * 1024 * 1024
ORPHAN_GRACE = 10.0  # seconds a fetch with no reader runs on (a client retrying its pull joins it again)
ORPHAN_KEEP = 0.5  # an orphan fetch that has this share of the blob is finished for the cache


def _hash_into(verifier: Verifier, fd: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        chunk = os.pread(fd, min(HASH_CHUNK, end - pos), pos)
        if not chunk:
            return
        verifier.update(chunk)
        pos += len(chunk)


class FetchQueueFull(Exception):
    """No fetch slot came free in time: the mirror is busy (or this client asks for too much at once)."""


class FetchGate:
    """Slots for upstream fetches: ``max_fetches`` at once, ``per_client`` of them started by one address."""

    def __init__(
        self,
        max_fetches: int = MirrorConfig.max_fetches,
        per_client: int = MirrorConfig.max_fetches_per_client,
        queue_timeout: float = 30.0,
    ) -> None:
        self.max_fetches, self.per_client, self.queue_timeout = max_fetches, per_client, queue_timeout
        self.running = 0
        self._by_client: dict[str, int] = {}
        self._freed = asyncio.Event()

    async def acquire(self, client: str) -> None:
        """Raises :class:`FetchQueueFull` after ``queue_timeout`` seconds without a slot."""
        try:
            async with asyncio.timeout(self.queue_timeout):
                while self.running >= self.max_fetches or self._by_client.get(client, 0) >= self.per_client:
                    await self._freed.wait()
        except TimeoutError:
            mine = self._by_client.get(client, 0)
            who = f"{mine} for {client}" if mine >= self.per_client else f"{self.running} in all"
            raise FetchQueueFull(f"too many upstream fetches at once ({who}); try again shortly") from None
        self.running += 1
        self._by_client[client] = self._by_client.get(client, 0) + 1

    def release(self, client: str) -> None:
        self.running -= 1
        left = self._by_client.get(client, 0) - 1
        if left > 0:
            self._by_client[client] = left
        else:
            self._by_client.pop(client, None)
        self._freed.set()  # every waiter looks again; a new event for the next wait
        self._freed = asyncio.Event()


class FetchFailed(Exception):
    """The upstream transfer behind a stream failed; the stream is incomplete and must not look complete."""


class Fetch:
    """One upstream transfer of one blob into a spool file. Created only through :class:`Inflight`.

    The bytes may land out of order (parallel ranges, see :mod:`dao.transfer.download`); ``_filled`` keeps the
    written byte runs, and a reader at ``pos`` may send up to the end of the run that holds ``pos``.
    """

    def __init__(
        self,
        digest: Digest,
        store: BlobIngester,
        policy: Policy,
        on_bytes: Callable[[int], None] | None = None,
        commit: Callable[[Digest, Path], Awaitable[None]] | None = None,
        kind: str = "upstream",
    ) -> None:
        """``commit``: where the verified file goes (the store's ``commit`` by default); ``kind``: where the
        bytes come from ("upstream", "bucket", "node")."""
        self.digest = digest
        self.kind = kind
        self.commit = commit or store.commit
        self.on_bytes = on_bytes
        self.store = store
        self.policy = policy
        fd, name = tempfile.mkstemp(dir=store.spool_dir(), prefix=f"{digest.encoded[:16]}-")
        self.fd = fd
        self.path = Path(name)
        self.size: int | None = None
        self.done = False
        self.error: BaseException | None = None
        self.headers_ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.download: Download | None = None
        self._filled = Runs()
        self._verifier = Verifier(digest)
        self._progress = asyncio.Event()
        self._readers = 0
        self._generation = 0  # raised when bytes readers may have sent were replaced
        self.keep = False  # finished even with nobody reading (a prefetch: its reader comes later)
        self._follower: asyncio.Task[None] | None = None
        self._hashing = False  # a thread hashes the prefix from the file
        self._final = False  # the follower stops
        self._closed = False
        self.task: asyncio.Task[None] | None = None
        self.origin: Origin | None = None  # the (registry, repository) it is fetched for

    # -- writer side ---------------------------------------------------------------------------------------

    async def run(self, source: BlobSource | Sequence[Peer]) -> None:
        """``source``: one upstream, or several sources (the local accelerator's) that the download itself
        verifies and blames."""
        self._follower = asyncio.get_running_loop().create_task(self._follow(), name=f"hash {self.digest}")
        try:
            self.download = Download(source, self.fd, self, self.policy, digest=self.digest, hasher=self._hashed)
            size = await self.download.run()
            if self.size is not None and size != self.size:
                raise UpstreamUnavailable(f"upstream sent {size} of {self.size} bytes for {self.digest}")
            self.size = size
            if not self.download.verified:
                actual = await self._hashed()
                if actual != self.digest:
                    raise UpstreamUnavailable(f"digest mismatch for {self.digest}: upstream sent {actual}")
            await asyncio.to_thread(os.fsync, self.fd)
            await self.commit(self.digest, self.path)
            self.done = True
        except BaseException as exc:
            self.error = exc
            if not self.headers_ready.done():
                self.headers_ready.set_exception(exc)
                self.headers_ready.exception()  # mark retrieved: the joiners that care re-raise it themselves
            self.path.unlink(missing_ok=True)
            if isinstance(exc, RegistryClientError):
                log.warning("fetch of %s failed: %s", self.digest, exc)
            elif not isinstance(exc, asyncio.CancelledError):
                log.exception("fetch of %s failed", self.digest)
            if not isinstance(exc, Exception):
                raise
        finally:
            await self._stop_following()
            self._notify()
            self._maybe_close()

    def on_size(self, size: int | None) -> None:
        self.size = size
        if not self.headers_ready.done():
            self.headers_ready.set_result(None)

    def on_lost(self, covered: int) -> None:
        """The download replaced or dropped bytes (a source was caught lying, or the blob starts again):
        whatever a reader sent may be wrong, so every reader is cut (its client asks again, and reads the
        repaired file); what is in hand is the download's account of it."""
        assert self.download is not None
        self._filled = Runs(list(self.download.job.have.runs))
        self._verifier = Verifier(self.digest)
        self._generation += 1
        log.warning("fetch of %s: bytes were replaced; cutting its %d readers", self.digest, self._readers)
        self._notify()

    def on_data(self, offset: int, data: memoryview, url: str = "") -> None:
        if offset == self._verifier.size and not self._hashing:
            self._verifier.update(data)  # the bytes that extend the prefix hash as they come
        self._filled.add(offset, offset + len(data))
        if self.on_bytes is not None:
            self.on_bytes(len(data))
        self._notify()

    async def _follow(self) -> None:
        """Hash the prefix as it grows where parallel ranges fill a gap before it (from the page cache, in a
        thread): at the end little is left to hash, and the last byte waits for that only. While a thread
        hashes, :meth:`on_data` leaves the hash alone (one writer of it at a time)."""
        while not self._final:
            verifier = self._verifier
            end = self._filled.end_of(verifier.size)
            if end <= verifier.size:
                await self._progress.wait()
                continue
            self._hashing = True
            try:
                await asyncio.to_thread(
                    _hash_into, verifier, self.fd, verifier.size, min(end, verifier.size + HASH_CHUNK)
                )
            finally:
                self._hashing = False

    async def _stop_following(self) -> None:
        """The follower's thread finishes what it hashes (a thread cannot be stopped halfway)."""
        self._final = True
        self._notify()
        if self._follower is not None:
            await asyncio.gather(self._follower, return_exceptions=True)

    async def _hashed(self) -> Digest:
        """The complete file's digest: what came in order (or followed a gap) was hashed as it came."""
        await self._stop_following()
        await asyncio.to_thread(self._hash_rest)
        return self._verifier.actual()

    def _hash_rest(self) -> None:
        """Hash what is left, from the spool file (runs in a thread, nothing else writes)."""
        assert self.size is not None
        _hash_into(self._verifier, self.fd, self._verifier.size, self.size)
        if self._verifier.size < self.size:
            raise UpstreamUnavailable(f"spool file of {self.digest} shorter than its {self.size} bytes")

    def _notify(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    def _maybe_close(self) -> None:
        if not self._closed and self._readers == 0 and (self.done or self.error is not None):
            self._closed = True
            os.close(self.fd)

    # -- reader side ---------------------------------------------------------------------------------------

    def acquire(self) -> None:
        """Count a reader; call in the same step as finding the fetch, before any await.

        The shared descriptor is closed only when the fetch has ended and no reader holds it: a reader that
        registered late could otherwise ``pread`` a closed (or reused) descriptor.
        """
        if self._closed:
            raise FetchFailed(f"fetch of {self.digest} already closed")
        self._readers += 1

    def release(self) -> None:
        self._readers -= 1
        self._maybe_close()
        if self._readers == 0 and not self.done and self.error is None and self.task is not None:
            asyncio.get_running_loop().call_later(ORPHAN_GRACE, self._stop_if_orphaned)

    def _stop_if_orphaned(self) -> None:
        """Nobody reads this fetch any more: stop it, unless enough is in that the cache had better have it."""
        if self._readers or self.done or self.error is not None or self.task is None or self.task.done():
            return
        if self.keep:
            return
        if self.size and self._filled.covered() >= ORPHAN_KEEP * self.size:
            return
        log.info("fetch of %s stopped: no client waits for it", self.digest)
        self.task.cancel()

    async def stream(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Bytes ``start`` .. ``end`` (inclusive; None = to the end of the blob) as they arrive.

        The caller holds a reader registration (:meth:`acquire`) for as long as it iterates. Raises
        :class:`FetchFailed` if the fetch fails before the range is delivered.
        """
        async for pos, stop in self.spans(start, end, most=READ_CHUNK):
            chunk = os.pread(self.fd, stop - pos, pos)
            if len(chunk) < stop - pos:
                raise FetchFailed(f"spool file of {self.digest} shorter than written")
            yield chunk

    async def spans(self, start: int = 0, end: int | None = None, most: int = READ_CHUNK) -> AsyncIterator[Span]:
        """What :meth:`stream` would send, as byte runs ``(pos, stop)`` of the spool file (at most ``most``
        bytes each), for a caller that sends them from the file itself (``sendfile``). Each run is sendable
        when it is yielded; the next one is looked at only after the caller is done with it, so a reader
        cut because bytes were replaced has sent at most one run of them."""
        pos = start
        generation = self._generation
        while True:
            if self._generation != generation:
                raise FetchFailed(f"bytes of {self.digest} were replaced after a bad source was found")
            stop = min(self._readable_until(pos, end), pos + most)
            if pos < stop:
                yield pos, stop
                pos = stop
                continue
            if self.error is not None:
                raise FetchFailed(str(self.error) or self.error.__class__.__name__)
            last = end if end is not None else (self.size - 1 if self.size is not None else None)
            if last is not None and pos > last:
                return  # the whole range is out; its last byte was held back if it ended the blob
            if self.done:  # size is known once done, so ``last`` is too: the range ran past the blob
                raise FetchFailed(f"range beyond the end of {self.digest}")
            if self.download is not None and pos > 0:
                self.download.want(pos)  # nobody may be fetching this part yet
            await self._progress.wait()

    def _readable_until(self, pos: int, end: int | None) -> int:
        """Exclusive bound of what a reader at ``pos`` may send now."""
        limit = self._filled.end_of(pos)
        if not self.done and self.size is not None and (end is None or end >= self.size - 1):
            limit = min(limit, self.size - 1)  # the blob's last byte waits for the digest
        if end is not None:
            limit = min(limit, end + 1)
        return limit


class Inflight:
    """The digest -> running fetch map, one per store; every reader follows the one fetch."""

    def __init__(
        self,
        store: BlobIngester,
        policy: Policy | None = None,
        gate: FetchGate | None = None,
        on_end: Callable[[Digest], Awaitable[None]] | None = None,
    ) -> None:
        """``on_end``: told when a fetch has left the map (the cluster drops its lease)."""
        self.store = store
        self.policy = policy or upstream_policy()
        self.gate = gate or FetchGate()
        self.on_end = on_end
        self._fetches: dict[Digest, Fetch] = {}

    def get(self, digest: Digest) -> Fetch | None:
        return self._fetches.get(digest)

    async def join_or_start(
        self,
        digest: Digest,
        source: BlobSource | Sequence[Peer],
        on_bytes: Callable[[int], None] | None = None,
        client: str = "",
        *,
        commit: Callable[[Digest, Path], Awaitable[None]] | None = None,
        kind: str = "upstream",
        policy: Policy | None = None,
    ) -> tuple[Fetch, bool]:
        """The fetch for ``digest``, already acquired for the caller, and whether this call started it.

        Joining never waits; starting waits for a slot of the gate (raises :class:`FetchQueueFull`). The
        caller must :meth:`~Fetch.release` the fetch. ``commit``, ``kind``, ``policy``: see :class:`Fetch`.
        """
        fetch = self._fetches.get(digest)
        if fetch is not None:
            fetch.acquire()
            return fetch, False
        await self.gate.acquire(client)
        fetch = self._fetches.get(digest)  # another request may have started it while we waited
        if fetch is not None:
            self.gate.release(client)
            fetch.acquire()
            return fetch, False
        try:
            fetch = Fetch(digest, self.store, policy or self.policy, on_bytes, commit, kind)
        except BaseException:
            self.gate.release(client)
            raise
        fetch.acquire()
        self._fetches[digest] = fetch

        async def run() -> None:
            try:
                await fetch.run(source)
            finally:
                self._fetches.pop(digest, None)
                self.gate.release(client)
                if self.on_end is not None:
                    await self.on_end(digest)

        # The task belongs to the map, not to the request that started it: the cache fills even if that
        # client goes away (for a while: see Fetch.release).
        fetch.task = asyncio.get_running_loop().create_task(run(), name=f"fetch {digest}")
        return fetch, True

    def __len__(self) -> int:
        return len(self._fetches)

    async def aclose(self) -> None:
        tasks = [f.task for f in self._fetches.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
