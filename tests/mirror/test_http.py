"""The mirror's Registry API as a client sees it, against the real upstream registry."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket

import aiohttp
from multidict import CIMultiDict

from tests.conftest import World
from tests.services import images
from tests.services.mirror import Mirror
from tests.services.procs import wait_until
from tests.services.upstream import serve_in_process

DOCKER_ACCEPT = f"{images.DOCKER_MANIFEST}, {images.DOCKER_LIST}, {images.OCI_MANIFEST}, {images.OCI_INDEX}"


async def get(url: str, **headers: str) -> tuple[int, CIMultiDict[str], bytes]:
    async with aiohttp.ClientSession(auto_decompress=False) as s, s.get(url, headers=headers) as r:
        return r.status, r.headers.copy(), await r.read()


async def test_manifests_by_tag_and_digest_carry_exact_headers(world: World, mirror: Mirror) -> None:
    image = world.image("dao-test/schema2:v1")
    for ref in ("v1", image.digest):
        status, headers, body = await get(f"{mirror.url}/v2/dao-test/schema2/manifests/{ref}", Accept=DOCKER_ACCEPT)
        assert status == 200
        assert body == image.manifest
        assert headers["Docker-Content-Digest"] == image.digest
        assert headers["Content-Type"] == images.DOCKER_MANIFEST
        assert headers["Content-Length"] == str(len(image.manifest))
        assert headers["ETag"] == f'"{image.digest}"'
        assert headers["Docker-Distribution-API-Version"] == "registry/2.0"
    async with (
        aiohttp.ClientSession() as s,
        s.head(f"{mirror.url}/v2/dao-test/schema2/manifests/v1", headers={"Accept": DOCKER_ACCEPT}) as r,
    ):
        assert r.status == 200
        assert r.headers["Docker-Content-Digest"] == image.digest
        assert r.headers["Content-Length"] == str(len(image.manifest))


async def test_single_component_names_map_to_library(world: World, mirror: Mirror) -> None:
    image = world.image("library/tiny:v1")
    status, _headers, body = await get(f"{mirror.url}/v2/tiny/manifests/v1", Accept=DOCKER_ACCEPT)
    assert (status, body) == (200, image.manifest)


async def test_oci_manifest_keeps_its_media_type(world: World, mirror: Mirror) -> None:
    image = world.image("dao-test/oci:v1")
    status, headers, body = await get(f"{mirror.url}/v2/dao-test/oci/manifests/v1", Accept=DOCKER_ACCEPT)
    assert status == 200 and body == image.manifest
    assert headers["Content-Type"] == images.OCI_MANIFEST


async def test_accept_sets_never_get_each_others_manifest(world: World, mirror: Mirror) -> None:
    index = world.image("dao-test/multi:v1")
    amd64 = index.children[0]
    url = f"{mirror.url}/v2/dao-test/multi/manifests/v1"
    for _ in range(2):  # second round comes from the cache
        status, headers, body = await get(url, Accept=DOCKER_ACCEPT)
        assert (status, body, headers["Content-Type"]) == (200, index.manifest, images.DOCKER_LIST)
        status, headers, body = await get(url, Accept=images.DOCKER_MANIFEST)
        assert status == 200
        assert headers["Content-Type"] == images.DOCKER_MANIFEST
        assert body == amd64.manifest  # the registry chose the platform; we never hand out the list
        assert headers["Docker-Content-Digest"] == amd64.digest
    cached = mirror.accesses_to("/multi/manifests/v1", 4)
    assert [a.cache for a in cached] == ["miss", "miss", "hit", "hit"]


async def test_blob_cold_then_warm_with_ranges(world: World, mirror: Mirror) -> None:
    image = world.image("dao-test/schema2:v1")
    digest = image.layer_digests()[2]
    data = image.blobs[digest].read_bytes()
    url = f"{mirror.url}/v2/dao-test/schema2/blobs/{digest}"
    offset = world.upstream.log_offset()
    for _ in range(2):
        status, headers, body = await get(url)
        assert status == 200 and body == data
        assert headers["Docker-Content-Digest"] == digest
        assert headers["Content-Length"] == str(len(data))
    assert sum(r.size for r in world.upstream.blob_gets(offset, digest)) == len(data)  # sent once, in ranges
    assert [a.cache for a in mirror.accesses_to(digest, 2)] == ["miss", "hit"]
    assert digest in mirror.committed_blobs()

    status, headers, body = await get(url, Range="bytes=100-1099")
    assert (status, body) == (206, data[100:1100])
    assert headers["Content-Range"] == f"bytes 100-1099/{len(data)}"
    status, headers, body = await get(url, Range="bytes=-10")
    assert (status, body) == (206, data[-10:])
    status, headers, body = await get(url, Range=f"bytes={len(data)}-")
    assert status == 416 and json.loads(body)["errors"][0]["code"] == "RANGE_INVALID"
    assert headers["Content-Range"] == f"bytes */{len(data)}"
    status, _, body = await get(url, Range="pages=1-2")
    assert status == 416


async def test_blob_head_and_unknown_blob(world: World, mirror: Mirror) -> None:
    image = world.image("dao-test/schema2:v1")
    digest = image.layer_digests()[1]
    async with aiohttp.ClientSession() as s, s.head(f"{mirror.url}/v2/dao-test/schema2/blobs/{digest}") as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == str(image.blobs[digest].stat().st_size)
    missing = "sha256:" + "0" * 64
    status, _, body = await get(f"{mirror.url}/v2/dao-test/schema2/blobs/{missing}")
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
    status, _, body = await get(f"{mirror.url}/v2/dao-test/schema2/manifests/nope", Accept=DOCKER_ACCEPT)
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"


async def test_tags_list_passes_through(world: World, mirror: Mirror) -> None:
    status, _, body = await get(f"{mirror.url}/v2/dao-test/schema2/tags/list")
    assert status == 200
    assert json.loads(body) == {"name": "dao-test/schema2", "tags": ["v1"]}


def raw_request(port: int, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (no client-side path normalisation) and return status and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    response = b"".join(chunks)
    status = int(response.split(b" ", 2)[1])
    return status, response.split(b"\r\n\r\n", 1)[-1]


def error_code(body: bytes) -> str:
    return json.loads(body)["errors"][0]["code"]


def test_bad_input_gets_oci_errors(mirror: Mirror) -> None:
    def req(method: str, path: str, extra: str = "") -> tuple[int, bytes]:
        line = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}Content-Length: 0\r\n\r\n"
        return raw_request(mirror.port, line.encode())

    good = "sha256:" + "a" * 64
    cases = [
        ("GET", "/v2/UPPER/case/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2/a/../../etc/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2/a/%2e%2e/b/blobs/" + good, 400, "NAME_INVALID"),
        ("GET", "/v2/a//b/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2/a/b/blobs/md5:" + "a" * 32, 400, "DIGEST_INVALID"),
        ("GET", "/v2/a/b/blobs/sha256:../../../etc/passwd", 404, "NAME_UNKNOWN"),
        ("GET", "/v2/a/b/blobs/sha256:" + "A" * 64, 400, "DIGEST_INVALID"),
        ("GET", "/v2/a/b/blobs/sha256:abc", 400, "DIGEST_INVALID"),
        ("GET", "/v2/a/b/manifests/-bad-tag", 400, "TAG_INVALID"),
        ("PUT", "/v2/a/b/manifests/v1", 405, "UNSUPPORTED"),
        ("DELETE", "/v2/a/b/blobs/" + good, 405, "UNSUPPORTED"),
        ("POST", "/v2/a/b/blobs/uploads/", 405, "UNSUPPORTED"),
        ("PATCH", "/v2/a/b/blobs/uploads/123", 405, "UNSUPPORTED"),
    ]
    for method, path, status, code in cases:
        got_status, body = req(method, path)
        assert (got_status, error_code(body)) == (status, code), (method, path, body)
    status, _ = req("GET", "/v2/", extra="X-Big: " + "a" * 20000 + "\r\n")
    assert status in (400, 431)
    status, _ = req("GET", "/v2/" + "a/" * 6000 + "manifests/v1")
    assert status in (400, 414)
    assert "Traceback" not in mirror.output()


async def test_hostile_ranges_types_and_sniffing(world: World, mirror: Mirror, tmp_path) -> None:
    """A Range number of 5,000 digits is a 416 (int() refuses it: it was a 500 with a traceback), on a cold
    blob and a cached one; every answer says nosniff; an upstream's made-up mediaType never becomes our
    Content-Type; Accept junk does not make a cache key of its own."""
    image = world.image("dao-test/schema2:v1")
    digest = image.layer_digests()[1]
    url = f"{mirror.url}/v2/dao-test/schema2/blobs/{digest}"
    huge = "9" * 5000
    for _ in ("cold", "cached"):
        for header in (f"bytes={huge}-", f"bytes=0-{huge}", f"bytes=-{huge}", "bytes=1-2,3-4", "pages=1-2"):
            status, headers, body = await get(url, Range=header)
            assert status == 416 and error_code(body) == "RANGE_INVALID", (header, status)
            assert headers["X-Content-Type-Options"] == "nosniff"
        status, headers, _ = await get(url)
        assert status == 200 and headers["X-Content-Type-Options"] == "nosniff"
    assert "Traceback" not in mirror.output() and "unhandled" not in mirror.output()

    body = json.dumps({"schemaVersion": 2, "mediaType": "text/html", "config": {}, "layers": []}).encode()

    async def lying(request: aiohttp.web.Request) -> aiohttp.web.Response:
        if request.path == "/v2/":
            return aiohttp.web.json_response({})
        return aiohttp.web.Response(body=body, headers={"Content-Type": "text/html"})

    runner, url = await serve_in_process(lying)
    other = Mirror(tmp_path / "lying", url)
    try:
        for accept in (DOCKER_ACCEPT, "text/html", "x/" + "y" * 100):
            status, headers, got = await get(f"{other.url}/v2/x/y/manifests/v1", Accept=accept)
            assert status == 200 and got == body
            assert headers["Content-Type"] == images.OCI_MANIFEST  # what the body is, not what it claimed
        keys = sorted(p.name for p in (other.data_dir / "tags").rglob("*.json"))
        assert len(keys) == 2  # the real set, and one for all the junk (it means what no Accept means)
    finally:
        other.stop()
        await runner.cleanup()


async def test_eight_cold_clients_cost_one_upstream_transfer(world: World, mirror: Mirror) -> None:
    image = world.image("dao-test/big:v1")
    digest = image.layer_digests()[1]
    size = image.blobs[digest].stat().st_size
    assert size >= 100 * 1024 * 1024 or size >= 1024 * 1024  # full size unless shrunk for a quick local run
    offset = world.upstream.log_offset()

    async def client() -> str:
        h = hashlib.sha256()
        async with aiohttp.ClientSession() as s, s.get(f"{mirror.url}/v2/dao-test/big/blobs/{digest}") as r:
            assert r.status == 200
            async for chunk in r.content.iter_chunked(1 << 20):
                h.update(chunk)
        return "sha256:" + h.hexdigest()

    results = await asyncio.gather(*(client() for _ in range(8)))
    assert results == [digest] * 8
    # One fetch for all eight (in parallel ranges): the upstream sent the blob once, and (every request
    # bounded to the bytes it keeps) not a byte more: a mirror's uplink is billed by the byte.
    served = world.upstream.blob_gets(offset, digest)
    assert size <= sum(r.size for r in served) <= size * 1.01
    assert digest in mirror.committed_blobs()


async def test_tag_ttl_revalidates_with_head_and_follows_a_moved_tag(world: World, tmp_path) -> None:
    repo = "dao-test/moving"
    first = images.image(tmp_path, [images.data_layer(tmp_path, "move1", 1000)])
    second = images.image(tmp_path, [images.data_layer(tmp_path, "move2", 1000)])
    world.upstream.push(repo, "v1", first)
    fresh = Mirror(tmp_path / "fresh", world.upstream.url, args=("--manifest-ttl", "3600"))
    revalidating = Mirror(tmp_path / "reval", world.upstream.url, args=("--manifest-ttl", "0", "--manifest-swr", "0"))
    try:
        for m in (fresh, revalidating):
            assert (await get(f"{m.url}/v2/{repo}/manifests/v1", Accept=DOCKER_ACCEPT))[2] == first.manifest
        offset = world.upstream.log_offset()
        status, headers, body = await get(f"{revalidating.url}/v2/{repo}/manifests/v1", Accept=DOCKER_ACCEPT)
        assert body == first.manifest and "Warning" not in headers
        asked = [(r.method, r.status) for r in world.upstream.requests(offset) if "/manifests/" in r.path]
        assert asked == [("HEAD", 200)]  # one HEAD with the cached token, never a GET

        world.upstream.push(repo, "v1", second)
        assert (await get(f"{fresh.url}/v2/{repo}/manifests/v1", Accept=DOCKER_ACCEPT))[2] == first.manifest
        status, headers, body = await get(f"{revalidating.url}/v2/{repo}/manifests/v1", Accept=DOCKER_ACCEPT)
        assert (status, body) == (200, second.manifest)
        assert headers["Docker-Content-Digest"] == second.digest
        caches = [a.cache for a in revalidating.accesses_to(f"{repo}/manifests/v1", 3)]
        assert caches == ["miss", "revalidated", "miss"]
    finally:
        fresh.stop()
        revalidating.stop()


async def test_tag_past_ttl_is_answered_at_once_and_refreshed_behind(world: World, tmp_path) -> None:
    repo = "dao-test/swr"
    first = images.image(tmp_path, [images.data_layer(tmp_path, "swr1", 1000)])
    second = images.image(tmp_path, [images.data_layer(tmp_path, "swr2", 1000)])
    world.upstream.push(repo, "v1", first)
    mirror = Mirror(tmp_path / "swr", world.upstream.url, args=("--manifest-ttl", "0"))
    url = f"{mirror.url}/v2/{repo}/manifests/v1"
    try:
        assert (await get(url, Accept=DOCKER_ACCEPT))[2] == first.manifest
        offset = world.upstream.log_offset()
        status, headers, body = await get(url, Accept=DOCKER_ACCEPT)
        assert (status, body) == (200, first.manifest) and "Warning" not in headers

        def manifest_requests() -> list[tuple[str, int]]:
            return [(r.method, r.status) for r in world.upstream.requests(offset) if "/manifests/" in r.path]

        wait_until(lambda: manifest_requests() == [("HEAD", 200)], 5, "background HEAD")

        world.upstream.push(repo, "v1", second)
        offset = world.upstream.log_offset()
        status, headers, body = await get(url, Accept=DOCKER_ACCEPT)
        assert body == first.manifest  # answered from cache; the refresh runs behind
        for _ in range(50):  # the next clients get the moved tag once the refresh is in
            status, headers, body = await get(url, Accept=DOCKER_ACCEPT)
            if body == second.manifest:
                break
            await asyncio.sleep(0.1)
        assert (status, headers["Docker-Content-Digest"]) == (200, second.digest)
        assert ("GET", 200) in manifest_requests()
        caches = [a.cache for a in mirror.accesses_to(f"{repo}/manifests/v1", 4)]
        assert caches[0] == "miss" and set(caches[1:]) == {"swr"}
    finally:
        mirror.stop()


async def test_an_index_with_too_many_children_costs_a_bounded_prefetch(world: World, tmp_path) -> None:
    """The children of an index are fetched behind the client's back, at most 64 of them: an index listing
    70 does not make the mirror fetch 70 manifests."""
    from dao.mirror.children import MAX_CHILDREN

    layer = images.data_layer(tmp_path, "many", 100)  # one shared layer: cheap to seed 70 images
    children = [(images.image(tmp_path, [layer], arch=f"arch{i}"), "linux", f"arch{i}") for i in range(70)]
    world.upstream.push("dao-test/many", "v1", images.index(children))
    mirror = Mirror(tmp_path / "mirror", world.upstream.url)
    try:
        offset = world.upstream.log_offset()
        status, _, _ = await get(f"{mirror.url}/v2/dao-test/many/manifests/v1", Accept=DOCKER_ACCEPT)
        assert status == 200
        child_digests = {c.digest for c, _, _ in children}

        def fetched() -> set[str]:
            gets = [r.path for r in world.upstream.requests(offset) if r.method == "GET" and r.status == 200]
            return {p.rsplit("/", 1)[1] for p in gets if "/manifests/" in p} & child_digests

        wait_until(lambda: len(fetched()) >= MAX_CHILDREN, 30, "child manifests")
        await asyncio.sleep(0.5)
        assert len(fetched()) == MAX_CHILDREN == 64
        assert "caching the first 64" in mirror.output()
    finally:
        mirror.stop()
