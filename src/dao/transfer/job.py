"""One blob while it is fetched: the file it goes into, which byte runs are written and by whom, the claims
(byte ranges given to a source) running on it, and the positions readers wait at.

The size may be unknown when the job starts (a mirror fetching by digest learns it from the first answer);
until then the job has one claim, the first request.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from dao.oci.digest import Digest
from dao.registry.runs import Runs
from dao.transfer.sources import Peer

SAVE_EVERY = 0.5  # seconds between saves of a job's written runs (when it has a runs file)
OPEN_END = 1 << 62  # the end of a claim on a blob of unknown size that is read to its end


class Listener(Protocol):
    def on_size(self, size: int | None) -> None:
        """The first answer's headers arrived; called once, before any :meth:`on_data`."""

    def on_data(self, offset: int, data: memoryview, url: str) -> None:
        """``data`` from the source at ``url`` was just written at ``offset``; must not block."""

    def on_lost(self, covered: int) -> None:
        """Bytes were dropped (a repair, a fresh start): ``covered`` are in hand now."""


class Quiet:
    def on_size(self, size: int | None) -> None:
        pass

    def on_data(self, offset: int, data: memoryview, url: str) -> None:
        pass

    def on_lost(self, covered: int) -> None:
        pass


@dataclass(eq=False)
class Claim:
    """A byte range [start, end) being fetched; ``pos``: the first byte of it nobody has written yet."""

    job: Job
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


class Job:
    """One blob being fetched into ``fd``.

    ``have``: byte runs the file already holds (a resumed download); only the rest is asked for.
    ``order``: its place among the transfer's jobs (earlier layers are fetched first).
    ``verify``: hash it when complete (with ``hasher`` when given: one that hashed the bytes as they came
    saves reading the file again), and find and drop a lying source's bytes (see :mod:`.verify`);
    otherwise the caller checks the bytes itself. ``runs_file``: where the written runs are saved, so a killed
    process resumes."""

    def __init__(
        self,
        digest: Digest,
        size: int | None,
        fd: int,
        *,
        repo: str = "",
        order: int = 0,
        have: Runs | None = None,
        listener: Listener | None = None,
        verify: bool = False,
        runs_file: Path | None = None,
        hasher: Callable[[], Awaitable[Digest]] | None = None,
    ) -> None:
        self.digest = digest
        self.repo = repo
        self.size = size
        self.fd = fd
        self.order = order
        self.have = have or Runs()
        self.listener: Listener = listener or Quiet()
        self.verify = verify
        self.runs_file = runs_file
        self.hasher = hasher  # the digest of the complete file, from a hash kept as the bytes came (a mirror's)
        self.pieces: list[tuple[int, int, Peer | None]] = [(a, b, None) for a, b in self.have.runs]  # None: earlier
        self.claims: list[Claim] = []
        self.wanted: list[int] = []  # positions readers wait at, the longest wait first
        self.started = False  # the first answer's headers arrived
        self.checking = False  # hashing or repairing: no new claims
        self.rounds = 0
        self.errors: dict[str, str] = {}
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._saved = time.monotonic()

    def learn_size(self, size: int | None) -> None:
        """The first answer came; ``size`` is what it said (None: read to its end to find out)."""
        if not self.started:
            self.started = True
            self.size = size if self.size is None else self.size
            if self.size is not None:
                for claim in self.claims:
                    claim.end = min(claim.end, self.size)
            self.listener.on_size(self.size)

    def unclaimed(self) -> list[tuple[int, int]]:
        if self.size is None:
            return [] if self.claims else [(0, OPEN_END)]
        taken = Runs([(a, b) for a, b in self.have.runs])
        for claim in self.claims:
            if claim.pos < claim.end:
                taken.add(claim.pos, claim.end)
        return taken.holes(0, self.size)

    def free_after(self, pos: int, until: int) -> int:
        """How far from ``pos`` (up to ``until``) nobody has the bytes or a claim on them."""
        for start, end in self.unclaimed():
            if start <= pos < end:
                return min(end, until)
        return pos

    def want(self, pos: int) -> bool:
        """A reader waits at ``pos``; True when nobody is on it and it was noted for the next free connection."""
        if self.size is None or pos >= self.size or pos in self.wanted:
            return False
        if not any(start <= pos < end for start, end in self.unclaimed()):
            return False  # in hand, or a running claim will get there
        self.wanted.append(pos)
        return True

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
        self.listener.on_data(start, data, peer.url)
        if self.runs_file is not None and time.monotonic() - self._saved >= SAVE_EVERY:
            self.save()

    def complete(self) -> bool:
        return self.size is not None and self.have.covered() >= self.size

    def forget(self, peer: Peer | None) -> None:
        """Drop every byte ``peer`` wrote: they will be fetched again."""
        keep = [(a, b, p) for a, b, p in self.pieces if p is not peer]
        self.pieces = keep
        self.have = Runs([(a, b) for a, b, _ in keep])
        self.listener.on_lost(self.have.covered())
        self.save()

    def reset(self) -> None:
        self.pieces = []
        self.have = Runs()
        self.listener.on_lost(0)
        self.save()

    def runs_of(self, peer: Peer | None) -> list[tuple[int, int]]:
        return Runs([(a, b) for a, b, p in self.pieces if p is peer]).runs  # type: ignore[return-value]

    def save(self) -> None:
        if self.runs_file is None:
            return
        tmp = self.runs_file.with_suffix(".runs-tmp")
        tmp.write_text(json.dumps({"size": self.size, "runs": self.have.runs}))
        os.replace(tmp, self.runs_file)
        self._saved = time.monotonic()

    def commit(self) -> None:
        """The bytes verified (or the job needs no check): make them the blob. The default keeps the file."""
