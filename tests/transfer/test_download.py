"""The ranged, resuming download against an in-process upstream whose every response we script."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from dao.registry.errors import UpstreamNotFound, UpstreamStatusError, UpstreamUnavailable
from dao.registry.runs import Runs
from dao.transfer.download import Download, upstream_policy
from dao.transfer.schedule import Policy

DATA = os.urandom(3_000_000)
POLICY = upstream_policy(4, 256 * 1024, chunk_min=64 * 1024, backoff_base=0.001, backoff_max=0.01)


class Body:
    def __init__(self, data: bytes, offset: int, size: int | None, cut: int | None) -> None:
        self.data, self.offset, self.size, self.cut = data, offset, size, cut
        self.end = offset + len(data)

    async def chunks(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.data), 32 * 1024):
            if self.cut is not None and i >= self.cut:
                raise UpstreamUnavailable("connection reset")
            yield self.data[i : i + 32 * 1024]
            await asyncio.sleep(0)


class Upstream:
    """Honours Range unless ``ranges`` is off; each response breaks after a random length with ``break_rate``."""

    def __init__(self, *, ranges: bool = True, break_rate: float = 0.0, seed: int = 0) -> None:
        self.ranges, self.break_rate = ranges, break_rate
        self.random = random.Random(seed)
        self.asked: list[tuple[int, int | None]] = []
        self.sent = 0  # bytes of the answers it gave (read or not)

    @asynccontextmanager
    async def open(self, start: int = 0, end: int | None = None) -> AsyncIterator[Body]:
        self.asked.append((start, end))
        await asyncio.sleep(0)
        cut = None
        if self.random.random() < self.break_rate:
            cut = self.random.randrange(0, 200_000)
        if not self.ranges or (start == 0 and end is None):
            self.sent += len(DATA)
            yield Body(DATA, 0, len(DATA), cut)
        else:
            last = len(DATA) - 1 if end is None else min(end, len(DATA) - 1)
            self.sent += last + 1 - start
            yield Body(DATA[start : last + 1], start, len(DATA), cut)


class Recorder:
    def __init__(self) -> None:
        self.sizes: list[int | None] = []
        self.written = 0

    def on_size(self, size: int | None) -> None:
        self.sizes.append(size)

    def on_data(self, offset: int, data: memoryview, url: str) -> None:
        assert self.sizes, "data before size"
        self.written += len(data)

    def on_lost(self, covered: int) -> None:
        raise AssertionError("nothing verifies here, so nothing is dropped")


async def download(tmp_path: Path, upstream: Upstream, policy: Policy = POLICY) -> tuple[bytes, Recorder]:
    path = tmp_path / "blob"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    recorder = Recorder()
    try:
        size = await Download(upstream, fd, recorder, policy).run()
    finally:
        os.close(fd)
    assert size == len(DATA)
    return path.read_bytes(), recorder


async def test_parallel_segments_cover_the_blob_exactly_once(tmp_path: Path) -> None:
    upstream = Upstream()
    data, recorder = await download(tmp_path, upstream)
    assert data == DATA
    assert recorder.sizes == [len(DATA)]
    assert recorder.written == len(DATA)  # no byte written twice
    assert upstream.sent == len(DATA)  # and none sent that was not kept: every request is bounded
    head, *others = upstream.asked
    assert head == (0, POLICY.first_chunk - 1)  # its 206 says the size and that ranges work: no probe
    assert len(others) >= POLICY.connections - 1
    assert others[0][0] == POLICY.first_chunk  # the chunks are taken from the front
    spans = sorted((a, b) for a, b in upstream.asked if b is not None)
    assert len(spans) == len(upstream.asked)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end + 1 == start  # exactly adjacent: no overlap, no gap


@pytest.mark.parametrize("seed", range(8))
async def test_breaks_anywhere_are_resumed_without_gaps(tmp_path: Path, seed: int) -> None:
    upstream = Upstream(break_rate=0.5, seed=seed)
    data, recorder = await download(tmp_path, upstream, POLICY)
    assert data == DATA
    assert recorder.written == len(DATA)


async def test_range_ignored_means_one_stream(tmp_path: Path) -> None:
    upstream = Upstream(ranges=False)
    data, recorder = await download(tmp_path, upstream)
    assert data == DATA and recorder.written == len(DATA)
    assert upstream.asked == [(0, POLICY.first_chunk - 1)]  # answered with the whole blob: read to its end
    assert upstream.sent == len(DATA)


async def test_resume_with_range_ignored_skips_what_it_has(tmp_path: Path) -> None:
    upstream = Upstream(ranges=False, break_rate=0.5, seed=3)
    data, recorder = await download(tmp_path, upstream, upstream_policy(1, backoff_base=0.001))
    assert data == DATA and recorder.written == len(DATA)


async def test_gives_up_after_attempts_without_progress(tmp_path: Path) -> None:
    class Dead(Upstream):
        @asynccontextmanager
        async def open(self, start: int = 0, end: int | None = None) -> AsyncIterator[Body]:
            self.asked.append((start, end))
            if start:
                raise UpstreamUnavailable("connection refused")
            yield Body(DATA, 0, len(DATA), 100_000)

    upstream = Dead()
    policy = upstream_policy(1, resume_attempts=3, backoff_base=0.001)
    with pytest.raises(UpstreamUnavailable):
        await download(tmp_path, upstream, policy)
    assert len(upstream.asked) == 1 + 3


async def test_first_answer_is_the_callers(tmp_path: Path) -> None:
    class Missing(Upstream):
        @asynccontextmanager
        async def open(self, start: int = 0, end: int | None = None) -> AsyncIterator[Body]:
            self.asked.append((start, end))
            raise UpstreamNotFound("GET /v2/x/blobs/y: 404", 404, ("BLOB_UNKNOWN",))
            yield  # pragma: no cover

    upstream = Missing()
    with pytest.raises(UpstreamNotFound):
        await download(tmp_path, upstream)
    assert len(upstream.asked) == 1


async def test_an_upstream_refusing_ranges_gets_a_plain_get(tmp_path: Path) -> None:
    class RangesRefused(Upstream):
        @asynccontextmanager
        async def open(self, start: int = 0, end: int | None = None) -> AsyncIterator[Body]:
            if start or end is not None:
                self.asked.append((start, end))
                raise UpstreamStatusError("GET /v2/x/blobs/y: 416 Range Not Satisfiable", 416)
            async with super().open(start, end) as body:
                yield body

    upstream = RangesRefused()
    data, recorder = await download(tmp_path, upstream)
    assert data == DATA and recorder.written == len(DATA)
    assert upstream.asked == [(0, POLICY.first_chunk - 1), (0, None)]  # one refusal, then one stream


async def test_a_small_blob_is_one_bounded_request(tmp_path: Path) -> None:
    upstream = Upstream()
    policy = upstream_policy(4, 4 * 1024 * 1024)  # more than the blob
    data, _ = await download(tmp_path, upstream, policy)
    assert data == DATA and upstream.asked == [(0, 4 * 1024 * 1024 - 1)] and upstream.sent == len(DATA)


@pytest.mark.parametrize(
    "have",
    [
        [(0, 1_000_000)],  # a prefix: the head resumes after it
        [(0, 500_000), (1_200_000, 2_000_000), (2_500_000, 2_600_000)],  # a prefix and scattered runs
        [(700_000, 3_000_000)],  # no prefix: the head starts at 0 and stops where the run begins
    ],
    ids=["prefix", "scattered", "tail"],
)
async def test_resume_asks_only_for_what_is_missing(tmp_path: Path, have: list[tuple[int, int]]) -> None:
    path = tmp_path / "blob"
    left = bytearray(os.urandom(len(DATA)))  # what an interrupted run left: the runs we have, garbage elsewhere
    for start, end in have:
        left[start:end] = DATA[start:end]
    path.write_bytes(left)
    upstream = Upstream()
    fd = os.open(path, os.O_RDWR)
    recorder = Recorder()
    try:
        await Download(upstream, fd, recorder, POLICY, have=Runs(have)).run()
    finally:
        os.close(fd)
    assert path.read_bytes() == DATA
    had = sum(end - start for start, end in have)
    assert recorder.written <= len(DATA) - had + 32 * 1024  # at most one chunk beyond the missing bytes
    for start, end in upstream.asked[1:] if have[0][0] else upstream.asked:
        for a, b in have:
            assert end is None or not (start < b and a <= end), (start, end)  # no request into what we had
