"""Ranking the sources before a pull: a quick ``GET /v2/`` to each mirror, at once, fastest first (choosing
one for each chunk while the pull runs is the transfer's: :func:`dao.transfer.sources.pick`).

A mirror that does not answer within the probe timeout is left out of this pull (with a warning) instead of
costing a timeout on every blob; the registry itself is never probed away, it stays the last resort. Any
HTTP answer counts as alive (a 401 is a registry asking for a token).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from dao.oci.reference import DOCKER_HUB_DOMAIN
from dao.pull.plan import Source
from dao.registry.errors import RegistryClientError
from dao.transfer.sources import Peer

PROBE_TIMEOUT = 3.0
LATENCY_STEP = 0.05  # seconds: closer than this counts as equally fast


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


def peers(sources: list[Source]) -> list[Peer]:
    """The sources as a transfer sees them, in this order."""
    return [
        Peer(s.url, lambda blob, client=s.client: client.blob_source(blob.repo, blob.digest), i, mirror=s.mirror)
        for i, s in enumerate(sources)
    ]
