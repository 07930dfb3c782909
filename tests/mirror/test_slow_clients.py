"""Clients that read or write slowly, or hold many connections, cannot take the mirror from everyone else:
trickling readers hold no sending thread and are cut below a minimum rate; headers must arrive in time; one
address holds a bounded number of connections."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import aiohttp

from tests.conftest import World
from tests.services.mirror import Mirror


def big_layer(world: World) -> tuple[str, int]:
    image = world.image("dao-test/big:v1")
    digest = max(image.layer_digests(), key=lambda d: image.blobs[d].stat().st_size)
    return digest, image.blobs[digest].stat().st_size


async def warm(mirror: Mirror, digest: str, size: int) -> None:
    async with aiohttp.ClientSession() as s, s.get(f"{mirror.url}/v2/dao-test/big/blobs/{digest}") as r:
        assert r.status == 200 and len(await r.read()) == size


def slow_reader(port: int, path: str, source: str) -> socket.socket:
    """A client that asks for a blob and reads nothing: its socket buffer is small and stays full."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


async def test_trickling_readers_do_not_starve_cache_hits(world: World, tmp_path: Path) -> None:
    """70 readers from one address that read nothing: 64 get connections (the address's limit), none holds
    a sendfile thread while its socket is full, so a cache hit from another address comes at full speed."""
    digest, size = big_layer(world)
    mirror = Mirror(tmp_path / "m", world.upstream.url)
    socks: list[socket.socket] = []
    try:
        await warm(mirror, digest, size)
        path = f"/v2/dao-test/big/blobs/{digest}"
        socks = [slow_reader(mirror.port, path, "127.0.0.3") for _ in range(70)]
        await asyncio.sleep(1.0)  # all 64 admitted responses are under way, their sockets full
        started = time.monotonic()
        async with asyncio.timeout(20):
            await warm(mirror, digest, size)  # would wait for a free sendfile thread behind 64 stalled ones
        assert time.monotonic() - started < 10
        refused = 0
        for sock in socks:
            sock.setblocking(False)
            try:
                refused += sock.recv(1) == b""
            except BlockingIOError:
                pass
            except ConnectionResetError:
                refused += 1
        assert refused == 6  # over the 64 connections one address may hold
        assert "127.0.0.3 holds 64 connections, the most one address may: refused" in mirror.output()
    finally:
        for sock in socks:
            sock.close()
        mirror.stop()


async def test_a_reader_below_the_minimum_rate_is_cut(world: World, tmp_path: Path) -> None:
    digest, size = big_layer(world)
    mirror = Mirror(tmp_path / "m", world.upstream.url, args=("--send-timeout", "1", "--min-send-rate", "2MiB"))
    try:
        await warm(mirror, digest, size)
        sock = slow_reader(mirror.port, f"/v2/dao-test/big/blobs/{digest}", "127.0.0.1")
        received, started = 0, time.monotonic()
        sock.settimeout(10)
        while time.monotonic() - started < 15:
            try:
                chunk = sock.recv(4096)  # about 100 kB/s: far below 2 MiB/s
            except ConnectionResetError:
                break  # cut, and what the kernel held for us dropped
            if not chunk:
                break
            received += len(chunk)
            await asyncio.sleep(0.04)
        sock.close()
        assert received < size // 4  # cut long before the end
        assert time.monotonic() - started < 10
        deadline = time.monotonic() + 5
        while "less than the 2097152 B/s" not in mirror.output() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        assert "less than the 2097152 B/s the mirror asks of its clients" in mirror.output()
        await warm(mirror, digest, size)  # a reader at full speed is never cut
    finally:
        mirror.stop()


async def test_request_headers_must_arrive_in_time(world: World, tmp_path: Path) -> None:
    mirror = Mirror(tmp_path / "m", world.upstream.url, args=("--header-timeout", "1"))
    try:
        sock = socket.create_connection(("127.0.0.1", mirror.port), timeout=10)
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the mirror
        assert 0.8 < time.monotonic() - started < 5
        sock.close()
        idle = socket.create_connection(("127.0.0.1", mirror.port), timeout=10)  # says nothing at all
        assert idle.recv(1024) == b""
        idle.close()
        async with aiohttp.ClientSession() as s:
            for _ in range(2):  # one kept-alive connection, idle longer than the header timeout in between
                async with s.get(f"{mirror.url}/v2/") as r:
                    assert r.status == 200
                await asyncio.sleep(1.5)
    finally:
        mirror.stop()
