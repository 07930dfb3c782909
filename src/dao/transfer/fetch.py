"""The one downloader: jobs (blobs going into files) fetched over many connections from many sources.

Used by ``dao pull`` (all of a pull's blobs, from its mirrors and the registry) and by the mirror's in-flight
fetch (one blob from its upstream; see :mod:`.download`). What each free connection does next is the
:class:`~.schedule.Scheduler`'s decision; this module does the requests and what their outcomes mean.

- **One request**: a chunk that is a whole blob is a plain ``GET`` (what ``docker pull`` sends); others are
  ``Range`` requests asking for exactly the bytes they will keep. An answer that carries more than was asked
  (``Range`` ignored: a whole ``200``) is read on as far as nobody else has those bytes, so none is fetched
  twice; its source gets only whole blobs from then on. A ``4xx`` to a ``Range`` from a source not yet known
  to honour one is taken as "no ranges here": the blob is asked for again without ``Range``.
- **Failures**: a mirror that errors, answers 429/5xx or stalls is dropped for the rest of the transfer and
  its chunks go back to the pool; a 404 only rules it out for that blob. The last source that can serve a
  blob is retried with backoff until ``resume_attempts`` requests in a row brought no byte. With
  ``first_final`` (the mirror), a failed first request is the answer, passed on as it is.
- **How many connections**: :class:`~.adaptive.StreamCount`, from ``connections`` up to ``max_connections``
  while the total rate still grows; workers above the count retire when their chunk ends. A reader waiting
  at a byte nobody fetches may get an extra connection, up to twice the count.
- **Integrity**: jobs with ``verify`` are hashed when complete and repaired source by source
  (:mod:`.verify`); other jobs are the caller's to check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from dao.aio import backoff, first_error
from dao.errors import DaoError
from dao.registry.errors import RegistryClientError, UpstreamNotFound, UpstreamStatusError, UpstreamUnavailable
from dao.transfer.adaptive import StreamCount
from dao.transfer.job import OPEN_END, Claim, Job
from dao.transfer.schedule import Policy, Scheduler, Stats
from dao.transfer.sources import Body, Peer, can_serve
from dao.transfer.verify import Verification

log = logging.getLogger("dao.transfer")

RATE_SAMPLE = 1.0  # seconds between speed samples of a running chunk
IDLE_RECHECK = 0.5  # seconds an idle worker waits before looking for a chunk to race again


class Unavailable(DaoError):
    """A blob no source could deliver; ``last``: what the last source's last request raised."""

    def __init__(self, message: str, last: BaseException | None = None) -> None:
        super().__init__(message)
        self.last = last


class Transfer(Verification):
    """One transfer: its sources' measured speeds and trust carry over between its jobs."""

    def __init__(
        self,
        peers: list[Peer],
        policy: Policy | None = None,
        stats: Stats | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.peers = peers
        self.policy = policy or Policy()
        self.stats = stats or Stats()
        self.warn = warn or log.warning
        self.scheduler = Scheduler(self.policy, self.stats)
        self.streams = StreamCount(self.policy.connections, self.policy.max_connections)
        self.received = 0  # bytes from the sources, what the stream count is measured on
        self._jobs: list[Job] = []
        self._pulse = asyncio.Event()
        self._unresolved = 0
        self._checks: set[asyncio.Task[None]] = set()
        self._repairing = asyncio.Lock()
        self._group: asyncio.TaskGroup | None = None
        self._workers = 0
        self._idle = 0
        self._adapting = False
        self._finished = asyncio.Event()  # set when a run's last job is resolved
        self._asked_first = 0.0

    # -- the caller's side ---------------------------------------------------------------------------------

    async def run(self, tasks: list[Coroutine[Any, Any, None]], workers: int = 1) -> None:
        """Run ``tasks`` (each ends a job: :meth:`add` and await its ``done``, or :meth:`skip`) with the
        workers. Raises the first error of a task."""
        self._unresolved += len(tasks)
        self._finished = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                for task in tasks:
                    group.create_task(task)
                for _ in range(max(1, min(workers, self.streams.target))):
                    self._spawn()
        except BaseExceptionGroup as eg:
            raise first_error(eg) from None
        finally:
            self._group = None
            if not self.streams.held:
                self._adapting = False  # the next run measures again
            for check in self._checks:
                check.cancel()

    def add(self, job: Job) -> None:
        self._jobs.append(job)
        self._jobs.sort(key=lambda j: j.order)
        job.done.add_done_callback(lambda _: self._forget(job))
        if job.complete():
            self._completed(job)
        self._more_workers()
        self._wake()

    def _forget(self, job: Job) -> None:
        if job in self._jobs:
            self._jobs.remove(job)

    def skip(self) -> None:
        """One of the tasks needed no transfer (the blob was at hand)."""
        self._resolved()

    def want(self, job: Job, pos: int) -> None:
        """A reader waits at ``pos``. When nobody fetches it, the next free connection starts there; an extra
        connection opens when none is free (up to twice the stream count)."""
        if not self._may_split() or not job.want(pos):
            return
        log.debug("a reader waits at byte %d of %s: fetching from there", pos, job.digest)
        self._wake()
        if self._idle == 0 and self._workers < 2 * self.streams.target:
            self._spawn()

    def _may_split(self) -> bool:
        return self.policy.max_connections > 1 and any(p.ranges is not False for p in self.peers)

    # -- workers -------------------------------------------------------------------------------------------

    def _spawn(self) -> None:
        if self._group is None:
            return
        self._workers += 1
        self._group.create_task(self._worker())

    def _more_workers(self) -> None:
        """Up to the stream count, as far as there is work for them."""
        useful = self._workers + self._unclaimed() // self.policy.chunk_min
        while self._workers < min(self.streams.target, useful):
            self._spawn()

    def _unclaimed(self) -> int:
        """Bytes of the jobs of known size that no claim covers yet: the work left to hand out."""
        return sum(sum(b - a for a, b in j.unclaimed()) for j in self._jobs if j.size is not None)

    async def _worker(self) -> None:
        try:
            await self._work()
        finally:
            self._workers -= 1

    async def _work(self) -> None:
        while True:
            job = None
            while True:
                if self._unresolved <= 0:
                    return
                wanted = any(j.wanted for j in self._jobs)
                if self._workers > (2 if wanted else 1) * self.streams.target:
                    return  # the count went down: this one retires
                for hopeless in self.scheduler.hopeless(self._jobs, self.peers):
                    self._fail(hopeless)
                job = self.scheduler.next(self._jobs, self.peers, time.monotonic(), self.streams.target)
                if job is not None:
                    break
                self._idle += 1
                try:
                    # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that comes as
                    # the pulse fires, and a worker that misses the group's cancel would keep the run waiting.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(IDLE_RECHECK):
                            await self._pulse.wait()
                finally:
                    self._idle -= 1
            peer, claim, cursor = job
            log.debug("%s bytes %d-%d from %s", claim.job.digest.encoded[:12], cursor, claim.end - 1, peer.url)
            task = asyncio.create_task(self._race(peer, claim, cursor))
            claim.tasks.add(task)
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # the transfer itself is being stopped
                # else: the other racer finished this chunk first, or its source was dropped (maybe before
                # the racer even started: so the bookkeeping is done here, not in the racer)
            finally:
                peer.active -= 1
                self._release(claim, task)
                self._wake()

    def _wake(self) -> None:
        """Idle workers look again: a chunk was released, a job added or checked, a source dropped."""
        self._pulse.set()
        self._pulse = asyncio.Event()

    def _resolved(self) -> None:
        self._unresolved -= 1
        if self._unresolved <= 0:
            self._finished.set()
        self._wake()

    # -- one request ---------------------------------------------------------------------------------------

    async def _race(self, peer: Peer, claim: Claim, cursor: int) -> None:
        """Fetch ``claim`` from ``cursor`` on. The worker that runs it keeps ``peer.active`` and releases the
        claim when it ends; failures release it at once, so others can take it during a backoff."""
        job = claim.job
        mark = began = time.monotonic()
        got = marked = 0
        # A whole blob is a plain GET; so is anything asked of a source that ignores Range (read from 0).
        whole = peer.ranges is False or (cursor == 0 and claim.end >= (job.size or OPEN_END))
        last = None if whole or claim.end >= OPEN_END else claim.end - 1
        if not self._asked_first:
            self._asked_first = began
        try:
            async with peer.blob(job).open(0 if whole else cursor, last) as body:
                self.streams.round_trip(time.monotonic() - began)
                skip = self._answered(peer, claim, cursor, body, whole)
                async for view in skipping(body.chunks(), skip):
                    view = view[: claim.end - cursor]
                    if not view:
                        break
                    got += len(view)
                    self.received += len(view)
                    self.stats.count(peer.url, len(view))
                    now = peer.last_byte = time.monotonic()
                    if now - mark >= RATE_SAMPLE:  # measured while it runs: a slow source shows in a second
                        peer.measured(got - marked, now - mark)
                        mark, marked = now, got
                    fresh = claim.pos - cursor  # > 0: the other racer already wrote that much of this
                    if fresh < len(view):
                        job.wrote(max(cursor, claim.pos), view[max(fresh, 0) :], peer)
                        claim.pos = cursor + len(view)
                    cursor += len(view)
                    if cursor >= claim.end or claim.pos >= claim.end:
                        break
            if job.size is None:  # read to its end: that was all of it
                claim.end = cursor
                job.size = cursor
            if claim.pos < claim.end and cursor < claim.end:
                raise UpstreamUnavailable(f"body ended at byte {cursor}, wanted {claim.end}")
        except UpstreamNotFound as exc:
            peer.missing.add(job.digest)
            self._failure(peer, job, exc, f"not found ({exc})")
            self._release(claim)
            return
        except (RegistryClientError, TimeoutError) as exc:
            self._release(claim)
            if type(exc) is UpstreamStatusError and not whole and peer.ranges is None:
                # A 4xx to our Range (416: an empty blob has no byte 0): ask it without one, at once.
                log.info("%s refused a Range (%s); whole blobs only from it", peer.url, exc)
                peer.ranges = False
                return
            self._failure(peer, job, exc, str(exc))
            if self.policy.first_final and not job.started:
                self._fail(job)  # the first answer is the caller's: not ours to retry
                return
            if _stalled(exc) and time.monotonic() - peer.last_byte < self.policy.stall_timeout:
                # Its other streams still flow: busy (a cold mirror fetching other parts first), not dead.
                peer.cap = max(1, peer.active - 1)
                log.info("%s is busy (a stream stalled while others flow): %d connections to it", peer.url, peer.cap)
                return
            await self._failed(peer, job, exc, got)
            return
        if mark == began:  # a short chunk: one sample for all of it
            peer.measured(got, time.monotonic() - began)
        peer.failures = 0
        if peer.cap is not None:  # it kept up: one more connection (additive increase)
            peer.cap = None if peer.cap + 1 >= self.policy.per_source else peer.cap + 1
        if claim.pos >= claim.end:
            self._finish(claim)

    def _answered(self, peer: Peer, claim: Claim, cursor: int, body: Body, whole: bool) -> int:
        """The headers of an answer: learn the blob's size, check the answer fits, notice an ignored Range.
        Returns how many of its first bytes to skip."""
        job = claim.job
        if job.size is not None and body.size is not None and body.size != job.size:
            raise UpstreamUnavailable(f"says {job.digest} has {body.size} bytes, not {job.size}")
        first = not job.started
        job.learn_size(body.size)
        skip = cursor - body.offset
        if skip < 0:
            raise UpstreamUnavailable(f"answered from byte {body.offset}, wanted {cursor}")
        carried = body.end if body.end is not None else (job.size or OPEN_END)
        if not whole and (skip > 0 or carried > claim.end):  # Range ignored: read on from this answer
            if peer.ranges is not False:
                log.info("%s ignores Range; whole blobs only from it", peer.url)
            peer.ranges = False
            claim.end = job.free_after(claim.end, min(carried, job.size or OPEN_END))
        elif not whole and peer.ranges is None:
            peer.ranges = True
        if first:
            self._first_answer(job)
        return skip

    def _first_answer(self, job: Job) -> None:
        """A job's size is known: more workers for it, and the stream count starts measuring (when there is
        enough left to fetch for more connections to matter)."""
        more = self.streams.target < self.streams.cap and self._unclaimed() > self.policy.first_chunk
        if not self._adapting and more:
            self._adapting = True
            self.streams.start(time.monotonic(), time.monotonic() - self._asked_first)
            assert self._group is not None
            self._group.create_task(self._adapt())
        self._more_workers()
        self._wake()

    async def _adapt(self) -> None:
        """Feed the stream count while there is work; open workers when it rises. Ends the moment the last
        job is resolved (the run waits for it: a sleep here would hold every blob's completion)."""
        step = max(0.05, self.streams.window / 10)
        while not self.streams.held and self._unresolved > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(step):
                    await self._finished.wait()
            if self._unresolved <= 0:
                break
            before = self.streams.target
            if self.streams.observe(time.monotonic(), self.received) > before:
                self._more_workers()
        if self.streams.steps:
            log.info("streams: %s", ", ".join(f"{n}: {rate / 1e6:.1f} MB/s" for n, rate in self.streams.steps))

    def _release(self, claim: Claim, racer: asyncio.Task[None] | None = None) -> None:
        """This racer is out; with no other racer the chunk's unwritten rest is free for anyone."""
        claim.tasks.discard(racer or asyncio.current_task())  # type: ignore[arg-type]
        if not claim.tasks and claim in claim.job.claims:
            claim.job.claims.remove(claim)

    def _finish(self, claim: Claim) -> None:
        job = claim.job
        if claim in job.claims:
            job.claims.remove(claim)
        current = asyncio.current_task()
        for task in claim.tasks:
            if task is not current:
                task.cancel()  # the slower racer
        if job.complete() and not job.checking and not job.done.done():
            self._completed(job)

    def _completed(self, job: Job) -> None:
        if job.verify:
            self._check_soon(job)
            return
        job.commit()
        job.done.set_result(None)
        self._resolved()

    def _failure(self, peer: Peer, job: Job, exc: BaseException, why: str) -> None:
        peer.last_error = exc
        job.errors[peer.url] = why

    async def _failed(self, peer: Peer, job: Job, exc: BaseException, got: int) -> None:
        others = any(p is not peer and p.out is None and job.digest not in p.missing for p in self.peers)
        if others:
            self._drop(peer, f"{peer.url} failed ({exc}); going on with the other sources")
            return
        peer.failures = 0 if got else peer.failures + 1
        if peer.failures >= self.policy.resume_attempts:
            self._drop(peer, f"{peer.url} failed {peer.failures} times in a row ({exc})")
            return
        log.info("retrying %s after: %s", peer.url, exc)
        await asyncio.sleep(backoff(peer.failures, self.policy.backoff_base, self.policy.backoff_max))

    def _drop(self, peer: Peer, why: str, *, lied: bool = False) -> None:
        if peer.out is not None:
            return
        peer.out = why
        peer.lied = lied
        self.warn(why)
        current = asyncio.current_task()
        for job in self._jobs:
            for claim in job.claims:
                if claim.peer is peer and not claim.raced:
                    for task in claim.tasks:
                        if task is not current:
                            task.cancel()  # a stalled stream of a dropped source would hold its chunk
        self._wake()

    def _fail(self, job: Job) -> None:
        if not job.done.done():
            why = "; ".join(f"{url}: {err}" for url, err in job.errors.items()) or "no source left"
            lasts = [p.last_error for p in self.peers if p.last_error is not None and p.url in job.errors]
            job.done.set_exception(Unavailable(f"cannot get {job.digest}: {why}", lasts[-1] if lasts else None))
            self._resolved()  # resolved, badly: the workers need not wait for it


async def skipping(chunks: AsyncIterator[bytes], skip: int) -> AsyncIterator[memoryview]:
    """A body's chunks without its first ``skip`` bytes: what a source that ignored ``Range`` sent before the
    byte we asked for."""
    async for chunk in chunks:
        view = memoryview(chunk)
        if skip:
            dropped = min(skip, len(view))
            skip -= dropped
            view = view[dropped:]
        if view:
            yield view


def _stalled(exc: BaseException | None) -> bool:
    """Whether a failure was a read timeout (no byte for the stall timeout), through the wrapping errors."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, TimeoutError):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


__all__ = ["Job", "Peer", "Policy", "Stats", "Transfer", "Unavailable", "can_serve", "skipping"]
