"""The registry client against the real token-auth registry, and against small peers that misbehave."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from dao.oci.digest import Digest
from dao.registry.client import RegistryClient, RetryPolicy, registry_timeout
from dao.registry.credentials import Credentials
from dao.registry.errors import UpstreamNotFound, UpstreamRateLimited, UpstreamUnauthorized, UpstreamUnavailable
from tests.conftest import World
from tests.services import images
from tests.services.upstream import self_signed
from tests.services.upstream import serve_in_process as serve

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


async def test_redirects_and_challenges_that_are_refused(session: aiohttp.ClientSession) -> None:
    """A challenge from a host the registry redirected to is not followed (its realm would get our
    credentials); redirects into link-local or private addresses are refused before any connection, unless
    the registry is on one; an https registry's token realm must be https."""
    realms: list[str] = []

    async def cdn(request: web.Request) -> web.Response:
        realm = f"http://{request.host}/evil-token"
        return web.Response(status=401, headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="x"'})

    async def evil_token(request: web.Request) -> web.Response:
        realms.append(request.headers.get("Authorization", ""))
        return web.json_response({"token": "stolen"})

    async def cdn_host(request: web.Request) -> web.Response:
        return await (evil_token(request) if request.path == "/evil-token" else cdn(request))

    cdn_runner, cdn_url = await serve(cdn_host)

    async def registry(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Basic dTpw":
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        if "/blobs/" in request.path:
            raise web.HTTPTemporaryRedirect(cdn_url + "/data")
        if request.path.endswith("/metadata"):
            raise web.HTTPTemporaryRedirect("http://169.254.169.254/latest/meta-data/")
        raise web.HTTPTemporaryRedirect("http://inside.example/admin")

    reg_runner, reg_url = await serve(registry)
    try:
        client = RegistryClient(reg_url, session, credentials=Credentials("u", "p"))
        with pytest.raises(UpstreamUnauthorized):
            async with client.blob("a", Digest.of(b"cdn")):
                pass
        assert realms == []  # the CDN's challenge was not taken: no token request, no credentials sent
        with pytest.raises(UpstreamUnavailable, match=r"169\.254\.169\.254 refused: a link-local address"):
            await client.raw_get("/v2/a/metadata", scope="")

        async def private(host: str) -> list[str]:
            return {"inside.example": ["10.0.0.5"]}.get(host, ["127.0.0.1"])

        client.resolver = private  # what DNS would say; nothing is looked up or connected to
        with pytest.raises(UpstreamUnavailable, match=r"inside\.example refused: a private address"):
            await client.raw_get("/v2/a/other", scope="")
    finally:
        await reg_runner.cleanup()
        await cdn_runner.cleanup()
    from dao.registry.auth import Authenticator

    auth = Authenticator(session, Credentials("u", "p"), http_realm=False)  # an https registry's
    with pytest.raises(UpstreamUnauthorized, match="token realm must be https"):
        await auth.challenged('Bearer realm="http://127.0.0.1:9/token",service="s"', "repository:a:pull")


async def test_https_to_http_redirect_drops_authorization(tmp_path, session: aiohttp.ClientSession) -> None:
    """Same host, same default port pair (443 -> 80): only the scheme changes, and the credentials stay
    behind. (Ports 80 and 443 of this test's private network namespace.)"""
    import ssl

    from cryptography.hazmat.primitives.asymmetric import ec

    key_path, cert_path = self_signed(tmp_path, "tls", "127.0.0.1", ec.generate_private_key(ec.SECP256R1()))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert_path, key_path)
    seen: dict[str, str | None] = {}

    async def secure(request: web.Request) -> web.Response:
        seen["https"] = request.headers.get("Authorization")
        raise web.HTTPFound("http://127.0.0.1/v2/a/blobs/plain")

    async def plain(request: web.Request) -> web.Response:
        seen["http"] = request.headers.get("Authorization")
        return web.Response(body=b"{}")

    runners = []
    for handler, port, ctx in ((secure, 443, tls), (plain, 80, None)):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
        runners.append(runner)
    try:
        client = RegistryClient("https://127.0.0.1", session, credentials=Credentials("u", "p"), tls_verify=False)
        client.auth._basic = True  # as after a Basic challenge: the credentials go with every request
        await client.raw_get("/v2/a/blobs/x", scope="")
        assert seen == {"https": "Basic dTpw", "http": None}
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_waiting_for_a_pooled_connection_is_not_a_connect_timeout() -> None:
    """Three requests share one pooled connection to a registry that takes 0.4 s an answer: the last waits
    0.8 s for the connection, longer than the connect timeout, and that is our queue, not a dead upstream."""

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.4)
        return web.Response(body=b"{}", content_type="application/json")

    runner, url = await serve(slow)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as one:
            client = RegistryClient(url, one, retry=RetryPolicy(attempts=1), timeout=registry_timeout(0.3, 5))
            answers = await asyncio.gather(*(client.raw_get("/v2/x/tags/list", scope="") for _ in range(3)))
        assert [status for status, _, _ in answers] == [200, 200, 200]
    finally:
        await runner.cleanup()
