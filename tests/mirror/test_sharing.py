"""What one repository's cached content gives away through another: a digest fetched with the mirror's own
upstream credentials, or only for repositories the rules now deny, is served through another name only after
the upstream confirms it belongs there."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from tests.conftest import World
from tests.mirror.test_faults import DOCKER_ACCEPT
from tests.services import images
from tests.services.mirror import Mirror
from tests.services.upstream import PrivateRegistry


async def status(url: str, **headers: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, await r.read()


def upstream_heads(private: PrivateRegistry) -> list[str]:
    return [f"{r.path} {r.status}" for r in private.requests() if r.method == "HEAD"]


async def test_private_content_is_not_read_through_a_public_name(world: World, tmp_path: Path) -> None:
    private = PrivateRegistry(tmp_path / "private", "mirror", "s3cret")
    layers = tmp_path / "layers"
    layers.mkdir()
    busybox = images.busybox_layer(layers)
    secret = images.image(layers, [busybox, images.data_layer(layers, "secret", 50_000)])
    public = images.image(layers, [busybox, images.data_layer(layers, "public", 40_000)])
    private.push("org/secret", "v1", secret)
    private.push("org/public", "v1", public)
    mirror = Mirror(
        tmp_path / "mirror",
        private.url,
        args=("--upstream-username", "mirror"),
        env={"DAO_MIRROR_UPSTREAM_PASSWORD": "s3cret"},
    )
    try:
        hidden = secret.layer_digests()[1]
        base = secret.layer_digests()[0]
        for digest in (hidden, base):
            assert (await status(f"{mirror.url}/v2/org/secret/blobs/{digest}"))[0] == 200
        # the secret layer through the public repository: the upstream says it is not there, so neither are we
        code, body = await status(f"{mirror.url}/v2/org/public/blobs/{hidden}")
        assert code == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
        # a layer both have: confirmed upstream once, then served from the cache
        assert (await status(f"{mirror.url}/v2/org/public/blobs/{base}"))[0] == 200
        assert (await status(f"{mirror.url}/v2/org/public/blobs/{base}"))[0] == 200
        heads = upstream_heads(private)
        assert heads.count(f"/v2/org/public/blobs/{hidden} 404") == 1
        assert heads.count(f"/v2/org/public/blobs/{base} 200") == 1
        # manifests by digest too
        assert (await status(f"{mirror.url}/v2/org/secret/manifests/{secret.digest}", Accept=DOCKER_ACCEPT))[0] == 200
        code, _ = await status(f"{mirror.url}/v2/org/public/manifests/{secret.digest}", Accept=DOCKER_ACCEPT)
        assert code == 404
        # and the repository it came from is served from the cache without asking
        before = len(upstream_heads(private))
        assert (await status(f"{mirror.url}/v2/org/secret/blobs/{hidden}"))[0] == 200
        assert len(upstream_heads(private)) == before
    finally:
        mirror.stop()
        private.stop()


async def test_a_denied_origin_does_not_vouch_for_its_content(world: World, tmp_path: Path) -> None:
    image = world.image("dao-test/schema2:v1")
    own, shared = image.layer_digests()[2], image.layer_digests()[0]  # only schema2 has the first; oci has busybox
    mirror = Mirror(tmp_path / "mirror", world.upstream.url)
    for digest in (own, shared):
        assert (await status(f"{mirror.url}/v2/dao-test/schema2/blobs/{digest}"))[0] == 200
    mirror.stop()
    mirror = Mirror(tmp_path / "mirror", world.upstream.url, args=("--deny", "docker.io/dao-test/schema2"))
    try:
        offset = world.upstream.log_offset()
        assert (await status(f"{mirror.url}/v2/dao-test/oci/blobs/{own}"))[0] == 404
        assert (await status(f"{mirror.url}/v2/dao-test/oci/blobs/{shared}"))[0] == 200  # confirmed upstream
        heads = [(r.path, r.status) for r in world.upstream.requests(offset) if r.method == "HEAD" and r.status != 401]
        assert heads == [(f"/v2/dao-test/oci/blobs/{own}", 404), (f"/v2/dao-test/oci/blobs/{shared}", 200)]
        assert world.upstream.blob_gets(offset) == []  # both answers came from the cache or a HEAD
    finally:
        mirror.stop()
