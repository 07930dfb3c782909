"""An index's child manifests, fetched into the cache behind the client's back when it pulls the index, so
that another platform (or the same one, by digest) pulls when the upstream is gone."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from dao.aio import gather_bounded
from dao.mirror.errors import MirrorError
from dao.mirror.storage.base import ManifestStore
from dao.oci.digest import Digest
from dao.oci.manifest import DEFAULT_ACCEPT, MANIFEST_TYPES, Descriptor, descriptors

log = logging.getLogger("dao.mirror.proxy")

CHILD_FETCHES = 4
MAX_CHILDREN = 64  # child manifests fetched behind a client's back for one index (real ones list up to ~40)

Fetch = Callable[[str, str, tuple[str, ...]], Awaitable[object]]  # (repo, reference, accept); raises MirrorError


class Children:
    def __init__(self, manifests: ManifestStore, fetch: Fetch) -> None:
        self.manifests, self.fetch = manifests, fetch
        self.complete: set[Digest] = set()  # indexes whose children are all cached

    async def cache(self, repo: str, index: Digest, body: bytes) -> None:
        """Fetch every child manifest of ``index`` not cached yet (up to ``MAX_CHILDREN``)."""
        try:
            children = [d for d in descriptors(body) if d.media_type in MANIFEST_TYPES or not d.media_type]
        except ValueError as exc:
            log.warning("index %s is not readable, children not cached: %s", index, exc)
            return
        if len(children) > MAX_CHILDREN:
            log.warning("index %s lists %d manifests: caching the first %d", index, len(children), MAX_CHILDREN)
            children = children[:MAX_CHILDREN]
        missing = [c for c in children if await self.manifests.get(c.digest) is None]

        async def one(child: Descriptor) -> bool:
            accept = (child.media_type,) if child.media_type else DEFAULT_ACCEPT
            try:
                await self.fetch(repo, str(child.digest), accept)
            except MirrorError as exc:
                log.warning("child manifest %s of %s not cached: %s", child.digest, index, exc.message)
                return False
            return True

        if all(await gather_bounded(missing, one, CHILD_FETCHES)):
            self.complete.add(index)
