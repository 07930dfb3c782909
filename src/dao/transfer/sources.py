"""What a transfer reads from -- a registry, a mirror, one day a peer node -- and how one transfer sees each
source while it runs: how fast its connections deliver, how many are open, whether it is still trusted.

Choosing a source for the next chunk (:func:`pick`): mirrors before the registry, the unmeasured first, then
the fastest with a free connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from dao.oci.digest import Digest
from dao.registry.errors import UpstreamRateLimited, UpstreamUnavailable

# Failures after which asking again, from where we stopped, may well work.
RESUMABLE = (UpstreamUnavailable, UpstreamRateLimited, TimeoutError)

RATE_MIN_BYTES = 64 * 1024  # a chunk smaller than this says more about latency than about speed
RATE_WEIGHT = 0.4  # of the newest chunk's speed in the smoothed rate


class Body(Protocol):
    """A blob response being read.

    ``offset``: where in the blob its first byte belongs (0 when a requested range was ignored);
    ``end``: exclusive end of the bytes it carries, when known (``Content-Range`` last + 1, or the length);
    ``size``: the whole blob's size when the source said (``Content-Range`` total or ``Content-Length``).
    ``chunks`` raises a :data:`RESUMABLE` error when the connection breaks.
    """

    offset: int
    end: int | None
    size: int | None

    def chunks(self) -> AsyncIterator[bytes]: ...


class BlobSource(Protocol):
    """One blob at one source."""

    def open(self, start: int = 0, end: int | None = None) -> AbstractAsyncContextManager[Body]:
        """A response for bytes ``start``..``end`` (inclusive; None = to the end); no Range header for 0-."""
        ...


class Blob(Protocol):
    """What a source needs to know to find a blob."""

    digest: Digest
    repo: str


@dataclass(eq=False)
class Peer:
    """A source as one transfer sees it."""

    url: str
    blob: Callable[[Blob], BlobSource]  # the blob at this source
    rank: int = 0  # the caller's order (a probe's, the user's): breaks ties before anything is measured
    mirror: bool = False  # a mirror: preferred, and dropped on failure while the registry remains
    rate: float | None = None  # bytes/s of one connection, smoothed over its finished chunks
    active: int = 0  # connections open now
    failures: int = 0  # consecutive requests that brought no byte
    out: str | None = None  # why it was dropped for the rest of the transfer
    lied: bool = False  # dropped for sending bytes that did not match a digest
    proven: int = 0  # blobs it wrote bytes of that verified
    cap: int | None = None  # its own connection limit, lowered when some of its streams stall while others flow
    last_byte: float = 0.0  # monotonic time it last delivered a byte, on any connection
    ranges: bool | None = None  # True once it honoured a Range, False once it ignored or refused one
    missing: set[Digest] = field(default_factory=set)  # blobs it answered 404 for
    last_error: BaseException | None = None  # what its latest failed request raised

    def measured(self, nbytes: int, seconds: float) -> None:
        if nbytes < RATE_MIN_BYTES or seconds <= 0:
            return  # too little to say anything about the connection
        sample = nbytes / seconds
        self.rate = sample if self.rate is None else (1 - RATE_WEIGHT) * self.rate + RATE_WEIGHT * sample


def pick(peers: list[Peer], digest: Digest, cap: int, exclude: Peer | None = None) -> Peer | None:
    """The source for the next chunk of ``digest``: mirrors only while any can serve it (the registry itself
    is the last resort); an idle source not yet measured first, so each gets its chance; then the fastest one
    with a free connection (the unmeasured count as slowest: their first bytes measure them within a second)."""
    usable = [p for p in peers if p.out is None and digest not in p.missing and p is not exclude]
    mirrors = [p for p in usable if p.mirror]
    free = [p for p in mirrors or usable if p.active < min(cap, p.cap or cap)]
    if not free:
        return None
    unknown = [p for p in free if p.rate is None and p.active == 0]
    if unknown:
        return min(unknown, key=lambda p: p.rank)
    return max(free, key=lambda p: (p.rate or 0.0, -p.rank))


def can_serve(peers: list[Peer], digest: Digest) -> bool:
    return any(p.out is None and digest not in p.missing for p in peers)
