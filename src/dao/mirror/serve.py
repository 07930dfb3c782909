"""Putting blob bytes on the wire: ``Range`` parsing, ``sendfile`` for committed blobs, streaming for fetches.

Headers are the registry's: ``Docker-Content-Digest`` and ``ETag`` are the digest, ``Accept-Ranges: bytes``.
A stream that fails after the headers went out is cut (transport closed) so the client sees a body shorter
than ``Content-Length`` -- never a clean, short 200.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import select
import threading
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from dao.mirror.inflight import Fetch, FetchFailed
from dao.mirror.storage.base import LocalBlob
from dao.oci.digest import Digest
from dao.oci.errors import ErrorCode, RegistryError

_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")  # more digits than an int64 holds is no blob's range
SENDFILE_FALLBACK_CHUNK = 256 * 1024
SENDFILE_THREADS = 64  # concurrent cached-blob responses being written; more wait for a thread
SEND_STALL_TIMEOUT = 120.0  # seconds a client may read nothing before its response is abandoned
_POLL_MS = 500


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
        sock = transport.get_extra_info("socket") if transport is not None else None
        if transport is None or sock is None:
            raise ConnectionResetError("client went away")
        # The headers go first; from here the thread writes to the socket itself. They are a few hundred
        # bytes, so the transport almost always holds nothing by now and this never loops.
        while transport.get_write_buffer_size():  # noqa: ASYNC110 -- asyncio's transport has no "empty" event
            await asyncio.sleep(0.001)
        progress = [0]  # bytes the kernel took, updated by the sending thread
        try:
            await _sendfile_in_thread(sock.fileno(), blob.fd, start, count, progress)
        finally:
            request["dao.sent"] = progress[0]  # a client that hangs up is charged for what went out
        await resp.write_eof()
        return resp
    finally:
        blob.close()


async def _sendfile_in_thread(sock_fd: int, file_fd: int, offset: int, count: int, progress: list[int]) -> None:
    """``os.sendfile`` in a worker thread, so the kernel's copying runs on every core, not only the loop's.

    The thread owns duplicates of both descriptors and closes them itself: if the request is cancelled or the
    connection torn down meanwhile, neither number can be reused under it by another connection or file.
    """
    stop = threading.Event()
    sock_dup, file_dup = os.dup(sock_fd), os.dup(file_fd)
    loop = asyncio.get_running_loop()
    try:
        future = loop.run_in_executor(
            _sendfile_pool(), _sendfile_blocking, sock_dup, file_dup, offset, count, stop, progress
        )
    except BaseException:
        os.close(sock_dup)
        os.close(file_dup)
        raise
    try:
        await future
    except asyncio.CancelledError:
        stop.set()  # the thread gives up within a poll interval
        raise


def _sendfile_blocking(
    sock_fd: int, file_fd: int, offset: int, count: int, stop: threading.Event, progress: list[int]
) -> None:
    try:
        poller = select.poll()
        poller.register(sock_fd, select.POLLOUT)
        end = offset + count
        idle = 0.0
        while offset < end:
            if stop.is_set():
                raise ConnectionResetError("response cancelled")
            try:
                sent = os.sendfile(sock_fd, file_fd, offset, end - offset)
            except (BlockingIOError, InterruptedError):
                if poller.poll(_POLL_MS):
                    idle = 0.0
                else:
                    idle += _POLL_MS / 1000
                    if idle >= SEND_STALL_TIMEOUT:
                        raise TimeoutError(f"client read nothing for {SEND_STALL_TIMEOUT:.0f}s") from None
                continue
            if sent == 0:
                raise FetchFailed("blob file shorter than its size")
            offset += sent
            progress[0] += sent
    finally:
        os.close(sock_fd)
        os.close(file_fd)


@functools.cache
def _sendfile_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=SENDFILE_THREADS, thread_name_prefix="dao-sendfile")


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
    sent = 0
    try:
        async for chunk in fetch.stream(start, end):
            await resp.write(chunk)
            sent += len(chunk)
            request["dao.sent"] = sent
    except FetchFailed as exc:
        request["dao.failure"] = str(exc)
        if request.transport is not None:
            request.transport.abort()  # aiohttp then sees a closed transport and writes nothing more
        return resp
    await resp.write_eof()
    return resp
