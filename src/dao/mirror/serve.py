"""Putting blob bytes on the wire: ``Range`` parsing, ``sendfile`` for committed blobs, streaming for fetches.

Headers are the registry's: ``Docker-Content-Digest`` and ``ETag`` are the digest, ``Accept-Ranges: bytes``.
A stream that fails after the headers went out is cut (transport closed) so the client sees a body shorter
than ``Content-Length`` -- never a clean, short 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import select
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from dao.config import MirrorConfig
from dao.mirror.inflight import Fetch, FetchFailed
from dao.mirror.state import state
from dao.mirror.storage.base import BlobIngester, LocalBlob
from dao.oci.digest import Digest
from dao.oci.errors import ErrorCode, RegistryError
from dao.units import parse_size

_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")  # more digits than an int64 holds is no blob's range
SENDFILE_FALLBACK_CHUNK = 256 * 1024
SENDFILE_THREADS = 16  # sendfile calls at once (each returns when its socket is full): the copying, not the waiting
SENDFILE_BURST = 64 * 1024 * 1024  # one thread hop sends at most this much, so a fast reader cannot hog a thread
FETCH_SPAN = 8 * 1024 * 1024  # a fetch's bytes are looked at again (replaced? more in?) at least this often
BURST_WAIT_MS = 20  # a full socket that drains within this is a fast reader's: waited for in the thread


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


Wanted = tuple[int, int | None] | None  # the request's Range as parse_range read it (None: the whole blob)


def _window(resp: web.StreamResponse, size: int | None, wanted: Wanted) -> tuple[int, int | None]:
    """Apply the request's Range to ``resp``; returns (start, inclusive end or None when size unknown)."""
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


def _reset(request: web.Request) -> None:
    """Close the client's connection with a reset: what sits in the kernel's buffers for it is dropped, not
    trickled out for minutes after the mirror gave up on it."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


@dataclass(frozen=True, slots=True)
class SendPolicy:
    """How slow a client may read. Every ``timeout`` seconds a response must have sent ``min_rate * timeout``
    bytes (and at least one): a reader that trickles or stops is cut, so it holds a connection for a bounded
    time and never a sending thread (those only run while the socket takes bytes)."""

    timeout: float = MirrorConfig.send_timeout
    min_rate: float = float(parse_size(MirrorConfig.min_send_rate))  # bytes/s, averaged over each window

    def window(self) -> _Window:
        return _Window(self)


class _Window:
    def __init__(self, policy: SendPolicy) -> None:
        self.policy = policy
        self.started = time.monotonic()
        self.sent = 0

    def deadline(self) -> float:
        """Seconds left in this window; raises TimeoutError when the client read too little in the last one."""
        now = time.monotonic()
        if now - self.started >= self.policy.timeout:
            wanted = max(1.0, self.policy.min_rate * self.policy.timeout)
            if self.sent < wanted:
                raise TimeoutError(
                    f"client read {self.sent} bytes in {self.policy.timeout:.0f}s, less than the "
                    f"{self.policy.min_rate:.0f} B/s the mirror asks of its clients"
                )
            self.started, self.sent = now, 0
        return self.policy.timeout - (now - self.started)


SEND_POLICY_KEY = web.AppKey("send_policy", SendPolicy)


def _policy(request: web.Request) -> SendPolicy:
    return request.app.get(SEND_POLICY_KEY) or SendPolicy()


async def send_stored(request: web.Request, digest: Digest, store: BlobIngester) -> web.StreamResponse:
    """A committed blob of ``store`` as the request's ``Range`` wants it; a plain 404 when it is not there
    (the internal endpoints: another node's, a peer's)."""
    local = await store.open(digest)
    if local is None:
        raise web.HTTPNotFound(text="not here\n")
    try:
        wanted = parse_range(request.headers.get("Range"), local.size)
    except RegistryError:
        local.close()
        raise
    return await send_local(request, digest, local, wanted)


async def send_local(request: web.Request, digest: Digest, blob: LocalBlob, wanted: Wanted) -> web.StreamResponse:
    """Serve a committed blob with zero-copy ``sendfile``; closes ``blob``."""
    try:
        resp = web.StreamResponse()
        blob_headers(resp, digest)
        start, end = _window(resp, blob.size, wanted)
        count = (end - start + 1) if end is not None else 0
        await resp.prepare(request)
        if request.method == "HEAD" or count == 0:
            await resp.write_eof()
            return resp
        sock_fd = await _raw_socket(request)
        progress = [0]  # bytes the kernel took
        try:
            await _sendfile(sock_fd, blob.fd, start, count, progress, _policy(request).window())
        except TimeoutError as exc:  # the client reads too slowly: cut it
            state(request).failure = str(exc)
            _reset(request)
            return resp
        finally:
            state(request).sent = progress[0]  # a client that hangs up is charged for what went out
        await resp.write_eof()
        return resp
    finally:
        blob.close()


async def _raw_socket(request: web.Request) -> int:
    """The client's socket, once the headers are out of the transport's buffer: from here it is written by
    ``sendfile``. They are a few hundred bytes, so the buffer almost always holds nothing by now and this
    never loops."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if transport is None or sock is None:
        raise ConnectionResetError("client went away")
    while transport.get_write_buffer_size():  # noqa: ASYNC110 -- asyncio's transport has no "empty" event
        await asyncio.sleep(0.001)
    return sock.fileno()


async def _sendfile(sock_fd: int, file_fd: int, offset: int, count: int, progress: list[int], window: _Window) -> None:
    """``os.sendfile`` in worker threads while the socket takes bytes (so the kernel's copying runs on every
    core, not only the loop's); waiting for a slow reader's socket to drain happens in the event loop, so a
    trickling client holds no thread and cannot starve the cache hits of everyone else.

    The threads and the wait use duplicates of both descriptors, closed here: if the request is cancelled or
    the connection torn down meanwhile, neither number can be reused under a running ``sendfile``.
    """
    loop = asyncio.get_running_loop()
    sock_dup, file_dup = os.dup(sock_fd), os.dup(file_fd)
    running: asyncio.Future[int] | None = None
    try:
        end = offset + count
        while offset < end:
            running = loop.run_in_executor(
                _sendfile_pool(), _sendfile_burst, sock_dup, file_dup, offset, end - offset, progress
            )
            sent = await asyncio.shield(running)  # a cancelled request waits for the burst, never frees fds under it
            running = None
            if sent:
                offset += sent
                window.sent += sent
                window.deadline()
                continue
            await _writable(loop, sock_dup, window.deadline())
    finally:
        if running is not None:  # cancelled mid-burst: the burst ends by itself (a non-blocking socket)
            with contextlib.suppress(BaseException):
                await running
        os.close(sock_dup)
        os.close(file_dup)


def _sendfile_burst(sock_fd: int, file_fd: int, offset: int, count: int, progress: list[int]) -> int:
    """Send while the socket keeps taking bytes: a full socket that drains within ``BURST_WAIT_MS`` (a fast
    reader) is waited for here, one that does not (a slow reader) sends the thread back to the pool, and the
    wait goes on in the event loop. At most ``SENDFILE_BURST`` bytes per call, so one fast reader cannot keep
    a thread from the others. Returns how many bytes went (0: the socket was full); ``progress`` counts them
    as they go, so a burst that ends in a broken pipe still tells what the client got."""
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    sent_total = 0
    limit = min(count, SENDFILE_BURST)
    while sent_total < limit:
        try:
            sent = os.sendfile(sock_fd, file_fd, offset + sent_total, limit - sent_total)
        except (BlockingIOError, InterruptedError):
            if not poller.poll(BURST_WAIT_MS):
                break
            continue
        if sent == 0:
            raise FetchFailed("blob file shorter than its size")
        sent_total += sent
        progress[0] += sent
    return sent_total


async def _writable(loop: asyncio.AbstractEventLoop, fd: int, seconds: float) -> None:
    """Wait in the event loop until ``fd`` (a duplicate of the client's socket) can take bytes, at most
    ``seconds``."""
    ready = loop.create_future()
    loop.add_writer(fd, lambda: ready.done() or ready.set_result(None))
    try:
        async with asyncio.timeout(seconds):
            await ready
    except TimeoutError:
        pass  # the window's check decides whether that was too slow
    finally:
        loop.remove_writer(fd)


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


async def send_fetch(request: web.Request, digest: Digest, fetch: Fetch, wanted: Wanted) -> web.StreamResponse:
    """Serve a blob while it is being fetched, following the spool file; cut the connection on failure.

    Releases the caller's reader registration on ``fetch``.
    """
    try:
        return await _send_fetch(request, digest, fetch, wanted)
    finally:
        fetch.release()


async def _send_fetch(request: web.Request, digest: Digest, fetch: Fetch, wanted: Wanted) -> web.StreamResponse:
    resp = web.StreamResponse()
    blob_headers(resp, digest)
    start, end = _window(resp, fetch.size, wanted)
    if fetch.size is None:
        resp.enable_chunked_encoding()
    await resp.prepare(request)
    if request.method == "HEAD":
        await resp.write_eof()
        return resp
    window = _policy(request).window()
    try:
        if fetch.size is not None:
            await _sendfile_fetch(request, fetch, start, end, window)
        else:
            await _stream_fetch(request, resp, fetch, start, end, window)
    except TimeoutError as exc:  # the client reads too slowly: cut it, it holds a connection and a fetch
        state(request).failure = str(exc)
        _reset(request)
        return resp
    except FetchFailed as exc:
        state(request).failure = str(exc)
        if request.transport is not None:
            request.transport.abort()  # aiohttp then sees a closed transport and writes nothing more
        return resp
    await resp.write_eof()
    return resp


async def _sendfile_fetch(request: web.Request, fetch: Fetch, start: int, end: int | None, window: _Window) -> None:
    """The fetch's spool file as its runs become sendable, by ``sendfile`` in worker threads (as a committed
    blob is): the event loop, which also receives the fetch's own bytes, neither copies nor sends them."""
    sock_dup = os.dup(await _raw_socket(request))  # the transport closes its own when the client goes
    progress = [0]
    try:
        async for pos, stop in fetch.spans(start, end, most=FETCH_SPAN):
            await _sendfile(sock_dup, fetch.fd, pos, stop - pos, progress, window)
    finally:
        os.close(sock_dup)
        state(request).sent = progress[0]


async def _stream_fetch(
    request: web.Request, resp: web.StreamResponse, fetch: Fetch, start: int, end: int | None, window: _Window
) -> None:
    """A blob of unknown size (chunked encoding: the transport frames it) through the response."""
    sent = 0
    async for chunk in fetch.stream(start, end):
        try:
            async with asyncio.timeout(window.deadline()):
                await resp.write(chunk)
        except TimeoutError:
            window.deadline()  # too slow: raises; else a new window begins (the chunk is in the buffer)
        sent += len(chunk)
        window.sent += len(chunk)
        state(request).sent = sent
