"""``/metrics``, ``/healthz`` and ``/readyz`` of a real mirror, after traffic whose numbers we know."""

from __future__ import annotations

import re

import aiohttp

from tests.conftest import World
from tests.mirror.test_faults import DOCKER_ACCEPT


async def fetch(url: str, **headers: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, await r.read()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample; labels given must match, others are ignored."""
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match[1] or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match[2])
    raise AssertionError(f"no sample {name} {labels} in metrics")


async def test_metrics_count_what_was_served_and_fetched(world: World, proxied) -> None:
    make, _ = proxied
    _, mirror = make("--ratelimit-remaining", "77;w=21600")
    image = world.image("dao-test/schema2:v1")
    digest = image.layer_digests()[2]
    size = image.blobs[digest].stat().st_size
    base = f"{mirror.url}/v2/dao-test/schema2"
    assert (await fetch(f"{base}/manifests/v1", Accept=DOCKER_ACCEPT))[0] == 200
    for _ in range(2):  # a miss, then a hit
        assert (await fetch(f"{base}/blobs/{digest}"))[0] == 200
    assert (await fetch(f"{base}/manifests/nope", Accept=DOCKER_ACCEPT))[0] == 404
    status, body = await fetch(f"{mirror.url}/metrics")
    assert status == 200
    text = body.decode()
    assert sample(text, "dao_mirror_requests_total", route="blobs", method="GET", status="200") == 2
    assert sample(text, "dao_mirror_requests_total", route="manifests", method="GET", status="404") == 1
    assert sample(text, "dao_mirror_served_bytes_total", cache="hit") == size
    assert sample(text, "dao_mirror_served_bytes_total", cache="miss") == size + len(image.manifest)
    assert sample(text, "dao_mirror_saved_bytes_total") == size
    assert sample(text, "dao_mirror_upstream_bytes_total", registry="docker.io") == size
    assert sample(text, "dao_mirror_inflight_fetches") == 0
    assert sample(text, "dao_mirror_circuit_state", registry="docker.io") == 0
    assert sample(text, "dao_mirror_upstream_ratelimit_remaining", registry="docker.io") == 77
    assert sample(text, "dao_mirror_upstream_request_seconds_count", registry="docker.io", kind="blob") == 1
    ratio = sample(text, "dao_mirror_cache_hit_ratio")
    assert abs(ratio - size / (2 * size + len(image.manifest))) < 1e-9
    hits = [a for a in mirror.accesses() if a.cache == "hit" and "/blobs/" in a.path]
    assert hits and hits[0].size == size  # the access log counts sendfile'd bytes too


async def test_health_and_readiness(world: World, mirror) -> None:
    assert await fetch(f"{mirror.url}/healthz") == (200, b"ok\n")
    assert await fetch(f"{mirror.url}/readyz") == (200, b"ok\n")
    spool = mirror.data_dir / "tmp"
    spool.rename(spool.with_name("tmp-away"))
    try:
        status, body = await fetch(f"{mirror.url}/readyz")
        assert status == 503 and b"not writable" in body
        assert (await fetch(f"{mirror.url}/healthz"))[0] == 200  # alive, just not ready
    finally:
        spool.with_name("tmp-away").rename(spool)
    assert (await fetch(f"{mirror.url}/readyz"))[0] == 200
