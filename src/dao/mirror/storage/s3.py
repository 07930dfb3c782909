"""S3-compatible object storage under the filesystem stores: the bucket is what every mirror node shares,
and each node's data directory becomes a cache in front of it (``docs/mirror.md``, "Scale-out").

Layout in the bucket, under ``PREFIX/``:

    blobs/sha256/<hex>                    verified blobs (uploaded after the digest checked, never before)
    manifests/sha256/<hex>                manifest bodies, their media type as the object's Content-Type
    tags/<upstream>/<repo>/<tag>/<accept-key>.json
    origins/sha256/<hex>/<registry>/<repository>/<0|1>   empty objects: where a digest was seen

The client is aiobotocore: it runs on the aiohttp the mirror already uses, signs with botocore's SigV4, and
reads the usual variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``).

A node reads its local copy first and the bucket on a local miss: the bucket's copy is then a source of the
node's one fetch of that blob (:class:`BucketSource`), streamed to every client that asks while it fills the
node's disk, and checked against its digest like any fetch (a damaged object is never committed, and its
readers' connections are cut before the last byte). Eviction (``--max-size``)
bounds the local copy only; the bucket keeps everything. A bucket that cannot be written leaves a blob on
the node's own disk, served from there, and the failure is logged: the node degrades to what a single node
is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aiohttp
from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from dao.errors import DaoError
from dao.mirror.storage.base import LocalBlob, ManifestRecord, Origin, Stored
from dao.mirror.storage.filesystem import FilesystemBlobStore, FilesystemManifestStore, FilesystemOrigins
from dao.oci.digest import Digest, DigestError
from dao.oci.manifest import descriptors
from dao.registry.blobs import parse_content_range
from dao.registry.errors import UpstreamNotFound, UpstreamUnavailable

log = logging.getLogger("dao.mirror.s3")

PART = 64 * 1024 * 1024  # blobs bigger than this go up in parts of this size (S3 allows at most 5 GiB in one PUT)
READ = 1024 * 1024
CONNECT_TIMEOUT = 3.0  # seconds: a bucket that does not answer must not hold a client's request for a minute
READ_TIMEOUT = 30.0
STATUS_EVERY = 5.0  # seconds between the bucket checks /readyz makes
STATUS_TIMEOUT = 2.0
REST = 5.0  # seconds the bucket is not asked after it failed a request
MAX_RECORDS = 100_000  # tag records a node keeps in memory
REDIRECT_TTL = 600  # seconds a presigned URL works: enough for a slow client to start, short enough to expire


class BucketError(DaoError):
    pass


@dataclass(frozen=True, slots=True)
class Location:
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> Location:
        split = urlsplit(url)
        if split.scheme != "s3" or not split.netloc:
            raise BucketError(f"{url!r}: give the storage as s3://BUCKET[/PREFIX]")
        prefix = split.path.strip("/")
        return cls(split.netloc, f"{prefix}/" if prefix else "")


class Bucket:
    """One long-lived S3 client on one bucket and prefix."""

    def __init__(
        self,
        location: Location,
        endpoint_url: str | None = None,
        *,
        region: str = "",
        access_key: str = "",
        secret_key: str = "",
    ) -> None:
        """Each of ``endpoint_url``, ``region`` and the keys: given (the settings), else the usual variable
        (``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``; the keys: botocore's own chain of variables and
        files)."""
        self.location = location
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self.region = region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self._keys = {"aws_access_key_id": access_key, "aws_secret_access_key": secret_key} if access_key else {}
        self._stack = contextlib.AsyncExitStack()
        self.client: Any = None
        self._checked = -STATUS_EVERY
        self._failed_at = -REST
        self.on_request: Callable[[str], None] | None = None
        self._status: str | None = None

    async def __aenter__(self) -> Bucket:
        session = get_session()
        config = Config(
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path"},
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
        )
        self.client = await self._stack.enter_async_context(
            session.create_client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self.region,
                config=config,
                **self._keys,
            )
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    def key(self, *parts: str) -> str:
        return self.location.prefix + "/".join(parts)

    async def check(self) -> None:
        """The bucket answers, with these credentials: said at start-up, not at the first miss."""
        try:
            await self.client.head_bucket(Bucket=self.location.bucket)
        except (ClientError, BotoCoreError, OSError) as exc:
            raise BucketError(f"cannot use bucket {self.location.bucket!r} at {self.endpoint_url}: {exc}") from None

    async def status(self) -> str | None:
        """None while the bucket answers (asked at most every few seconds), else what the node does without
        it: for ``/readyz``."""
        now = time.monotonic()
        if now - self._checked >= STATUS_EVERY:
            self._checked = now
            try:
                async with asyncio.timeout(STATUS_TIMEOUT):
                    await self.client.head_bucket(Bucket=self.location.bucket)
                self._status = None
                self._failed_at = -REST
            except (ClientError, BotoCoreError, OSError, TimeoutError) as exc:
                self._failed_at = time.monotonic()
                self._status = (
                    f"bucket {self.location.bucket} does not answer ({exc.__class__.__name__}): blobs on this "
                    "node's disk are served, others come from the upstream and stay on this node"
                )
        return self._status

    @contextlib.asynccontextmanager
    async def _asking(self, op: str) -> AsyncIterator[None]:
        """Every request: refused at once for ``REST`` seconds after the bucket failed one (so a bucket that
        is down costs each client request nothing, not a connect timeout per object), failures noted,
        counted by ``op`` (``on_request``: the metrics)."""
        if self.on_request is not None:
            self.on_request(op)
        if time.monotonic() - self._failed_at < REST:
            raise BucketError(f"bucket {self.location.bucket} failed a moment ago; not asked for {REST:.0f}s")
        try:
            yield
        except ClientError as exc:
            if _status(exc) >= 500 or _status(exc) == 0:
                self._failed_at = time.monotonic()
            raise
        except (BotoCoreError, OSError, TimeoutError):
            self._failed_at = time.monotonic()
            raise

    async def head(self, key: str) -> dict[str, Any] | None:
        try:
            async with self._asking("head"):
                return dict(await self.client.head_object(Bucket=self.location.bucket, Key=key))
        except ClientError as exc:
            if _status(exc) == 404:
                return None
            raise

    async def get_bytes(self, key: str) -> tuple[bytes, str] | None:
        try:
            async with self._asking("get"):
                got = await self.client.get_object(Bucket=self.location.bucket, Key=key)
                async with got["Body"] as body:
                    return await body.read(), str(got.get("ContentType") or "")
        except ClientError as exc:
            if _status(exc) == 404:
                return None
            raise

    async def get_range(self, key: str, start: int, end: int | None) -> dict[str, Any]:
        """``get_object`` of bytes ``start``..``end`` (inclusive; None: to the end), its body still to read."""
        extra = {"Range": f"bytes={start}-{'' if end is None else end}"} if start or end is not None else {}
        async with self._asking("get"):
            return dict(await self.client.get_object(Bucket=self.location.bucket, Key=key, **extra))

    async def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        async with self._asking("put"):
            await self.client.put_object(Bucket=self.location.bucket, Key=key, Body=data, ContentType=content_type)

    async def put_file(self, key: str, path: Path) -> None:
        async with self._asking("put"):
            await self._put_file(key, path)

    async def _put_file(self, key: str, path: Path) -> None:
        bucket = self.location.bucket
        with path.open("rb") as f:  # (opening is not I/O worth a thread; each read is)
            size = os.fstat(f.fileno()).st_size
            if size <= PART:
                await self.client.put_object(Bucket=bucket, Key=key, Body=await asyncio.to_thread(f.read))
                return
            upload = await self.client.create_multipart_upload(Bucket=bucket, Key=key)
            parts = []
            try:
                number = 1
                while piece := await asyncio.to_thread(f.read, PART):
                    done = await self.client.upload_part(
                        Bucket=bucket, Key=key, PartNumber=number, UploadId=upload["UploadId"], Body=piece
                    )
                    parts.append({"ETag": done["ETag"], "PartNumber": number})
                    number += 1
                await self.client.complete_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
                )
            except BaseException:
                with contextlib.suppress(ClientError, BotoCoreError, OSError):
                    await self.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
                raise

    async def presign(self, key: str, ttl: int) -> str:
        url = await self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.location.bucket, "Key": key}, ExpiresIn=ttl
        )
        return str(url)

    async def objects(self, prefix: str) -> list[tuple[str, int, float]]:
        """Every object under ``prefix``: key, size, last modified (wall-clock seconds)."""
        paginator = self.client.get_paginator("list_objects_v2")
        out = []
        async with self._asking("list"):
            async for page in paginator.paginate(Bucket=self.location.bucket, Prefix=prefix):
                out += [(i["Key"], int(i["Size"]), i["LastModified"].timestamp()) for i in page.get("Contents") or []]
        return out

    async def delete(self, key: str) -> None:
        async with self._asking("delete"):
            await self.client.delete_object(Bucket=self.location.bucket, Key=key)

    async def keys(self, prefix: str) -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        out = []
        async with self._asking("list"):
            async for page in paginator.paginate(Bucket=self.location.bucket, Prefix=prefix):
                out += [item["Key"] for item in page.get("Contents") or []]
        return out


class BucketBody:
    """An object's bytes as a transfer's :class:`~dao.transfer.sources.Body`."""

    def __init__(self, got: dict[str, Any]) -> None:
        self.got = got
        length = int(got.get("ContentLength") or 0)
        self.offset, self.end, self.size = 0, length, length
        if got.get("ContentRange"):
            first, last, self.size = parse_content_range(str(got["ContentRange"]))
            self.offset, self.end = first, last + 1

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            while chunk := await self.got["Body"].read(READ):
                yield chunk
        except (ClientError, BotoCoreError, OSError, aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable(f"bucket: the body broke: {exc}") from exc


class BucketSource:
    """One object as a source of a node's fetch: a miss of the node's disk that the bucket has."""

    def __init__(self, bucket: Bucket, key: str) -> None:
        self.bucket, self.key = bucket, key

    @contextlib.asynccontextmanager
    async def open(self, start: int = 0, end: int | None = None) -> AsyncIterator[BucketBody]:
        try:
            got = await self.bucket.get_range(self.key, start, end)
        except ClientError as exc:
            if _status(exc) == 404:
                raise UpstreamNotFound(f"bucket: {self.key} is gone") from exc
            raise UpstreamUnavailable(f"bucket: {exc}") from exc
        except (BotoCoreError, OSError, BucketError) as exc:
            raise UpstreamUnavailable(f"bucket: {exc}") from exc
        async with got["Body"]:
            yield BucketBody(got)


def bucket_of(config: Any) -> Bucket:
    """The bucket a mirror's settings name (``storage``, ``s3_endpoint``, ``s3_region``, the keys)."""
    return Bucket(
        Location.parse(config.storage),
        config.s3_endpoint or None,
        region=config.s3_region,
        access_key=config.s3_access_key,
        secret_key=config.s3_secret_key,
    )


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


FAILURES = (ClientError, BotoCoreError, OSError, BucketError)


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
        try:
            found = await self.bucket.head(self._key(digest))
        except FAILURES as exc:
            log.warning("bucket: cannot look up %s: %s", digest, exc)
            return None
        return None if found is None else int(found["ContentLength"])

    async def source(self, digest: Digest) -> BucketSource | None:
        """The bucket's copy as a source for the node's fetch (streamed to clients while it fills the node's
        disk, checked against its digest like any fetch); None when the bucket lacks it or cannot say."""
        try:
            found = await self.bucket.head(self._key(digest))
        except FAILURES as exc:
            log.warning("bucket: cannot look up %s: %s", digest, exc)
            return None
        if found is None:
            return None
        self.note_use(digest)
        return BucketSource(self.bucket, self._key(digest))

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


# -- the bucket's own collection (``dao mirror gc --storage``) ----------------------------------------------


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
