"""S3-compatible object storage under the filesystem stores: the bucket is what every mirror node shares,
and each node's data directory becomes a cache in front of it (``docs/mirror.md``, "Scale-out").

Layout in the bucket, under ``PREFIX/``:

    blobs/sha256/<hex>                    verified blobs (uploaded after the digest checked, never before)
    manifests/sha256/<hex>                manifest bodies, their media type as the object's Content-Type
    tags/<upstream>/<repo>/<tag>/<accept-key>.json
    origins/sha256/<hex>/<registry>/<repository>/<0|1>   empty objects: where a digest was seen

The bucket and its client are :mod:`.bucket`; ``dao mirror gc --storage`` collects it with :mod:`.bucket_gc`.

A node reads its local copy first and the bucket on a local miss: the bucket's copy is then a source of the
node's one fetch of that blob (:class:`~.bucket.BucketSource`), streamed to every client that asks while it fills the
node's disk, and checked against its digest like any fetch (a damaged object is never committed, and its
readers' connections are cut before the last byte). Eviction (``--max-size``)
bounds the local copy only; the bucket keeps everything. A bucket that cannot be written leaves a blob on
the node's own disk, served from there, and the failure is logged: the node degrades to what a single node
is.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from dao.mirror.storage.base import LocalBlob, ManifestRecord, Origin, Stored
from dao.mirror.storage.bucket import FAILURES, Bucket, BucketSource
from dao.mirror.storage.filesystem import FilesystemBlobStore, FilesystemManifestStore, FilesystemOrigins
from dao.oci.digest import Digest

log = logging.getLogger("dao.mirror.s3")

MAX_RECORDS = 100_000  # tag records a node keeps in memory
REDIRECT_TTL = 600  # seconds a presigned URL works: enough for a slow client to start, short enough to expire


class TieredBlobStore(FilesystemBlobStore):
    """The node's filesystem store, with the bucket under it. With ``redirect``, a blob only the bucket has is
    not fetched to the node: :meth:`redirect_url` answers for it instead."""

    def __init__(self, root: Path, bucket: Bucket, *, redirect: bool = False, redirect_base: str = "") -> None:
        super().__init__(root)
        self.bucket = bucket
        self.redirect, self.redirect_base = redirect, redirect_base.rstrip("/")
        self._uses: dict[str, float] = {}  # digest -> last use here, for the bucket's collector
        self._node = os.urandom(6).hex()

    def note_use(self, digest: Digest) -> None:
        self._uses[str(digest)] = time.time()

    async def open(self, digest: Digest) -> LocalBlob | None:
        blob = await super().open(digest)
        if blob is not None:
            self.note_use(digest)
        return blob

    async def record_uses(self) -> None:
        await super().record_uses()
        await self._push_uses()

    async def listing(self) -> list[Stored]:
        await self._push_uses()  # (eviction lists instead of recording when it has limits to keep)
        return await super().listing()

    async def _push_uses(self) -> None:
        """The blobs this node served since the last call, as one object under ``uses/`` (one PUT per node
        per collector interval, never one per hit), for ``dao mirror gc --storage``."""
        if not self._uses:
            return
        uses, self._uses = self._uses, {}
        key = self.bucket.key("uses", f"{self._node}-{int(time.time() * 1000)}.json")
        try:
            await self.bucket.put_bytes(key, json.dumps(uses).encode(), "application/json")
        except FAILURES as exc:
            log.warning("bucket: the blobs' last uses kept for the next try: %s", exc)
            for digest, at in uses.items():
                self._uses[digest] = max(at, self._uses.get(digest, 0.0))

    async def redirect_url(self, digest: Digest) -> tuple[str, int] | None:
        """A presigned URL of the bucket's copy (on the CDN, with ``redirect_base``) and its size; None when
        redirects are off or the bucket has no such blob."""
        if not self.redirect:
            return None
        try:
            found = await self.bucket.head(self._key(digest))
            if found is None:
                return None
            url = await self.bucket.presign(self._key(digest), REDIRECT_TTL)
        except FAILURES as exc:
            log.warning("bucket: cannot redirect to %s: %s", digest, exc)
            return None
        self.note_use(digest)
        if self.redirect_base:
            split = urlsplit(url)
            url = f"{self.redirect_base}{split.path}" + (f"?{split.query}" if split.query else "")
        return url, int(found["ContentLength"])

    def _key(self, digest: Digest) -> str:
        return self.bucket.key("blobs", digest.algorithm, digest.encoded)

    async def stat(self, digest: Digest) -> int | None:
        local = await super().stat(digest)
        if local is not None:
            return local
        found = await self._head(digest)
        return None if found is None else int(found["ContentLength"])

    async def source(self, digest: Digest) -> BucketSource | None:
        """The bucket's copy as a source for the node's fetch (streamed to clients while it fills the node's
        disk, checked against its digest like any fetch); None when the bucket lacks it or cannot say."""
        found = await self._head(digest)
        if found is None:
            return None
        self.note_use(digest)
        return BucketSource(self.bucket, self._key(digest))

    async def _head(self, digest: Digest) -> dict[str, Any] | None:
        """The bucket's object of ``digest``; None when it has none or cannot say (logged)."""
        try:
            return await self.bucket.head(self._key(digest))
        except FAILURES as exc:
            log.warning("bucket: cannot look up %s: %s", digest, exc)
            return None

    async def commit_local(self, digest: Digest, spool_path: Path) -> None:
        """A blob read from the bucket (or from another node, which puts it there): onto this node's disk only."""
        await super().commit(digest, spool_path)

    async def commit(self, digest: Digest, spool_path: Path) -> None:
        """Verified (the caller checked the digest): up to the bucket, then into the node's store."""
        try:
            await self.bucket.put_file(self._key(digest), spool_path)
        except FAILURES as exc:
            log.warning("bucket: %s kept on this node only: %s", digest, exc)
        await super().commit(digest, spool_path)

    # delete, listing and the rest stay the node's: eviction bounds its disk, the bucket keeps every blob.


class TieredManifestStore(FilesystemManifestStore):
    """Manifests and tag records in the bucket, so any node answers for any tag; a local copy of each body.

    ``fresh_for`` (the mirror's tag TTL): a tag record read from the bucket is kept in memory until it is due
    (``checked_at + fresh_for``). No node re-validates a tag before then, so nothing newer can be in the
    bucket meanwhile, and a hot tag costs one bucket read per TTL, not one per request."""

    def __init__(self, root: Path, bucket: Bucket, fresh_for: float = 0.0) -> None:
        super().__init__(root)
        self.bucket = bucket
        self.fresh_for = fresh_for
        self._records: dict[str, ManifestRecord] = {}

    def _key(self, digest: Digest) -> str:
        return self.bucket.key("manifests", digest.algorithm, digest.encoded)

    def _tag_key(self, upstream: str, repo: str, tag: str, accept_key: str) -> str:
        return self.bucket.key("tags", quote(upstream, safe=""), repo, tag, f"{accept_key}.json")

    async def get(self, digest: Digest) -> tuple[bytes, str] | None:
        local = await super().get(digest)
        if local is not None:
            return local
        try:
            found = await self.bucket.get_bytes(self._key(digest))
        except FAILURES as exc:
            log.warning("bucket: cannot read manifest %s: %s", digest, exc)
            return None
        if found is None or Digest.of(found[0], digest.algorithm) != digest:
            return None
        await super().put(digest, *found)
        return found

    async def put(self, digest: Digest, body: bytes, media_type: str) -> None:
        try:
            await self.bucket.put_bytes(self._key(digest), body, media_type)
        except FAILURES as exc:
            log.warning("bucket: manifest %s kept on this node only: %s", digest, exc)
        await super().put(digest, body, media_type)

    async def get_tag(self, upstream: str, repo: str, tag: str, accept_key: str) -> ManifestRecord | None:
        """The bucket's record (another node may have checked the tag since); this node's when it is down."""
        key = self._tag_key(upstream, repo, tag, accept_key)
        known = self._records.get(key)
        if known is not None and time.time() < known.checked_at + self.fresh_for:
            return known
        try:
            found = await self.bucket.get_bytes(key)
        except FAILURES as exc:
            log.warning("bucket: cannot read a tag record: %s", exc)
            return await super().get_tag(upstream, repo, tag, accept_key)
        if found is None:
            return await super().get_tag(upstream, repo, tag, accept_key)
        record = ManifestRecord.from_json(found[0])
        self._remember(key, record)
        return record

    def _remember(self, key: str, record: ManifestRecord | None) -> None:
        if record is None or self.fresh_for <= 0:
            return
        if len(self._records) >= MAX_RECORDS:
            self._records.clear()  # (a crude bound: they are all one bucket read away)
        self._records[key] = record

    async def put_tag(self, upstream: str, repo: str, tag: str, accept_key: str, record: ManifestRecord) -> None:
        self._remember(self._tag_key(upstream, repo, tag, accept_key), record)
        try:
            await self.bucket.put_bytes(
                self._tag_key(upstream, repo, tag, accept_key), record.to_json(), "application/json"
            )
        except FAILURES as exc:
            log.warning("bucket: a tag record kept on this node only: %s", exc)
        await super().put_tag(upstream, repo, tag, accept_key, record)

    async def listing(self) -> list[Stored]:
        return await super().listing()


class TieredOrigins(FilesystemOrigins):
    """Where each digest was seen, in the bucket as empty objects (S3 has no append), and on the node."""

    def __init__(self, root: Path, bucket: Bucket) -> None:
        super().__init__(root)
        self.bucket = bucket

    def _prefix(self, digest: Digest) -> str:
        return self.bucket.key("origins", digest.algorithm, digest.encoded) + "/"

    async def origins(self, digest: Digest) -> set[Origin]:
        known = await super().origins(digest)
        if known:
            return known
        try:
            keys = await self.bucket.keys(self._prefix(digest))
        except FAILURES as exc:
            log.warning("bucket: cannot read the origins of %s: %s", digest, exc)
            return known
        for key in keys:
            rest = key[len(self._prefix(digest)) :]
            registry, _, tail = rest.partition("/")
            repository, _, flag = tail.rpartition("/")
            if registry and repository:
                known.add(Origin(unquote(registry), repository, flag == "1"))
        return known

    async def add_origin(self, digest: Digest, origin: Origin) -> None:
        if origin in await self.origins(digest):
            return
        key = self._prefix(digest) + f"{quote(origin.registry, safe='')}/{origin.repository}/{int(origin.credentialed)}"
        try:
            await self.bucket.put_bytes(key, b"")
        except FAILURES as exc:
            log.warning("bucket: an origin of %s kept on this node only: %s", digest, exc)
        await super().add_origin(digest, origin)
