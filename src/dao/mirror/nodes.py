"""Reading a blob another mirror node is fetching (``--redis``; the leases are :mod:`dao.mirror.cluster`'s).

The node that holds a blob's lease serves its spool file, as it grows, at ``/_dao/blobs/<digest>`` to the
other nodes (signed with the cluster secret: see :func:`dao.mirror.app.node_blob`); their fetches read it
through :class:`NodeSource` and never wait for the commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

import aiohttp

from dao.oci.digest import Digest
from dao.registry.blobs import BlobBody
from dao.registry.body import read_errors
from dao.registry.errors import UpstreamNotFound, UpstreamUnavailable
from dao.transfer.sources import BlobSource, Body

if TYPE_CHECKING:
    from dao.mirror.cluster import Claim, Cluster

log = logging.getLogger("dao.mirror.cluster")

NODE_HEADER = "X-Dao-Node"  # the signature a node's internal endpoint wants
PEER_WAIT = 0.5  # seconds between looks at a lease whose holder does not answer


class NodeSource:
    """A blob another node is fetching, as a transfer's source: its bytes from that node's spool file; if
    that node goes away (or no longer has it), this node takes the lease and reads on from ``upstream`` (or
    from ``stored``, the bucket, when it is there by then) from the byte it had."""

    def __init__(
        self,
        cluster: Cluster,
        session: aiohttp.ClientSession,
        digest: Digest,
        claim: Claim,
        upstream: BlobSource,
        stored: Callable[[], Awaitable[BlobSource | None]],
    ) -> None:
        self.cluster, self.session, self.digest, self.claim = cluster, session, digest, claim
        self.upstream, self.stored = upstream, stored
        self.took_over = False

    @asynccontextmanager
    async def open(self, start: int = 0, end: int | None = None) -> AsyncIterator[Body]:
        deadline = time.monotonic() + self.cluster.lease_ttl + 2 * PEER_WAIT
        while True:
            if self.claim.mine:
                source = await self.stored() or self.upstream
                if not self.took_over:
                    self.took_over = True
                    log.warning(
                        "node %s gave up on %s: this node goes on from byte %d", self.claim.owner, self.digest, start
                    )
                async with source.open(start, end) as body:
                    yield body
                return
            opened = False
            try:
                async with self._from_node(start, end) as body:
                    opened = True
                    yield body
                return
            except (UpstreamUnavailable, UpstreamNotFound) as exc:
                if opened:
                    raise
                if time.monotonic() > deadline:
                    raise UpstreamUnavailable(
                        f"node {self.claim.owner} holds {self.digest} and does not serve it: {exc}"
                    ) from exc
                log.info(
                    "node %s does not serve %s (%s): looking at its lease again", self.claim.owner, self.digest, exc
                )
            await asyncio.sleep(PEER_WAIT)
            self.claim = await self.cluster.claim(self.digest)

    def _from_node(self, start: int, end: int | None) -> AbstractAsyncContextManager[Body]:
        url = f"{self.claim.owner}/_dao/blobs/{self.digest}"
        return signed_get(self.session, url, {NODE_HEADER: self.cluster.sign(self.digest)}, start, end, "node")


@asynccontextmanager
async def signed_get(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], start: int, end: int | None, who: str
) -> AsyncIterator[Body]:
    """A blob from another dao (a node of the cluster, a peer host) that wants a signature in ``headers``;
    its 404 (not there) as :class:`UpstreamNotFound`, any other failure as :class:`UpstreamUnavailable`."""
    if start or end is not None:
        headers = {**headers, "Range": f"bytes={start}-{'' if end is None else end}"}
    where = f"{who} {url.split('/_dao/', 1)[0]}"
    try:
        async with session.get(url, headers=headers, allow_redirects=False) as resp:
            if resp.status == 404:
                raise UpstreamNotFound(f"{where} does not have it")
            if resp.status not in (200, 206):
                raise UpstreamUnavailable(f"{where} answered {resp.status}")
            yield BlobBody(resp)
    except read_errors() as exc:
        raise UpstreamUnavailable(f"{where}: {exc.__class__.__name__}: {exc}") from exc
