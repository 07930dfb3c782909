"""Where a blob that nobody on this node fetches yet is read from: the bucket when it has it (``--storage``),
the node that holds the blob's lease when another one fetches it (``--redis``: see :mod:`.cluster` and
:mod:`.nodes`), else the upstream, this node then holding the lease. :class:`~.proxy.Proxy` asks before it
starts a fetch; what it gets says the source, what becomes of the verified bytes, and how many connections.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from dao.mirror.nodes import NodeSource
from dao.oci.digest import Digest
from dao.transfer.download import upstream_policy
from dao.transfer.schedule import Policy
from dao.transfer.sources import BlobSource, Peer

if TYPE_CHECKING:
    from dao.mirror.cluster import Cluster

Check = Callable[[], Awaitable[None]]  # raises a MirrorError when the answer is no


@dataclass(frozen=True, slots=True)
class FetchPlan:
    """Where a new fetch reads and what becomes of its bytes."""

    source: BlobSource
    on_bytes: Callable[[int], None] | None = None  # counts upstream bytes (the upstream's fetches only)
    commit: Callable[[Digest, Path], Awaitable[None]] | None = None  # None: the store's (up to the bucket too)
    kind: str = "upstream"
    policy: Policy | None = None
    sources: list[Peer] | None = None  # the local accelerator's: read from all of them at once, in place of source

    @property
    def reads(self) -> BlobSource | list[Peer]:
        return self.sources if self.sources is not None else self.source


class Planner:
    def __init__(self, blobs: Any, cluster: Cluster | None, session: aiohttp.ClientSession) -> None:
        """``blobs``: the node's blob store; a tiered one (``source``, ``commit_local``) has a bucket under it."""
        self.blobs, self.cluster, self.session = blobs, cluster, session
        self._source = getattr(blobs, "source", None)
        self._commit_local = getattr(blobs, "commit_local", None)  # (the node that fetches puts it in the bucket)

    async def bucket_source(self, digest: Digest) -> BlobSource | None:
        return await self._source(digest) if self._source is not None else None

    async def plan(self, digest: Digest, upstream: FetchPlan, confirm: Check, may_ask_upstream: Check) -> FetchPlan:
        """``confirm``: that the blob may be served through the client's repository; ``may_ask_upstream``:
        that the upstream may be asked (no remembered 404, circuit closed)."""
        stored = await self._stored(digest, confirm)
        if stored is not None:
            return stored
        await may_ask_upstream()
        if self.cluster is None:
            return upstream
        claim = await self.cluster.claim(digest)
        if not claim.mine:
            await confirm()
            node = NodeSource(
                self.cluster, self.session, digest, claim, upstream.source, lambda: self.bucket_source(digest)
            )
            return FetchPlan(node, None, self._commit_local, "node", upstream_policy(1))
        stored = await self._stored(digest, confirm)  # committed by another node between the look and the lease
        if stored is not None:
            await self.cluster.release(digest)
            return stored
        return upstream

    async def _stored(self, digest: Digest, confirm: Check) -> FetchPlan | None:
        """The bucket's copy as the source of this node's fetch, or None."""
        found = await self.bucket_source(digest)
        if found is None:
            return None
        await confirm()
        return FetchPlan(found, None, self._commit_local, "bucket")
