"""Verification and blame for dao pull: a blob whose digest does not check is repaired by comparing its runs,
source by source, against other sources, so the bytes that were wrong are traced to whoever sent them and
only those are fetched again. A mixin of :class:`~dao.pull.fetch.Fetcher`: it works on the fetcher's peers
and blobs."""

from __future__ import annotations

import asyncio
import logging
import os

from dao.aio import first_error
from dao.oci.digest import Digest
from dao.pull.cache import sync_and_hash
from dao.pull.partial import PartialBlob
from dao.pull.route import Peer
from dao.registry.errors import RegistryClientError, UpstreamUnavailable
from dao.registry.runs import Runs

log = logging.getLogger("dao.pull.fetch")

VERIFY_ROUNDS = 3  # full re-fetches of one blob before the pull gives up on it
UNDO_MAX = 64 * 1024 * 1024  # differing bytes kept to put back when a comparison proves nothing
COMPARE_CHUNK = 4 * 1024 * 1024  # a comparison fetches in pieces of an unmeasured source's first chunk


class Verification:

    def _check_soon(self, blob: PartialBlob) -> None:
        blob.checking = True
        task = asyncio.get_running_loop().create_task(self._check(blob))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _check(self, blob: PartialBlob) -> None:
        try:
            actual = await asyncio.to_thread(sync_and_hash, blob.fd, blob.digest)
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

    async def _repair(self, blob: PartialBlob, actual: Digest) -> Digest:
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

    def _blame(
        self, blob: PartialBlob, writer: Peer | None, checker: Peer, where: str, undo: list[tuple[int, bytes]]
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

    def _checkers(self, blob: PartialBlob, writer: Peer | None) -> list[Peer]:
        """Who to compare ``writer``'s bytes with: other live sources, those whose bytes verified first, then
        mirrors, fastest first."""
        usable = [p for p in self.peers if p is not writer and p.out is None and blob.digest not in p.missing]
        return sorted(usable, key=lambda p: (-p.proven, not p.source.mirror, -(p.rate or 0.0), p.rank))

    async def _compare(self, blob: PartialBlob, runs: list[tuple[int, int]], checker: Peer) -> list[tuple[int, bytes]]:
        """Fetch ``runs`` from ``checker`` (in chunks, several at once); where its bytes differ, they replace
        ours. Returns what they replaced (offset, our bytes), to put back if that proves nothing."""
        source = checker.source.client.blob_source(self._repo, blob.digest)
        undo: list[tuple[int, bytes]] = []
        kept = 0
        pieces = [(a, min(a + COMPARE_CHUNK, end)) for start, end in runs for a in range(start, end, COMPARE_CHUNK)]
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


def _where(runs: list[tuple[int, int]]) -> str:
    merged = Runs(runs).runs
    return ", ".join(f"{a}-{b - 1}" for a, b in merged[:3]) + (" ..." if len(merged) > 3 else "")
