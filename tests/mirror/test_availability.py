"""Staying quick and useful while the upstream is failing: circuit breaker, negative cache, index children."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from tests.conftest import World
from tests.mirror.test_faults import DOCKER_ACCEPT
from tests.services.mirror import FaultProxy, Mirror
from tests.services.procs import wait_until


async def get(url: str, accept: str = DOCKER_ACCEPT) -> tuple[int, dict[str, str], bytes, float]:
    started = time.monotonic()
    async with aiohttp.ClientSession() as s, s.get(url, headers={"Accept": accept}) as r:
        body = await r.read()
        return r.status, dict(r.headers), body, time.monotonic() - started


async def test_circuit_opens_after_failures_then_fails_fast_and_serves_stale(world: World, proxied) -> None:
    make, replace = proxied
    args = ("--manifest-ttl", "0", "--manifest-swr", "0", "--manifest-timeout", "1")
    proxy, mirror = make(mirror_args=(*args, "--breaker-failures", "2", "--breaker-cooldown", "2"))
    image = world.image("dao-test/schema2:v1")
    base = f"{mirror.url}/v2/dao-test/schema2/manifests"
    assert (await get(f"{base}/v1"))[0] == 200  # cached while all is well

    proxy = replace(proxy, "--manifest-stall", "30")
    for tag in ("nope1", "nope2"):  # each waits out the timeout: the failures that open the circuit
        status, _, _, took = await get(f"{base}/{tag}")
        assert status == 503 and took >= 0.9
    reached = len(proxy.requests("/manifests/nope3"))
    status, headers, body, took = await get(f"{base}/nope3")
    assert status == 503 and took < 0.9  # no wait for the timeout: the circuit is open
    assert b"UNAVAILABLE" in body and int(headers["Retry-After"]) >= 1
    assert len(proxy.requests("/manifests/nope3")) == reached  # the upstream was not even asked
    big = world.image("dao-test/big:v1").layer_digests()[-1]  # never fetched by this mirror
    status, headers, body, took = await get(f"{mirror.url}/v2/dao-test/big/blobs/{big}")
    assert status == 503 and took < 0.9 and "Retry-After" in headers
    assert not proxy.requests(f"/blobs/{big}")
    status, headers, body, took = await get(f"{base}/v1")  # cached: served stale at once
    assert (status, body) == (200, image.manifest) and took < 0.9
    assert headers["Warning"] == '110 dao "Response is Stale"'

    replace(proxy)  # upstream healthy again; after the cooldown one trial request closes the circuit
    await asyncio.sleep(2.2)
    status, _, body, _ = await get(f"{base}/v1")
    assert status == 200 and body == image.manifest
    assert [a.cache for a in mirror.accesses_to("/schema2/manifests/v1", 3)][-1] == "revalidated"


async def test_not_found_is_remembered_briefly(world: World, proxied) -> None:
    make, _ = proxied
    proxy, mirror = make(mirror_args=("--negative-ttl", "1.5"))
    url = f"{mirror.url}/v2/dao-test/schema2/manifests/missing"
    for _ in range(3):
        status, _, body, _ = await get(url)
        assert status == 404 and b"MANIFEST_UNKNOWN" in body
    assert [a.cache for a in mirror.accesses_to("/manifests/missing", 3)] == ["-", "negative", "negative"]
    asked = len(proxy.requests("/manifests/missing"))
    await asyncio.sleep(1.6)
    assert (await get(url))[0] == 404
    assert len(proxy.requests("/manifests/missing")) > asked  # forgotten after the TTL: asked again
    blob = f"{mirror.url}/v2/dao-test/schema2/blobs/sha256:{'0' * 64}"
    assert [(await get(blob))[0] for _ in range(2)] == [404, 404]
    assert len(proxy.requests(f"/blobs/sha256:{'0' * 64}")) <= 2  # the second answered from memory


async def test_index_children_are_cached_for_offline_pulls(world: World, proxied, tmp_path: Path) -> None:
    make, _ = proxied
    proxy, mirror = make(mirror_args=("--manifest-ttl", "0", "--manifest-swr", "0", "--manifest-timeout", "1"))
    index = world.image("dao-test/multi:v1")
    base = f"{mirror.url}/v2/dao-test/multi/manifests"
    status, _, body, _ = await get(f"{base}/v1")
    assert (status, body) == (200, index.manifest)
    children = {child.digest: child for child in index.children}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # fetched in the background, after the client got its answer
        if all(proxy.requests(f"/manifests/{d}") for d in children):
            break
        await asyncio.sleep(0.05)
    # The cache write follows the upstream answer: wait for each child's .type file (written last).
    hexes = [d.split(":", 1)[1] for d in children]
    stored = [mirror.data_dir / "manifests" / "sha256" / h[:2] / f"{h}.type" for h in hexes]
    await asyncio.to_thread(wait_until, lambda: all(p.exists() for p in stored), 10, "the children in the cache")
    proxy.kill()
    for digest, child in children.items():  # any platform, by digest, with the upstream gone
        status, headers, body, _ = await get(f"{base}/{digest}", accept=child.media_type)
        assert (status, body) == (200, child.manifest)
        assert headers["Docker-Content-Digest"] == digest
    status, headers, body, _ = await get(f"{base}/v1")
    assert (status, body) == (200, index.manifest) and "Warning" in headers


def test_children_fetch_can_be_switched_off(world: World, tmp_path: Path) -> None:
    proxy = FaultProxy(tmp_path, world.upstream.url)
    mirror = Mirror(tmp_path / "m", proxy.url, args=("--no-prefetch-children",))
    try:
        index = world.image("dao-test/multi:v1")
        assert asyncio.run(get(f"{mirror.url}/v2/dao-test/multi/manifests/v1"))[2] == index.manifest
        time.sleep(0.5)
        assert not any(proxy.requests(f"/manifests/{c.digest}") for c in index.children)
    finally:
        mirror.stop()
        proxy.stop()
