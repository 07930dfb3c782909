"""One blob of a pull while it is fetched: its partial file, which byte runs are written and by whom, and the
claims (byte ranges given to a source) running on it."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dao.oci.manifest import Descriptor
from dao.pull.cache import BlobCache
from dao.pull.route import Peer
from dao.registry.runs import Runs

SAVE_EVERY = 0.5  # seconds between saves of a partial blob's written runs


# Bytes of the blob now in hand (it can go down when bad bytes are dropped) and where the latest came from
# (a source's URL; "cache" for the local content cache).
Progress = Callable[[int, str], None]


@dataclass(eq=False)
class Claim:
    """A byte range [start, end) being fetched; ``pos``: the first byte of it nobody has written yet."""

    blob: PartialBlob
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


class PartialBlob:
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
        self.claims: list[Claim] = []
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
