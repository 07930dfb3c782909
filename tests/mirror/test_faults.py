"""What happens when things break: nothing wrong is ever cached, every reader sees the failure, the next
request recovers, and a warm cache keeps serving when the upstream is gone."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import re
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import World
from tests.services import images
from tests.services.mirror import FaultProxy, Mirror

DOCKER_ACCEPT = f"{images.DOCKER_MANIFEST}, {images.DOCKER_LIST}, {images.OCI_MANIFEST}, {images.OCI_INDEX}"
REPO = "dao-test/schema2"


def layer(world: World) -> tuple[str, bytes]:
    image = world.image(f"{REPO}:v1")
    digest = image.layer_digests()[2]  # the 1.5 MB one
    return digest, image.blobs[digest].read_bytes()


async def fetch(url: str) -> bytes:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200
        return await r.read()


async def read_until_broken(url: str) -> tuple[int, int | None]:
    """Read a blob whose transfer is expected to fail: (bytes received, declared length)."""
    received = 0
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in r.content.iter_chunked(65536):
                received += len(chunk)
        return received, r.content_length


async def read_and_kill(url: str, kill: Callable[[], None], after: int = 100_000) -> int:
    """Read a blob, call ``kill`` once ``after`` bytes arrived, and expect the transfer to break."""
    received, killed = 0, False
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in r.content.iter_chunked(65536):
                received += len(chunk)
                if received >= after and not killed:
                    kill()
                    killed = True
    return received


async def test_corrupt_upstream_body_is_never_cached(world: World, proxied) -> None:
    make, replace = proxied
    proxy, mirror = make("--flip-byte")
    digest, data = layer(world)
    url = f"{mirror.url}/v2/{REPO}/blobs/{digest}"
    results = await asyncio.gather(*(read_until_broken(url) for _ in range(3)))
    for received, declared in results:
        assert declared == len(data)
        assert received < len(data)  # the connection was cut: never a clean, short 200
    assert digest not in mirror.committed_blobs()
    assert mirror.spool_files() == []
    replace(proxy)
    assert await fetch(url) == data  # the next request retries upstream
    assert digest in mirror.committed_blobs()


async def test_cut_transfer_resumes_where_it_broke(world: World, proxied) -> None:
    make, _ = proxied
    proxy, mirror = make("--cut-after", "500000")  # every response body breaks after 500,000 bytes
    digest, data = layer(world)
    url = f"{mirror.url}/v2/{REPO}/blobs/{digest}"
    bodies = await asyncio.gather(*(fetch(url) for _ in range(3)))
    assert all(body == data for body in bodies)  # no gap, no repeat, for every client
    assert digest in mirror.committed_blobs()
    # Each broken request is asked again from its first missing byte; nothing is asked twice.
    ranges = proxy.blob_ranges(digest)
    assert ranges[0] == FIRST and all(not r.startswith("bytes=0-") for r in ranges[1:])
    assert len(ranges) >= 3 and len(set(ranges)) == len(ranges)  # 1.5 MB, 500,000 bytes per answer


async def test_upstream_killed_mid_blob_and_back_in_time(world: World, proxied) -> None:
    make, replace = proxied
    proxy, mirror = make("--rate", "400000")
    digest, data = layer(world)
    url = f"{mirror.url}/v2/{REPO}/blobs/{digest}"
    received = bytearray()
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        async for chunk in r.content.iter_chunked(65536):
            received += chunk
            if len(received) >= 100_000 and proxy.proc.alive():
                replace(proxy)  # killed, then a new one on the same port: the mirror resumes through it
    assert bytes(received) == data
    ranges = proxy.blob_ranges(digest)
    assert ranges[0] == FIRST and len(ranges) >= 2
    resumed_at = int(ranges[-1].removeprefix("bytes=").split("-")[0])
    assert 100_000 <= resumed_at < len(data)
    assert digest in mirror.committed_blobs()


async def test_upstream_gone_for_good_mid_blob(world: World, proxied) -> None:
    make, replace = proxied
    proxy, mirror = make("--rate", "400000")
    digest, data = layer(world)
    url = f"{mirror.url}/v2/{REPO}/blobs/{digest}"
    received = await read_and_kill(url, proxy.kill)  # resume attempts fail, then the client is cut
    assert 100_000 <= received < len(data)
    assert digest not in mirror.committed_blobs()
    assert mirror.spool_files() == []
    replace(proxy)
    assert await fetch(url) == data


FIRST = f"bytes=0-{1024 * 1024 - 1}"  # the first request of a cold blob (--fetch-split-mib 1)


def assert_tiled(proxy: FaultProxy, digest: str, size: int) -> None:
    """The upstream requests for ``digest`` cover it exactly, and every byte sent was kept."""
    spans = sorted(tuple(int(x) for x in r.removeprefix("bytes=").split("-")) for r in proxy.blob_ranges(digest))
    assert spans[0][0] == 0 and spans[-1][1] == size - 1
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end + 1 == start  # no overlap, no gap
    deadline = time.monotonic() + 5  # the proxy logs what it sent after its last write: maybe after we read it
    while len(proxy.blob_bytes_sent(digest)) < len(spans) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(proxy.blob_bytes_sent(digest)) == size  # not one byte sent upstream that was thrown away


def biggest_layer(world: World) -> tuple[str, bytes]:
    image = world.image("dao-test/big:v1")
    digest = max(image.layer_digests(), key=lambda d: image.blobs[d].stat().st_size)
    return digest, image.blobs[digest].read_bytes()


async def test_big_blob_comes_in_parallel_ranges(world: World, proxied) -> None:
    make, _ = proxied
    proxy, mirror = make(mirror_args=("--fetch-connections", "4"))
    digest, data = biggest_layer(world)
    url = f"{mirror.url}/v2/dao-test/big/blobs/{digest}"
    clients = await asyncio.gather(fetch(url), fetch(url))
    assert all(body == data for body in clients)
    ranges = proxy.blob_ranges(digest)
    assert ranges[0] == FIRST  # the first request; its 206 says the size and starts the other connections
    assert len(ranges) >= 4
    assert_tiled(proxy, digest, len(data))
    stored = next((mirror.data_dir / "blobs").glob(f"sha256/*/{digest.split(':')[1]}"))
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest.split(":")[1]


async def test_fetch_settings_reach_the_shared_fetches(world: World, proxied) -> None:
    """--fetch-connections 1: the 100 MiB layer in one stream. (An empty in-flight map is falsy, and each
    registry's proxy used to make its own with default settings: the flag did nothing, and two registries'
    fetches of one layer were not joined.)"""
    make, _ = proxied
    proxy, mirror = make(mirror_args=("--fetch-connections", "1"))
    digest, data = biggest_layer(world)
    assert await fetch(f"{mirror.url}/v2/dao-test/big/blobs/{digest}") == data
    assert proxy.blob_ranges(digest) == ["-"]  # one plain GET: nothing else will fetch, so nothing to bound


async def test_upstream_ignoring_range_gets_one_stream(world: World, proxied) -> None:
    make, _ = proxied
    proxy, mirror = make("--no-range", mirror_args=("--fetch-connections", "4"))
    digest, data = biggest_layer(world)
    assert await fetch(f"{mirror.url}/v2/dao-test/big/blobs/{digest}") == data
    # the first (bounded) request got the whole blob: read to its end, no probe, nothing thrown away
    assert proxy.blob_ranges(digest) == [FIRST]
    assert proxy.blob_bytes_sent(digest) == [len(data)]
    assert digest in mirror.committed_blobs()


async def test_client_range_on_a_blob_in_flight(world: World, proxied) -> None:
    make, _ = proxied
    proxy, mirror = make("--rate", "300000")
    digest, data = layer(world)
    url = f"{mirror.url}/v2/{REPO}/blobs/{digest}"
    async with aiohttp.ClientSession() as s:
        whole = asyncio.create_task(fetch(url))
        await asyncio.sleep(0.3)  # the fetch is under way, far from done at 300 kB/s
        async with s.get(url, headers={"Range": "bytes=100-299"}) as r:
            assert r.status == 206
            assert r.headers["Content-Range"] == f"bytes 100-299/{len(data)}"
            assert await r.read() == data[100:300]
        assert not whole.done()  # answered from the growing file, long before the blob is complete
        assert await whole == data
    assert_tiled(proxy, digest, len(data))  # one upstream transfer for both: the client's Range asked nothing


async def test_a_range_far_ahead_of_a_cold_fetch_is_fetched_first(world: World, proxied) -> None:
    make, _ = proxied
    proxy, mirror = make("--rate", "1000000", mirror_args=("--fetch-connections", "4"))
    digest, data = biggest_layer(world)
    url = f"{mirror.url}/v2/dao-test/big/blobs/{digest}"
    start = len(data) // 2 + 12345  # far ahead of every running chunk
    async with aiohttp.ClientSession() as s:
        whole = asyncio.create_task(fetch(url))
        await asyncio.sleep(1.0)  # the cold fetch is under way: its chunks taken from the front
        async with s.get(url, headers={"Range": f"bytes={start}-{start + 999_999}"}) as r:
            assert r.status == 206
            assert await r.read() == data[start : start + 1_000_000]
        assert not whole.done()  # 100 MiB at a few MB/s: far from done
        whole.cancel()  # the client hangs up: routine for the mirror, not an error
        with contextlib.suppress(asyncio.CancelledError):
            await whole
    wanted = [r for r in proxy.blob_ranges(digest) if r.startswith(f"bytes={start}-")]
    assert wanted, proxy.blob_ranges(digest)  # a helper started exactly where the client waited
    deadline = time.monotonic() + 5
    while not any(a.status == 499 for a in mirror.accesses()) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)  # another process's log file: nothing to wait on but the clock
    assert any(a.status == 499 for a in mirror.accesses())
    assert "unhandled error" not in mirror.output()


async def test_first_bytes_reach_the_client_before_the_blob_is_complete(world: World, proxied) -> None:
    make, _ = proxied
    _, mirror = make("--rate", "500000")
    digest, _data = layer(world)
    h = hashlib.sha256()
    committed_at_first_chunk = None
    async with aiohttp.ClientSession() as s, s.get(f"{mirror.url}/v2/{REPO}/blobs/{digest}") as r:
        async for chunk in r.content.iter_chunked(65536):
            if committed_at_first_chunk is None:
                committed_at_first_chunk = digest in mirror.committed_blobs()
            h.update(chunk)
    assert committed_at_first_chunk is False
    assert "sha256:" + h.hexdigest() == digest
    assert digest in mirror.committed_blobs()


async def test_mirror_killed_mid_fetch_leaves_nothing_wrong(world: World, tmp_path: Path) -> None:
    proxy = FaultProxy(tmp_path, world.upstream.url, "--rate", "400000")
    mirror = Mirror(tmp_path / "mirror", proxy.url)
    try:
        digest, data = layer(world)
        url = f"{mirror.url}/v2/{REPO}/blobs/{digest}"
        received = await read_and_kill(url, mirror.kill)
        assert 100_000 <= received < len(data)
        assert digest not in mirror.committed_blobs()
        assert len(mirror.spool_files()) == 1  # the partial download, invisible to readers
        mirror.upstream = world.upstream.url
        mirror.start()
        assert mirror.spool_files() == []
        assert await fetch(url) == data
        stored = next((mirror.data_dir / "blobs").glob(f"sha256/*/{digest.split(':')[1]}"))
        assert "sha256:" + hashlib.sha256(stored.read_bytes()).hexdigest() == digest
    finally:
        mirror.stop()
        proxy.stop()


async def test_warm_cache_serves_when_upstream_is_down(world: World, proxied) -> None:
    make, _ = proxied
    proxy, mirror = make(mirror_args=("--manifest-ttl", "0", "--manifest-swr", "0", "--manifest-timeout", "2"))
    image = world.image(f"{REPO}:v1")
    base = f"{mirror.url}/v2/{REPO}"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/manifests/v1", headers={"Accept": DOCKER_ACCEPT}) as r:
            assert r.status == 200 and "Warning" not in r.headers
        for digest in image.blobs:
            assert await fetch(f"{base}/blobs/{digest}") == image.blobs[digest].read_bytes()
        proxy.kill()
        async with s.get(f"{base}/manifests/v1", headers={"Accept": DOCKER_ACCEPT}) as r:
            assert r.status == 200
            assert await r.read() == image.manifest
            assert r.headers["Warning"].startswith("110 ")
        async with s.get(f"{base}/manifests/{image.digest}", headers={"Accept": DOCKER_ACCEPT}) as r:
            assert r.status == 200 and await r.read() == image.manifest
        for digest in image.blobs:
            assert await fetch(f"{base}/blobs/{digest}") == image.blobs[digest].read_bytes()
        async with s.get(f"{base}/manifests/never-seen", headers={"Accept": DOCKER_ACCEPT}) as r:
            assert r.status == 503
    assert [a.cache for a in mirror.accesses_to("/manifests/v1", 2)] == ["miss", "stale"]


@pytest.mark.parametrize(
    "fault",
    [("--manifest-status", "429"), ("--manifest-status", "503"), ("--manifest-stall", "30")],
    ids=["429", "503", "timeout"],
)
async def test_tag_served_stale_when_upstream_rate_limits_fails_or_stalls(
    world: World, proxied, fault: tuple[str, ...]
) -> None:
    make, replace = proxied
    proxy, mirror = make(mirror_args=("--manifest-ttl", "0", "--manifest-swr", "0", "--manifest-timeout", "1"))
    image = world.image(f"{REPO}:v1")
    url = f"{mirror.url}/v2/{REPO}/manifests/v1"
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers={"Accept": DOCKER_ACCEPT}) as r:
            assert r.status == 200 and "Warning" not in r.headers
        replace(proxy, *fault)
        async with s.get(url, headers={"Accept": DOCKER_ACCEPT}) as r:
            assert r.status == 200
            assert await r.read() == image.manifest
            assert r.headers["Warning"] == '110 dao "Response is Stale"'
            assert r.headers["Docker-Content-Digest"] == image.digest
        async with s.get(f"{mirror.url}/v2/{REPO}/manifests/v2", headers={"Accept": DOCKER_ACCEPT}) as r:
            body = await r.json()  # never cached: the upstream's answer, as an OCI error
            assert r.status == (429 if "429" in fault else 503), body
    assert [a.cache for a in mirror.accesses_to("/manifests/v1", 2)] == ["miss", "stale"]


async def test_new_fetches_are_bounded_per_client_address(world: World, proxied) -> None:
    """With one upstream fetch per client address: a second cold blob from 127.0.0.1 waits until its first is
    in; another address (127.0.0.2) is not held up by it. Every client gets its bytes."""
    make, _ = proxied
    proxy, mirror = make("--rate", "1000000", mirror_args=("--max-fetches-per-client", "1"))
    s2 = world.image(f"{REPO}:v1")
    first, second = s2.layer_digests()[2], s2.layer_digests()[1]  # 1.5 MB (1.5 s here), then 300 kB
    other = world.image("dao-test/oci:v1").layer_digests()[1]

    async def get(digest: str, repo: str, source: str) -> bytes:
        connector = aiohttp.TCPConnector(local_addr=(source, 0))
        async with (
            aiohttp.ClientSession(connector=connector) as s,
            s.get(f"{mirror.url}/v2/{repo}/blobs/{digest}") as r,
        ):
            assert r.status == 200
            return await r.read()

    slow = asyncio.create_task(get(first, REPO, "127.0.0.1"))
    await asyncio.sleep(0.3)  # its fetch holds 127.0.0.1's one slot
    bodies = await asyncio.gather(get(second, REPO, "127.0.0.1"), get(other, "dao-test/oci", "127.0.0.2"), slow)
    assert bodies[0] == s2.blobs[second].read_bytes() and bodies[2] == s2.blobs[first].read_bytes()
    assert bodies[1] == world.image("dao-test/oci:v1").blobs[other].read_bytes()
    log = proxy.log.read_text().splitlines()
    started_second = next(i for i, line in enumerate(log) if line.startswith(f"BLOB GET /v2/{REPO}/blobs/{second}"))
    started_other = next(i for i, line in enumerate(log) if line.startswith(f"BLOB GET /v2/dao-test/oci/blobs/{other}"))
    assert started_other < started_second  # 127.0.0.2 went ahead while 127.0.0.1's second blob waited
    assert [a.cache for a in mirror.accesses_to(second, 1)] == ["miss"]
    durations = re.findall(rf'blobs/{second}" 200 \d+ cache=miss ([\d.]+)ms', mirror.output())
    assert float(durations[0]) > 800  # 0.3 s of transfer, after ~1.2 s waiting for the first blob's slot
