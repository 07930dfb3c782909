"""The single-flight fetch in process, on the real filesystem store, with an upstream body we control."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from dao.mirror.inflight import FetchFailed, FetchGate, FetchQueueFull, Inflight
from dao.mirror.storage import FilesystemBlobStore
from dao.oci.digest import Digest
from dao.registry.errors import UpstreamUnavailable
from dao.transfer.download import upstream_policy

DATA = os.urandom(1_000_000)


class Body:
    """Sends ``data`` in chunks, pausing at ``gate`` after ``pause_at`` bytes; optionally breaks there."""

    def __init__(self, data: bytes, pause_at: int, gate: asyncio.Event, *, fail: bool = False) -> None:
        self.data, self.pause_at, self.gate, self.fail = data, pause_at, gate, fail
        self.size: int | None = len(data)
        self.end: int | None = len(data)
        self.offset = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self.data[: self.pause_at]
        await self.gate.wait()
        if self.fail:
            raise UpstreamUnavailable("upstream went away")
        for i in range(self.pause_at, len(self.data), 65536):
            yield self.data[i : i + 65536]


class Source:
    """A one-request upstream (no Range): every ``open`` serves the whole body again."""

    def __init__(self, body: Body) -> None:
        self.body = body

    @asynccontextmanager
    async def open(self, start: int = 0, end: int | None = None) -> AsyncIterator[Body]:
        yield self.body


async def collect(fetch, start: int = 0, end: int | None = None) -> bytes:
    try:
        return b"".join([chunk async for chunk in fetch.stream(start, end)])
    finally:
        fetch.release()


async def test_readers_wait_at_the_tail_until_verified_and_survive_commit(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path)
    inflight = Inflight(store, upstream_policy(resume_attempts=1))
    gate = asyncio.Event()
    digest = Digest.of(DATA)
    fetch, started = await inflight.join_or_start(digest, Source(Body(DATA, 500_000, gate)))
    assert started
    joined, started = await inflight.join_or_start(digest, Source(Body(b"", 0, gate)))
    assert joined is fetch and not started
    await fetch.headers_ready
    readers = [asyncio.create_task(collect(fetch)), asyncio.create_task(collect(joined, 10, 19))]
    ranged = await readers[1]  # a range that does not reach the end needs no verification
    assert ranged == DATA[10:20]
    await asyncio.sleep(0.05)
    assert not readers[0].done()  # held back: the blob is not complete yet
    late, _ = await inflight.join_or_start(digest, Source(Body(b"", 0, gate)))  # joins before commit, reads after
    gate.set()
    assert await readers[0] == DATA
    await fetch.task
    assert len(inflight) == 0
    assert await collect(late) == DATA  # its registration kept the descriptor open
    assert await store.stat(digest) == len(DATA)
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("corrupt", [False, True], ids=["broken", "corrupt"])
async def test_failure_reaches_every_reader_and_commits_nothing(tmp_path: Path, corrupt: bool) -> None:
    store = FilesystemBlobStore(tmp_path)
    inflight = Inflight(store, upstream_policy(resume_attempts=1))
    gate = asyncio.Event()
    digest = Digest.of(DATA)
    served = bytearray(DATA)
    if corrupt:
        served[-1] ^= 1  # only the very last byte is wrong: the held-back byte is exactly what protects
    fetch, _ = await inflight.join_or_start(digest, Source(Body(bytes(served), 100, gate, fail=not corrupt)))
    other, _ = await inflight.join_or_start(digest, Source(Body(b"", 0, gate)))
    await fetch.headers_ready
    readers = [asyncio.create_task(collect(f)) for f in (fetch, other)]
    gate.set()
    for reader in readers:
        with pytest.raises(FetchFailed):
            await reader
    await fetch.task
    assert await store.stat(digest) is None
    assert list((tmp_path / "tmp").iterdir()) == []
    assert len(inflight) == 0


@pytest.mark.parametrize("had", [100, 600_000], ids=["little-in", "most-in"])
async def test_a_fetch_nobody_reads_stops_unless_mostly_in(tmp_path: Path, monkeypatch, had: int) -> None:
    """The client that started a fetch hangs up and nobody joins: with little of the blob in, the upstream
    transfer stops (a client asking for many blobs and hanging up costs the upstream little); with most of it
    in, it is finished for the cache."""
    from dao.mirror import inflight as module

    monkeypatch.setattr(module, "ORPHAN_GRACE", 0.05)
    store = FilesystemBlobStore(tmp_path)
    inflight = Inflight(store, upstream_policy(resume_attempts=1))
    gate = asyncio.Event()
    digest = Digest.of(DATA)
    fetch, _ = await inflight.join_or_start(digest, Source(Body(DATA, had, gate)))
    await fetch.headers_ready
    await asyncio.sleep(0.01)  # the first bytes land
    fetch.release()  # the client went away
    await asyncio.sleep(0.2)
    if had < len(DATA) // 2:
        assert fetch.task is not None and fetch.task.done() and fetch.task.cancelled()
        assert await store.stat(digest) is None and list((tmp_path / "tmp").iterdir()) == []
    else:
        gate.set()
        assert fetch.task is not None
        await fetch.task
        assert await store.stat(digest) == len(DATA)
    assert len(inflight) == 0 or not fetch.task.done()
    assert inflight.gate.running == (0 if fetch.task.done() else 1)


async def test_the_gate_bounds_fetches_per_client_and_in_all() -> None:
    gate = FetchGate(max_fetches=3, per_client=2, queue_timeout=0.2)
    await gate.acquire("a")
    await gate.acquire("a")
    with pytest.raises(FetchQueueFull, match="2 for a"):
        await gate.acquire("a")  # a's own limit; b is not held up by it
    await gate.acquire("b")
    with pytest.raises(FetchQueueFull, match="3 in all"):
        await gate.acquire("c")
    waiting = asyncio.create_task(gate.acquire("c"))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    gate.release("a")  # a slot frees: the waiter takes it at once
    await asyncio.wait_for(waiting, 1)
    assert gate.running == 3
