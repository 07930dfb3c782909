"""Download one blob into a file over several connections, resuming broken transfers where they stopped.

On a long, lossy path one TCP stream is capped far below the link's rate (its throughput falls with the
square root of the loss rate), so a big blob is fetched as parallel byte ranges:

- The *head* stream is a plain GET from byte 0, exactly what a single-stream client sends, and it keeps
  reading in order. Its bytes are written (and reported) first, so whoever follows the file sees a prefix
  that grows steadily from the start.
- Once the size is known and above ``split_threshold``, one *helper* asks for a range near the end. If the
  upstream answers ``206`` the other helpers start; if it answers ``200`` (Range ignored) the head alone
  carries on, which costs one aborted request.
- Helpers claim segments from the end of the blob backwards, each sized to a share of the gap between the
  head and the lowest claimed byte (smaller as the gap closes, so all connections finish together). The head
  stops where the claimed segments begin.
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
import random
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from dao.registry.errors import UpstreamRateLimited, UpstreamUnavailable

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
        return min(self.backoff_base * 2**attempt, self.backoff_max) * random.uniform(0.5, 1.0)


class Body(Protocol):
    """An upstream response being read.

    ``offset``: where in the blob its first byte belongs (0 when a requested range was ignored);
    ``size``: the whole blob's size when the upstream said (``Content-Range`` total or ``Content-Length``).
    ``chunks`` raises a :data:`RESUMABLE` error when the connection breaks.
    """

    offset: int
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
        self.frontier: int | None = None  # lowest byte claimed by a helper; the head stops there
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
                await self._head_once()
                return
            except RESUMABLE as exc:
                if not self.started:
                    raise  # the first request failed: that is the caller's answer, not ours to retry
                failures = 0 if self.head_pos > before else failures + 1
                if failures >= self.policy.resume_attempts:
                    raise
                log.info("resuming at byte %d after: %s", self.head_pos, exc)
                await asyncio.sleep(self.policy.backoff(failures))

    async def _head_once(self) -> None:
        bounded = self.frontier is not None and (self.started or self.head_pos > 0)
        async with self.source.open(self.head_pos, self.frontier - 1 if bounded and self.frontier else None) as body:
            if not self.started:
                self.started = True
                if self.size is not None and body.size is not None and body.size != self.size:
                    raise UpstreamUnavailable(f"upstream says the blob has {body.size} bytes, not {self.size}")
                if self.size is None and body.size is not None:
                    self._plan_holes(body.size)
                self.size = self.size if self.size is not None else body.size
                if body.offset != self.head_pos:
                    self._head_takes_all()  # a resume whose Range was ignored: skip what we have, read on
                elif self.head_pos:
                    self.ranges_work = True  # our resume's Range was honoured
                self.listener.on_size(self.size)
                self._maybe_split()
            skip = self.head_pos - body.offset  # > 0 when a resume's Range was ignored
            if skip < 0:
                raise UpstreamUnavailable(f"upstream answered from byte {body.offset}, wanted {self.head_pos}")
            async for view in skipping(body.chunks(), skip):
                if self.frontier is not None:
                    view = view[: self.frontier - self.head_pos]
                if view:
                    self._write(self.head_pos, view)
                    self.head_pos += len(view)
                if self.frontier is not None and self.head_pos >= self.frontier:
                    return  # the rest belongs to the helpers; leaving drops this connection
        if self.size is not None and self.head_pos < (self.frontier or 0):
            raise UpstreamUnavailable(f"upstream body ended at byte {self.head_pos} of {self.size}")

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
        if self._holes and not splits:
            self._head_takes_all()
        elif self._holes and self.ranges_work:
            for _ in range(p.connections - 1):
                self._spawn()
        elif self._holes:
            self._spawn()  # the probe, on the first gap
        elif splits and self.size is not None and self.size >= max(p.split_threshold, 2 * p.segment_min):
            self._spawn()  # the probe

    def _head_takes_all(self) -> None:
        """No helpers after all: the head goes on to the end (re-writing runs a resumed file already has)."""
        self.frontier = self.size
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
            if not self.head_pos + 2 * p.segment_min <= pos < self.frontier:
                return  # the head is nearly there, or a helper already has it
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
        gap = self.frontier - self.head_pos
        if gap < 2 * p.segment_min:
            return None
        segment = max(p.segment_min, min(p.segment_max, gap // (2 * p.connections)))
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


class Runs:
    """Disjoint, sorted ``[start, end)`` byte runs written so far; adjacent runs merge."""

    def __init__(self, runs: list[tuple[int, int]] | None = None) -> None:
        self.runs: list[list[int]] = []
        for start, end in runs or []:
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        runs = self.runs
        i = 0
        while i < len(runs) and runs[i][1] < start:
            i += 1
        j = i
        while j < len(runs) and runs[j][0] <= end:
            start, end = min(start, runs[j][0]), max(end, runs[j][1])
            j += 1
        runs[i:j] = [[start, end]]

    def end_of(self, pos: int) -> int:
        """Exclusive end of the run holding ``pos``; ``pos`` itself when that byte is not written."""
        for start, end in self.runs:
            if start <= pos < end:
                return end
            if start > pos:
                break
        return pos

    def holes(self, start: int, end: int) -> list[tuple[int, int]]:
        """The unwritten gaps of ``[start, end)``, in order."""
        out, pos = [], start
        for a, b in self.runs:
            if b <= pos:
                continue
            if a >= end:
                break
            if a > pos:
                out.append((pos, a))
            pos = max(pos, b)
        if pos < end:
            out.append((pos, end))
        return out

    def covered(self) -> int:
        return sum(b - a for a, b in self.runs)


class _RangeIgnored(Exception):
    pass


@dataclass(slots=True)
class _Segment:
    start: int
    end: int  # exclusive
    pos: int = -1

    def __post_init__(self) -> None:
        self.pos = self.start


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first real exception in a task group's (possibly nested) group: the one to show the caller."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return first_error(exc)
        return exc
    return group
