"""Download one blob into a file over several connections, resuming broken transfers where they stopped.

On a long, lossy path one TCP stream is capped far below the link's rate (its throughput falls with the
square root of the loss rate), so a big blob is fetched as parallel byte ranges:

- The *head* stream reads in order from byte 0. Its bytes are written (and reported) first, so whoever
  follows the file sees a prefix that grows steadily from the start.
- Every request asks for exactly the bytes it will keep, so no byte crosses the uplink twice (a mirror's
  uplink is billed by the byte). The head's first request is ``Range: bytes=0-<split_threshold - 1>``: a blob
  smaller than that comes whole in one answer, and a bigger one's ``206`` says its size and that ranges work,
  so the helpers start at once, without a probe. An upstream that ignores ``Range`` answers ``200`` with the
  whole blob, and the head alone reads it to the end (no request wasted). With one connection the head is a
  plain GET.
- Helpers claim segments from the end of the blob backwards, each sized to a share of the gap between the
  head's claim and the lowest claimed byte (smaller as the gap closes, so all connections finish together).
  The head claims its next piece of that gap from below when its request ends; the two meet without overlap.
  (An open-ended head that stopped where the helpers began threw away what was in flight: bandwidth x RTT
  per blob, up to a quarter of an 8 MiB blob on loopback.)
- A transfer that breaks is re-requested from the first byte not yet written (``Range``), with backoff, until
  ``resume_attempts`` consecutive attempts brought no new byte. A resumed head whose ``Range`` is ignored
  skips what it already has.

Nothing here hashes or commits: the caller gets :meth:`Listener.on_size` once and :meth:`Listener.on_data`
after every write (offset and bytes, in no global order) and decides what the bytes are worth.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from dao.aio import backoff, first_error
from dao.registry.errors import UpstreamRateLimited, UpstreamStatusError, UpstreamUnavailable
from dao.registry.runs import Runs

log = logging.getLogger(__name__)

MiB = 1024 * 1024

# Failures after which asking again, from where we stopped, may well work.
RESUMABLE = (UpstreamUnavailable, UpstreamRateLimited, TimeoutError)


@dataclass(frozen=True, slots=True)
class DownloadPolicy:
    connections: int = 6  # per blob, head stream included; 1 = never split
    split_threshold: int = 8 * MiB  # blobs at least this big are split
    segment_min: int = 256 * 1024  # small enough that the head is not left alone with a long tail
    segment_max: int = 64 * MiB
    resume_attempts: int = 5  # consecutive attempts without a new byte before giving up
    backoff_base: float = 0.25
    backoff_max: float = 5.0

    def backoff(self, attempt: int) -> float:
        return backoff(attempt, self.backoff_base, self.backoff_max)


class Body(Protocol):
    """An upstream response being read.

    ``offset``: where in the blob its first byte belongs (0 when a requested range was ignored);
    ``end``: exclusive end of the bytes it carries, when known (``Content-Range`` last + 1, or the length);
    ``size``: the whole blob's size when the upstream said (``Content-Range`` total or ``Content-Length``).
    ``chunks`` raises a :data:`RESUMABLE` error when the connection breaks.
    """

    offset: int
    end: int | None
    size: int | None

    def chunks(self) -> AsyncIterator[bytes]: ...


class Source(Protocol):
    def open(self, start: int = 0, end: int | None = None) -> AbstractAsyncContextManager[Body]:
        """A response for bytes ``start``..``end`` (inclusive; None = to the end); no Range header for 0-."""
        ...


class Listener(Protocol):
    def on_size(self, size: int | None) -> None:
        """The head's headers arrived; called once, before any :meth:`on_data`."""

    def on_data(self, offset: int, data: memoryview) -> None:
        """``data`` was just written at ``offset``; must not block."""


class Download:
    """One run: ``await Download(source, fd, listener, policy).run()`` returns the blob's size.

    Raises what the first request raised (before :meth:`Listener.on_size`), or the last resumable error once
    a stream gave up; helper tasks are cancelled when anything fails.
    """

    def __init__(
        self,
        source: Source,
        fd: int,
        listener: Listener,
        policy: DownloadPolicy | None = None,
        *,
        have: Runs | None = None,
        size: int | None = None,
    ) -> None:
        """``have``: byte runs the file already holds (a resumed partial download); only the rest is asked for.
        ``size``: the blob's size when the caller knows it (a descriptor says), so a resumed head asks for a
        bounded range from its first request."""
        self.source = source
        self.fd = fd
        self.listener = listener
        self.policy = policy or DownloadPolicy()
        self.size: int | None = size
        self.have = have or Runs()
        self.head_pos = self.have.end_of(0)
        self.head_end: int | None = None  # exclusive end of the head's current request; None: open-ended
        self.frontier: int | None = None  # lowest byte claimed by a helper; the head stops there
        self._first_bounded = True  # the head's first request asks for a bounded range
        self._holes: list[tuple[int, int]] = []  # gaps past the head's own, for helpers (resume)
        self._wanted: list[tuple[int, int]] = []  # gaps a reader waits at: from their start, oldest wait first
        self._helpers = 0
        if size is not None:
            self._plan_holes(size)
        self.started = False  # the head's first headers arrived
        self.ranges_work = False  # a helper got the 206 it asked for
        self._group: asyncio.TaskGroup | None = None

    async def run(self) -> int:
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                group.create_task(self._head())
        except BaseExceptionGroup as eg:
            raise first_error(eg) from None
        return self.size if self.size is not None else self.head_pos

    # -- head ----------------------------------------------------------------------------------------------

    async def _head(self) -> None:
        failures = 0
        while True:
            before = self.head_pos
            try:
                if await self._head_once():
                    return
                failures = 0
            except RESUMABLE as exc:
                if not self.started:
                    raise  # the first request failed: that is the caller's answer, not ours to retry
                failures = 0 if self.head_pos > before else failures + 1
                if failures >= self.policy.resume_attempts:
                    raise
                log.info("resuming at byte %d after: %s", self.head_pos, exc)
                await asyncio.sleep(self.policy.backoff(failures))

    def _head_claim(self) -> int | None:
        """The exclusive end of the head's next request (None: to the end of the blob)."""
        p = self.policy
        if self.frontier is None:  # size unknown: a first piece, whole if the blob is small
            if p.connections <= 1 or not self._first_bounded:
                return None
            return self.head_pos + max(p.split_threshold, 2 * p.segment_min)
        if self.head_end is not None and self.head_pos < self.head_end:
            return self.head_end  # a broken request is asked again to the same end
        gap = self.frontier - self.head_pos
        if p.connections <= 1 or not self.ranges_work or gap < 2 * p.segment_min:
            return self.frontier
        piece = max(p.split_threshold, 2 * p.segment_min) if not self.started else self._segment(gap)
        return min(self.frontier, self.head_pos + piece)

    def _segment(self, gap: int) -> int:
        p = self.policy
        return max(p.segment_min, min(p.segment_max, gap // (2 * p.connections)))

    async def _head_once(self) -> bool:
        """One request of the head; True when the head has nothing more to fetch."""
        self.head_end = self._head_claim()
        asked_end = self.head_end
        try:
            async with self.source.open(self.head_pos, None if asked_end is None else asked_end - 1) as body:
                return await self._read_head(body, asked_end)
        except UpstreamStatusError as exc:  # only opening raises it: the upstream's answer to our request
            if type(exc) is not UpstreamStatusError or self.started or not self._first_bounded:
                raise  # 404, 401/403, 429 are answers about the blob, not about Range
            # A 416 (an empty blob has no byte 0) or another 4xx to a ranged request: ask without a Range.
            self._first_bounded = False
            return False

    async def _read_head(self, body: Body, asked_end: int | None) -> bool:
        if not self.started:
            self.started = True
            if self.size is not None and body.size is not None and body.size != self.size:
                raise UpstreamUnavailable(f"upstream says the blob has {body.size} bytes, not {self.size}")
            if self.size is None and body.size is not None:
                self._plan_holes(body.size)
            self.size = self.size if self.size is not None else body.size
            if self.head_end is not None and self.size is not None:
                self.head_end = min(self.head_end, self.size)  # a first piece longer than the blob
            ignored = (
                body.offset != self.head_pos
                or not self._first_bounded  # our Range was refused: this plain GET is the only stream
                or (asked_end is not None and (body.end is None or body.end > asked_end))
            )
            if ignored:
                self._head_takes_all()  # Range ignored (a whole 200, or a resume from 0): read it all
            elif asked_end is not None and (self.head_pos or (self.size or 0) > asked_end):
                self.ranges_work = True  # our bounded request was honoured
            self.listener.on_size(self.size)
            if not ignored:
                self._maybe_split()
        skip = self.head_pos - body.offset  # > 0 when a resume's Range was ignored
        if skip < 0:
            raise UpstreamUnavailable(f"upstream answered from byte {body.offset}, wanted {self.head_pos}")
        async for view in skipping(body.chunks(), skip):
            stop = self._head_stop()
            if stop is not None:
                view = view[: stop - self.head_pos]
            if view:
                self._write(self.head_pos, view)
                self.head_pos += len(view)
            stop = self._head_stop()
            if stop is not None and self.head_pos >= stop:
                break  # the rest belongs to the helpers (or the blob ended); only unasked-for bytes are dropped
        if self.size is not None and self.head_pos >= (self.frontier if self.frontier is not None else self.size):
            return True
        if self.head_end is not None and self.head_pos < self.head_end:
            raise UpstreamUnavailable(f"upstream body ended at byte {self.head_pos}, wanted {self.head_end}")
        # An open body of unknown size that ended was all of it; otherwise the next piece is claimed.
        return self.size is None

    def _head_stop(self) -> int | None:
        ends = [e for e in (self.frontier, self.head_end) if e is not None]
        return min(ends) if ends else None

    def _plan_holes(self, size: int) -> None:
        """The head's stretch ends at the first byte we have past it; later gaps wait for helpers."""
        self.size = size
        holes = self.have.holes(self.head_pos, size)
        if holes and holes[0][0] == self.head_pos:
            self.frontier, self._holes = holes[0][1], holes[1:]
        else:
            self.frontier, self._holes = self.head_pos, holes

    # -- helpers -------------------------------------------------------------------------------------------

    def _maybe_split(self) -> None:
        p = self.policy
        splits = p.connections > 1 and self.size is not None
        big = splits and self.size is not None and self.size >= max(p.split_threshold, 2 * p.segment_min)
        if self._holes and not splits:
            self._head_takes_all()
        elif self.ranges_work and (self._holes or big):
            for _ in range(p.connections - 1):
                self._spawn()
        elif self._holes:
            self._spawn()  # the probe, on the first gap
        elif big and self.frontier is not None and self.frontier - max(self.head_pos, self.head_end or 0) > 0:
            self._spawn()  # the probe

    def _head_takes_all(self) -> None:
        """No helpers after all: the head goes on to the end (re-writing runs a resumed file already has)."""
        self.frontier = self.size
        self.head_end = None
        self._holes.clear()
        self._wanted.clear()

    def want(self, pos: int) -> None:
        """A reader waits for byte ``pos``. When no stream is on it (it lies in the head's gap, far ahead of the
        head), the gap is split there and a helper starts at ``pos`` -- an extra connection if all are busy,
        up to twice the policy's; when none is free, the longest wait is served first -- so a client's
        ``Range`` in the middle of a cold blob gets its first bytes in a round trip instead of when the head
        or the top-down helpers get there."""
        p = self.policy
        if not self.ranges_work or self.frontier is None or self.size is None or self._group is None:
            return
        for i, (start, end) in enumerate(self._wanted):
            if start <= pos < end:
                if start == pos:
                    return  # wanted already; a helper takes it as soon as one is free
                self._wanted[i : i + 1] = [(start, pos)]  # split: both parts have a reader waiting
                self._wanted.append((pos, end))
                break
        else:
            if not max(self.head_pos + 2 * p.segment_min, self.head_end or 0) <= pos < self.frontier:
                return  # the head is nearly there (or has asked for it), or a helper already has it
            self._wanted.append((pos, self.frontier))
            self.frontier = pos
            log.debug("a reader waits at byte %d: fetching from there", pos)
        if self._helpers < 2 * p.connections - 1:
            self._spawn()

    def _spawn(self) -> None:
        assert self._group is not None
        self._helpers += 1
        self._group.create_task(self._helper())

    def _claim(self) -> tuple[int, int] | None:
        """The next segment [start, end): a resumed file's gap first, else the top of the head's gap; None when
        the head should finish what is left."""
        assert self.frontier is not None
        p = self.policy
        if self._wanted:
            start, end = self._wanted.pop(0)  # the longest wait first
            segment = max(p.segment_min, min(p.segment_max, (end - start) // (2 * p.connections)))
            if end - start > segment + p.segment_min:
                self._wanted.append((start + segment, end))
                end = start + segment
            return start, end
        if self._holes:
            start, end = self._holes.pop()
            if end - start > p.segment_max:
                self._holes.append((start, end - p.segment_max))
                start = end - p.segment_max
            return start, end
        gap = self.frontier - max(self.head_pos, self.head_end or 0)
        if gap < 2 * p.segment_min:
            return None
        segment = self._segment(gap)
        end = self.frontier
        self.frontier = end - segment
        log.debug("segment %d-%d claimed, head at %d", self.frontier, end - 1, self.head_pos)
        return self.frontier, end

    async def _helper(self) -> None:
        try:
            await self._helper_loop()
        finally:
            self._helpers -= 1

    async def _helper_loop(self) -> None:
        while (claimed := self._claim()) is not None:
            segment = _Segment(*claimed)
            failures = 0
            while segment.pos < segment.end:
                before = segment.pos
                try:
                    await self._segment_once(segment)
                except _RangeIgnored:
                    self._give_back(segment, "upstream ignores Range")
                    return
                except RESUMABLE as exc:
                    if not self.ranges_work:  # the probe failed: splitting is a bonus, not worth failing for
                        self._give_back(segment, f"range probe failed: {exc}")
                        return
                    failures = 0 if segment.pos > before else failures + 1
                    if failures >= self.policy.resume_attempts:
                        raise
                    log.info("resuming segment at byte %d after: %s", segment.pos, exc)
                    await asyncio.sleep(self.policy.backoff(failures))
                except UpstreamStatusError as exc:  # a 4xx to a Range: not worth failing for either
                    if self.ranges_work or type(exc) is not UpstreamStatusError:
                        raise
                    self._give_back(segment, f"range probe refused: {exc}")
                    return

    def _give_back(self, segment: _Segment, why: str) -> None:
        """The probe's segment returns to the head (it is the only claim so far); no more helpers start."""
        self._head_takes_all()
        log.info("%s; fetching in one stream", why)

    async def _segment_once(self, segment: _Segment) -> None:
        """Fetch the rest of ``segment`` once, advancing ``segment.pos`` as bytes land."""
        async with self.source.open(segment.pos, segment.end - 1) as body:
            if body.offset != segment.pos:
                if not self.ranges_work:
                    raise _RangeIgnored
                raise UpstreamUnavailable(f"upstream answered from byte {body.offset}, wanted {segment.pos}")
            if not self.ranges_work:  # the probe's answer: the other helpers start now
                self.ranges_work = True
                for _ in range(self.policy.connections - 2):
                    self._spawn()
            if body.size is not None and body.size != self.size:
                raise UpstreamUnavailable(f"upstream size changed from {self.size} to {body.size}")
            async for chunk in body.chunks():
                view = memoryview(chunk)[: segment.end - segment.pos]
                if view:
                    self._write(segment.pos, view)
                    segment.pos += len(view)
                if segment.pos >= segment.end:
                    return
        if segment.pos < segment.end:
            raise UpstreamUnavailable(f"upstream range ended at byte {segment.pos}, wanted {segment.end}")

    # -- common --------------------------------------------------------------------------------------------

    def _write(self, offset: int, view: memoryview) -> None:
        done = 0
        while done < len(view):  # page-cache writes: microseconds, not worth a thread hop per chunk
            done += os.pwrite(self.fd, view[done:], offset + done)
        self.listener.on_data(offset, view)


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


class _RangeIgnored(Exception):
    pass


@dataclass(slots=True)
class _Segment:
    start: int
    end: int  # exclusive
    pos: int = -1

    def __post_init__(self) -> None:
        self.pos = self.start
