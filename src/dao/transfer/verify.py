"""Verification and blame: a blob whose digest does not check is repaired by comparing its runs, source by
source, against other sources, so the bytes that were wrong are traced to whoever sent them and only those
are fetched again. Without a second source (or when that finds nothing), the blob is fetched again from
scratch, at most ``VERIFY_ROUNDS`` times. A mixin of :class:`~dao.transfer.fetch.Transfer`: it works on the
transfer's sources and jobs (those with ``verify``)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from dao.aio import first_error
from dao.oci.digest import Digest
from dao.registry.errors import RegistryClientError, UpstreamUnavailable
from dao.registry.runs import Runs
from dao.transfer.job import Job
from dao.transfer.sources import Peer

if TYPE_CHECKING:
    from dao.transfer.schedule import Policy, Stats

log = logging.getLogger("dao.transfer")

VERIFY_ROUNDS = 3  # full re-fetches of one blob before the pull gives up on it
UNDO_MAX = 64 * 1024 * 1024  # differing bytes kept to put back when a comparison proves nothing
COMPARE_CHUNK = 4 * 1024 * 1024  # a comparison fetches in pieces of an unmeasured source's first chunk
HASH_CHUNK = 4 * 1024 * 1024


def sync_and_hash(fd: int, want: Digest) -> Digest:
    os.fsync(fd)
    h = hashlib.new(want.algorithm)
    pos = 0
    while chunk := os.pread(fd, HASH_CHUNK, pos):
        h.update(chunk)
        pos += len(chunk)
    return Digest(want.algorithm, h.hexdigest())


class Verification:
    peers: list[Peer]
    policy: Policy
    stats: Stats
    warn: Callable[[str], None]
    _checks: set[asyncio.Task[None]]
    _repairing: asyncio.Lock

    def _drop(self, peer: Peer, why: str, *, lied: bool = False) -> None: ...
    def _fail(self, job: Job) -> None: ...
    def _resolved(self) -> None: ...
    def _wake(self) -> None: ...

    def _check_soon(self, blob: Job) -> None:
        blob.checking = True
        task = asyncio.get_running_loop().create_task(self._check(blob))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _check(self, blob: Job) -> None:
        try:
            if blob.hasher is not None:
                actual = await blob.hasher()
            else:
                actual = await asyncio.to_thread(sync_and_hash, blob.fd, blob.digest)
            if actual != blob.digest:
                actual = await self._repair(blob, actual)
                if not blob.complete():
                    return  # a known liar's bytes were dropped: the workers fetch them again
            if actual == blob.digest:
                blob.commit()
                blob.done.set_result(None)
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

    async def _repair(self, blob: Job, actual: Digest) -> Digest:
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
                    actual = await asyncio.to_thread(sync_and_hash, blob.fd, blob.digest)
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

    def _blame(self, blob: Job, writer: Peer | None, checker: Peer, where: str, undo: list[tuple[int, bytes]]) -> None:
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
        blob.listener.on_lost(blob.have.covered())  # bytes it already passed on may be among those replaced

    def _checkers(self, blob: Job, writer: Peer | None) -> list[Peer]:
        """Who to compare ``writer``'s bytes with: other live sources, those whose bytes verified first, then
        mirrors, fastest first."""
        usable = [p for p in self.peers if p is not writer and p.out is None and blob.digest not in p.missing]
        return sorted(usable, key=lambda p: (-p.proven, not p.mirror, -(p.rate or 0.0), p.rank))

    async def _compare(self, blob: Job, runs: list[tuple[int, int]], checker: Peer) -> list[tuple[int, bytes]]:
        """Fetch ``runs`` from ``checker`` (in chunks, several at once); where its bytes differ, they replace
        ours. Returns what they replaced (offset, our bytes), to put back if that proves nothing."""
        source = checker.blob(blob)
        undo: list[tuple[int, bytes]] = []
        kept = 0
        pieces = [(a, min(a + COMPARE_CHUNK, end)) for start, end in runs for a in range(start, end, COMPARE_CHUNK)]
        gate = asyncio.Semaphore(self.policy.per_source)

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


def _where(runs: list[tuple[int, int]]) -> str:
    merged = Runs(runs).runs
    return ", ".join(f"{a}-{b - 1}" for a, b in merged[:3]) + (" ..." if len(merged) > 3 else "")
