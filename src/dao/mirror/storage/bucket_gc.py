"""The bucket's own collection, for ``dao mirror gc --storage``: its blobs, manifests, tag records and
origins through the Protocols :class:`~dao.mirror.eviction.Collector` works with, so the bucket is collected
by the same reference-aware rules as a node's disk."""

from __future__ import annotations

import json
import time

from dao.mirror.storage.base import ManifestRecord, Stored
from dao.mirror.storage.bucket import Bucket
from dao.oci.digest import Digest, DigestError
from dao.oci.manifest import descriptors


def _digest_of(bucket: Bucket, key: str, kind: str) -> str | None:
    """``sha256:<hex>`` of a ``PREFIX/<kind>/sha256/<hex>`` key; None for anything else."""
    rest = key[len(bucket.key(kind)) + 1 :]
    algorithm, _, encoded = rest.partition("/")
    try:
        return str(Digest.parse(f"{algorithm}:{encoded}"))
    except DigestError:
        return None


class BucketBlobs:
    """The bucket's blobs as eviction sees them (:class:`~dao.mirror.storage.base.BlobCollection`): a blob's
    last use is the newest of its upload and of the uses the nodes recorded under ``uses/``. Listing folds
    those records into one and removes the ones it folded in."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket

    async def listing(self) -> list[Stored]:
        uses = await self._uses()
        out = []
        for key, size, modified in await self.bucket.objects(self.bucket.key("blobs") + "/"):
            digest = _digest_of(self.bucket, key, "blobs")
            if digest is not None:
                out.append(Stored(digest, size, max(modified, uses.get(digest, 0.0))))
        return out

    async def _uses(self) -> dict[str, float]:
        records = await self.bucket.objects(self.bucket.key("uses") + "/")
        merged: dict[str, float] = {}
        for key, _, _ in records:
            found = await self.bucket.get_bytes(key)
            try:
                doc = json.loads(found[0]) if found is not None else {}
            except ValueError:
                doc = {}
            for digest, at in doc.items() if isinstance(doc, dict) else ():
                if isinstance(at, (int, float)):
                    merged[digest] = max(float(at), merged.get(digest, 0.0))
        if len(records) > 1:  # one object for all of them from now on
            await self.bucket.put_bytes(
                self.bucket.key("uses", f"merged-{int(time.time() * 1000)}.json"), json.dumps(merged).encode()
            )
            for key, _, _ in records:
                await self.bucket.delete(key)
        return merged

    def in_use(self) -> set[str]:
        return set()  # (nodes read what they hold on their own disks; a blob still in use was used lately)

    async def delete(self, digest: Digest) -> bool:
        await self.bucket.delete(self.bucket.key("blobs", digest.algorithm, digest.encoded))
        return True

    async def record_uses(self) -> None:
        return None

    async def spool_bytes(self) -> int:
        return 0

    async def free_bytes(self) -> int | None:
        return None


class BucketManifests:
    """The bucket's manifests and tag records, for eviction (only what it uses of a manifest store)."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket

    async def listing(self) -> list[Stored]:
        out = []
        for key, size, modified in await self.bucket.objects(self.bucket.key("manifests") + "/"):
            digest = _digest_of(self.bucket, key, "manifests")
            if digest is not None:
                out.append(Stored(digest, size, modified))
        return out

    async def references(self, digests: list[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for digest in digests:
            algorithm, _, encoded = digest.partition(":")
            found = await self.bucket.get_bytes(self.bucket.key("manifests", algorithm, encoded))
            try:
                out[digest] = [str(d.digest) for d in descriptors(found[0])] if found is not None else []
            except (ValueError, KeyError, TypeError):
                out[digest] = []
        return out

    async def delete(self, digests: set[str]) -> int:
        """These manifests and every tag record that resolves to one of them."""
        for digest in digests:
            algorithm, _, encoded = digest.partition(":")
            await self.bucket.delete(self.bucket.key("manifests", algorithm, encoded))
        for key in await self.bucket.keys(self.bucket.key("tags") + "/"):
            found = await self.bucket.get_bytes(key)
            record = ManifestRecord.from_json(found[0]) if found is not None else None
            if record is not None and str(record.digest) in digests:
                await self.bucket.delete(key)
        return len(digests)


class BucketOrigins:
    """Only what eviction asks of the origins: forgetting a digest that left the bucket."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket

    async def forget(self, digest: str) -> None:
        algorithm, _, encoded = digest.partition(":")
        for key in await self.bucket.keys(self.bucket.key("origins", algorithm, encoded) + "/"):
            await self.bucket.delete(key)
