"""Ranking the sources before a pull (a quick ``GET /v2/`` to each mirror, at once, fastest first) and
choosing one for each chunk while it runs (measured speed, open connections, dropped or not).

A mirror that does not answer within the probe timeout is left out of this pull (with a warning) instead of
costing a timeout on every blob; the registry itself is never probed away, it stays the last resort. Any
HTTP answer counts as alive (a 401 is a registry asking for a token).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dao.oci.digest import Digest
from dao.oci.reference import DOCKER_HUB_DOMAIN
from dao.pull.plan import Source
from dao.registry.errors import RegistryClientError

PROBE_TIMEOUT = 3.0
LATENCY_STEP = 0.05  # seconds: closer than this counts as equally fast
RATE_MIN_BYTES = 64 * 1024  # a chunk smaller than this says more about latency than about speed
RATE_WEIGHT = 0.4  # of the newest chunk's speed in the smoothed rate


async def rank(
    sources: list[Source],
    warn: Callable[[str], None],
    probe_timeout: float = PROBE_TIMEOUT,
    registry: str = DOCKER_HUB_DOMAIN,
) -> list[Source]:
    """Mirrors that answer, fastest first, then the registry itself. For an image of ``registry`` other than
    Docker Hub, only mirrors that say they route ``?ns=`` are kept: any other mirror would answer with Docker
    Hub's image of the same name (docker, too, sends only Docker Hub images to its mirrors)."""
    mirrors = [s for s in sources if s.mirror]
    others = [s for s in sources if not s.mirror]

    async def probe(source: Source) -> float | None:
        started = time.monotonic()
        try:
            async with asyncio.timeout(probe_timeout):
                answer = await source.client.ping()
        except (RegistryClientError, TimeoutError) as exc:
            warn(f"mirror {source.url} does not answer ({exc.__class__.__name__}); not using it for this pull")
            return None
        if registry != DOCKER_HUB_DOMAIN and not answer.namespaces:
            warn(f"mirror {source.url} cannot say which registry it serves; not using it for {registry} images")
            return None
        return time.monotonic() - started

    latencies = await asyncio.gather(*(probe(s) for s in mirrors))
    # Faster first, but latencies within one step of each other keep the order the user gave.
    alive = sorted((int(lat / LATENCY_STEP), i) for i, lat in enumerate(latencies) if lat is not None)
    return [mirrors[i] for _, i in alive] + others


@dataclass(eq=False)
class Peer:
    """A source as one pull sees it while it runs: how fast its connections deliver, how many are open, and
    whether it is still trusted."""

    source: Source
    rank: int  # the probe's order: breaks ties before anything is measured
    rate: float | None = None  # bytes/s of one connection, smoothed over its finished chunks
    active: int = 0  # connections open now
    failures: int = 0  # consecutive chunks that brought no byte
    out: str | None = None  # why it was dropped for the rest of the pull
    lied: bool = False  # dropped for sending bytes that did not match a digest
    proven: int = 0  # blobs it wrote bytes of that verified
    cap: int | None = None  # its own connection limit, lowered when some of its streams stall while others flow
    last_byte: float = 0.0  # monotonic time it last delivered a byte, on any connection
    ranges: bool = True  # False once it answered a Range with the whole blob
    missing: set[Digest] = field(default_factory=set)  # blobs it answered 404 for

    @property
    def url(self) -> str:
        return self.source.url

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
    mirrors = [p for p in usable if p.source.mirror]
    free = [p for p in mirrors or usable if p.active < min(cap, p.cap or cap)]
    if not free:
        return None
    unknown = [p for p in free if p.rate is None and p.active == 0]
    if unknown:
        return min(unknown, key=lambda p: p.rank)
    return max(free, key=lambda p: (p.rate or 0.0, -p.rank))


def can_serve(peers: list[Peer], digest: Digest) -> bool:
    return any(p.out is None and digest not in p.missing for p in peers)
