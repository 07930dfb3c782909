"""One S3-compatible bucket, as the mirror's storage uses it: aiobotocore's client (it runs on the aiohttp
the mirror already uses and signs with botocore's SigV4), the usual variables or the mirror's settings for
the endpoint, region and keys, a short rest after a failure, the requests counted, and an object as the
source of a node's fetch (:class:`BucketSource`). The stores on top are :mod:`.s3`; the bucket's own
collection is :mod:`.bucket_gc`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from dao.errors import DaoError
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
