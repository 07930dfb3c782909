"""Blob responses as a transfer reads them: where a response starts and ends, the blob's size, its bytes
in chunks (a broken connection becomes a resumable error)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import aiohttp

from dao.oci.digest import Digest
from dao.registry.body import read_errors
from dao.registry.errors import UpstreamUnavailable

if TYPE_CHECKING:
    from dao.registry.client import RegistryClient

BLOB_CHUNK = 256 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class BlobBody:
    """One blob response as a :class:`dao.transfer.sources.Body`: where it starts and ends, the blob's size."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.offset = 0
        self.size: int | None = resp.content_length
        self.end: int | None = resp.content_length
        if resp.status == 206:
            self.offset, last, self.size = parse_content_range(resp.headers.get("Content-Range", ""))
            self.end = last + 1

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.resp.content.iter_chunked(BLOB_CHUNK):
                yield chunk
        except read_errors() as exc:
            raise UpstreamUnavailable(f"upstream body broke: {exc.__class__.__name__}: {exc}") from exc


class BlobSource:
    def __init__(self, client: RegistryClient, repo: str, digest: Digest) -> None:
        self.client, self.repo, self.digest = client, repo, digest

    @asynccontextmanager
    async def open(self, start: int = 0, end: int | None = None) -> AsyncIterator[BlobBody]:
        async with self.client.blob(self.repo, self.digest, start=start, end=end) as resp:
            yield BlobBody(resp)


def parse_content_range(value: str) -> tuple[int, int, int | None]:
    """``bytes first-last/total`` -> (first, last, total or None for ``*``); raises UpstreamUnavailable if
    garbled or impossible."""
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if match is None or len(match[1]) > 19 or len(match[2]) > 19 or len(match[3]) > 19:
        raise UpstreamUnavailable(f"upstream sent 206 with a bad Content-Range: {value[:100]!r}")
    first, last = int(match[1]), int(match[2])
    total = None if match[3] == "*" else int(match[3])
    if last < first or (total is not None and last >= total):
        raise UpstreamUnavailable(f"upstream sent 206 with an impossible Content-Range: {value[:100]!r}")
    return first, last, total
