"""The registry client against the real token-auth registry, and against small peers that misbehave."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

from dao.oci.digest import Digest
from dao.registry.auth import Credentials
from dao.registry.client import RegistryClient, RetryPolicy
from dao.registry.errors import UpstreamNotFound, UpstreamRateLimited, UpstreamUnauthorized, UpstreamUnavailable
from tests.conftest import World
from tests.services import images

ACCEPT = (images.DOCKER_MANIFEST, images.DOCKER_LIST, images.OCI_MANIFEST, images.OCI_INDEX)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


def token_requests(world: World) -> list[dict]:
    return [json.loads(line) for line in world.upstream.token_log.read_text().splitlines()]


@pytest.fixture(params=["loopback", "segmented"])
def upstream_world(request: pytest.FixtureRequest) -> World:
    """The test world's upstream as loopback delivers it, and one whose every answer comes in 100-byte pieces
    (tokens, manifests and blob heads cut as a long link cuts them)."""
    return request.getfixturevalue("world" if request.param == "loopback" else "segmented")


async def test_bearer_flow_with_one_token_per_scope(upstream_world: World, session: aiohttp.ClientSession) -> None:
    world = upstream_world
    client = RegistryClient(world.upstream.url, session)
    before = len(token_requests(world))
    image = world.image("dao-test/schema2:v1")
    results = await asyncio.gather(*(client.get_manifest("dao-test/schema2", "v1", ACCEPT) for _ in range(5)))
    assert all(r.body == image.manifest and str(r.digest) == image.digest for r in results)
    digest = Digest.parse(image.layer_digests()[0])
    async with client.blob("dao-test/schema2", digest, start=10, end=19) as resp:
        assert resp.status == 206
        assert await resp.read() == image.blobs[str(digest)].read_bytes()[10:20]
    assert await client.head_blob("dao-test/schema2", digest) == image.blobs[str(digest)].stat().st_size
    new = token_requests(world)[before:]
    # the first requests race to the same challenge; all of them share one token request for the scope
    assert [t["scopes"] for t in new] == [["repository:dao-test/schema2:pull"]]
    assert not new[0]["admin"]
    await client.get_manifest("dao-test/multi", "v1", ACCEPT)
    assert len(token_requests(world)) == before + 2  # new scope, new token, fetched up front


async def test_wrong_credentials_and_missing_things(world: World, session: aiohttp.ClientSession) -> None:
    bad = RegistryClient(world.upstream.url, session, credentials=Credentials("admin", "wrong"))
    with pytest.raises(UpstreamUnauthorized):
        await bad.get_manifest("dao-test/schema2", "v1", ACCEPT)
    client = RegistryClient(world.upstream.url, session)
    with pytest.raises(UpstreamNotFound):
        await client.get_manifest("dao-test/schema2", "nope", ACCEPT)
    with pytest.raises(UpstreamNotFound):
        await client.head_blob("dao-test/schema2", Digest.of(b"not there"))


async def serve(handler: Callable) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def test_redirect_never_carries_authorization_to_another_host(session: aiohttp.ClientSession) -> None:
    seen: dict[str, str | None] = {}

    async def cdn(request: web.Request) -> web.Response:
        seen["cdn"] = request.headers.get("Authorization")
        return web.Response(body=b"blob-bytes")

    cdn_runner, cdn_url = await serve(cdn)

    async def registry(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Basic dTpw":
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        if request.path.startswith("/v2/a/blobs/"):
            seen["registry"] = request.headers.get("Authorization")
            raise web.HTTPTemporaryRedirect(cdn_url + "/data?sig=1")
        return web.Response(status=404)

    reg_runner, reg_url = await serve(registry)
    try:
        client = RegistryClient(reg_url, session, credentials=Credentials("u", "p"))
        async with client.blob("a", Digest.of(b"blob-bytes")) as resp:
            assert await resp.read() == b"blob-bytes"
        assert seen == {"registry": "Basic dTpw", "cdn": None}
    finally:
        await reg_runner.cleanup()
        await cdn_runner.cleanup()


async def test_retries_with_backoff_then_gives_up(session: aiohttp.ClientSession) -> None:
    statuses: list[int] = [503, 429]  # answered in turn, then 200
    calls: list[str] = []

    async def flaky(request: web.Request) -> web.Response:
        calls.append(request.path)
        if statuses:
            return web.Response(status=statuses.pop(0), headers={"Retry-After": "0"})
        return web.Response(body=b"{}", content_type="application/json")

    runner, url = await serve(flaky)
    try:
        client = RegistryClient(url, session, retry=RetryPolicy(attempts=3, base_delay=0.01))
        assert (await client.raw_get("/v2/x/tags/list", scope=""))[0] == 200
        assert len(calls) == 3
        statuses.append(429)
        client = RegistryClient(url, session, retry=RetryPolicy(attempts=1))
        with pytest.raises(UpstreamRateLimited):
            await client.get_manifest("x", "v1", ACCEPT)
    finally:
        await runner.cleanup()
    client = RegistryClient(url, session, retry=RetryPolicy(attempts=2, base_delay=0.01))
    with pytest.raises(UpstreamUnavailable):
        await client.ping()


async def test_manifest_digest_is_checked(session: aiohttp.ClientSession) -> None:
    body = b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}'

    async def lying(request: web.Request) -> web.Response:
        return web.Response(
            body=body + b" ", headers={"Docker-Content-Digest": str(Digest.of(body))}, content_type=images.OCI_MANIFEST
        )

    runner, url = await serve(lying)
    try:
        client = RegistryClient(url, session)
        with pytest.raises(UpstreamUnavailable, match="digest mismatch"):
            await client.get_manifest("x", "v1", ACCEPT)
        with pytest.raises(UpstreamUnavailable, match="digest mismatch"):
            await client.get_manifest("x", str(Digest.of(body)), ACCEPT)
    finally:
        await runner.cleanup()


def test_retry_after_in_seconds_and_as_a_date() -> None:
    from email.utils import formatdate

    from multidict import CIMultiDict, CIMultiDictProxy

    from dao.registry.client import _retry_after

    def parse(value: str) -> float | None:
        return _retry_after(CIMultiDictProxy(CIMultiDict({"Retry-After": value})))

    assert parse("2") == 2.0
    assert parse("-5") == 0.0
    assert parse("soon") is None
    import time

    in_ten = parse(formatdate(time.time() + 10, usegmt=True))
    assert in_ten is not None and 8 <= in_ten <= 10
