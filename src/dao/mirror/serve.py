"""Putting blob bytes on the wire: ``Range`` parsing, ``sendfile`` for committed blobs, streaming for fetches.

Headers are the registry's: ``Docker-Content-Digest`` and ``ETag`` are the digest, ``Accept-Ranges: bytes``.
A stream that fails after the headers went out is cut (transport closed) so the client sees a body shorter
than ``Content-Length`` -- never a clean, short 200.
"""

from __future__ import annotations

import asyncio
import os
import re

from aiohttp import web

from dao.mirror.inflight import Fetch, FetchFailed
from dao.mirror.storage.base import LocalBlob
from dao.oci.digest import Digest
from dao.oci.errors import ErrorCode, RegistryError

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
SENDFILE_FALLBACK_CHUNK = 256 * 1024


def parse_range(header: str | None, size: int | None) -> tuple[int, int | None] | None:
    """``(start, end)`` inclusive for a single-range ``Range`` header; None when absent.

    ``end`` is None only for an open range (``start-``) on a blob whose size is not known yet.

    Raises RANGE_INVALID (416) for malformed, multi-range or unsatisfiable ranges. With ``size`` unknown
    only ``start-end`` and ``start-`` forms are accepted.
    """
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None or (not match[1] and not match[2]):
        raise _range_error(size, f"unsupported Range header: {header[:100]!r}")
    first, last = match[1], match[2]
    if not first:  # suffix: the last N bytes
        if size is None:
            raise _range_error(size, "suffix range on a blob of unknown size")
        n = int(last)
        if n == 0:
            raise _range_error(size, "empty suffix range")
        return max(size - n, 0), size - 1
    start = int(first)
    end = int(last) if last else (size - 1 if size is not None else None)
    if end is not None and end < start:
        raise _range_error(size, "range end before start")
    if size is not None:
        if start >= size:
            raise _range_error(size, f"range starts beyond the blob's {size} bytes")
        end = min(end if end is not None else size - 1, size - 1)
    return start, end


def _range_error(size: int | None, message: str) -> RegistryError:
    headers = {"Content-Range": f"bytes */{size}"} if size is not None else {}
    return RegistryError(ErrorCode.RANGE_INVALID, message, headers=headers)


def blob_headers(resp: web.StreamResponse, digest: Digest) -> None:
    resp.headers["Docker-Content-Digest"] = str(digest)
    resp.headers["ETag"] = f'"{digest}"'
    resp.headers["Accept-Ranges"] = "bytes"
    resp.content_type = "application/octet-stream"


def _window(request: web.Request, resp: web.StreamResponse, size: int | None) -> tuple[int, int | None]:
    """Apply the request's Range to ``resp``; returns (start, inclusive end or None when size unknown)."""
    wanted = parse_range(request.headers.get("Range"), size)
    if wanted is None:
        if size is not None:
            resp.content_length = size
        return 0, None if size is None else size - 1
    start, end = wanted
    resp.set_status(206)
    if end is not None:
        resp.content_length = end - start + 1
        resp.headers["Content-Range"] = f"bytes {start}-{end}/{size if size is not None else '*'}"
        return start, end
    return start, None


async def send_local(request: web.Request, digest: Digest, blob: LocalBlob) -> web.StreamResponse:
    """Serve a committed blob with zero-copy ``sendfile``; closes ``blob``."""
    try:
        resp = web.StreamResponse()
        blob_headers(resp, digest)
        start, end = _window(request, resp, blob.size)
        count = (end - start + 1) if end is not None else 0
        await resp.prepare(request)
        if request.method == "HEAD" or count == 0:
            await resp.write_eof()
            return resp
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("client went away")
        with os.fdopen(os.dup(blob.fd), "rb") as f:
            loop = asyncio.get_running_loop()
            try:
                await loop.sendfile(transport, f, start, count)
            except NotImplementedError:
                await _copy_fallback(resp, blob.fd, start, count)
        await resp.write_eof()
        return resp
    finally:
        blob.close()


async def _copy_fallback(resp: web.StreamResponse, fd: int, start: int, count: int) -> None:
    pos, stop = start, start + count
    while pos < stop:
        chunk = os.pread(fd, min(SENDFILE_FALLBACK_CHUNK, stop - pos), pos)
        if not chunk:
            raise FetchFailed("blob file shorter than its size")
        await resp.write(chunk)
        pos += len(chunk)


async def send_fetch(request: web.Request, digest: Digest, fetch: Fetch) -> web.StreamResponse:
    """Serve a blob while it is being fetched, following the spool file; cut the connection on failure.

    Releases the caller's reader registration on ``fetch``.
    """
    try:
        return await _send_fetch(request, digest, fetch)
    finally:
        fetch.release()


async def _send_fetch(request: web.Request, digest: Digest, fetch: Fetch) -> web.StreamResponse:
    resp = web.StreamResponse()
    blob_headers(resp, digest)
    start, end = _window(request, resp, fetch.size)
    if fetch.size is None:
        resp.enable_chunked_encoding()
    await resp.prepare(request)
    if request.method == "HEAD":
        await resp.write_eof()
        return resp
    try:
        async for chunk in fetch.stream(start, end):
            await resp.write(chunk)
    except FetchFailed as exc:
        request["dao.failure"] = str(exc)
        if request.transport is not None:
            request.transport.abort()  # aiohttp then sees a closed transport and writes nothing more
        return resp
    await resp.write_eof()
    return resp
