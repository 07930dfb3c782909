"""One mirror, many registries: containerd's ``ns=``, path prefixes and aliases, per-registry host names, one
content-addressed store for all of them, and allow/deny rules. Two CNCF registries stand in for two
registries; the second one serves the same layers under another name."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from dao.mirror.app import wire
from dao.mirror.errors import MirrorError
from dao.mirror.routing import Router
from tests.conftest import World
from tests.mirror.test_faults import DOCKER_ACCEPT
from tests.services.dockerd import Dockerd
from tests.services.mirror import Mirror
from tests.services.upstream import Upstream

SECOND = "registry2.test"  # the second registry's name; only the mirror's config knows where it lives


@pytest.fixture(scope="module")
def second(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    upstream = Upstream(tmp_path_factory.mktemp("second-upstream"))
    try:
        upstream.push("other/app", "v1", world.image("dao-test/schema2:v1"))
        yield upstream
    finally:
        upstream.stop()


@pytest.fixture
def multi(world: World, second: Upstream, tmp_path: Path) -> Iterator[Mirror]:
    m = Mirror(
        tmp_path / "mirror",
        world.upstream.url,
        args=(
            "--registry",
            f"{SECOND}={second.url}",
            "--alias",
            f"r2={SECOND}",
            "--host",
            f"r2.mirror.test={SECOND}",
            "--deny",
            f"{SECOND}/other/secret*",
        ),
    )
    yield m
    m.stop()


async def get(url: str, **headers: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.get(url, headers={"Accept": DOCKER_ACCEPT, **headers}) as r:
        return r.status, await r.read()


def test_router_picks_the_registry() -> None:
    router = Router(
        docker_hub="https://hub.example",
        registries={"registry2.test": "http://127.0.0.1:1"},
        aliases={"r2": "registry2.test"},
        hosts={"r2.mirror.test": "registry2.test"},
        deny=("docker.io/evil/*",),
    )
    assert router.route(None, None, "nginx") == ("docker.io", "library/nginx")
    assert router.route(None, "docker.io", "nginx") == ("docker.io", "library/nginx")
    assert router.route(None, "registry-1.docker.io", "a/b") == ("docker.io", "a/b")
    assert router.route(None, "registry2.test", "nginx") == ("registry2.test", "nginx")  # no library/ there
    assert router.route(None, None, "docker.io/library/nginx") == ("docker.io", "library/nginx")
    assert router.route(None, None, "ghcr.io/org/app") == ("ghcr.io", "org/app")
    assert router.route(None, None, "r2/org/app") == ("registry2.test", "org/app")
    assert router.route("r2.mirror.test:5000", None, "org/app") == ("registry2.test", "org/app")
    for host, ns, name, status in [
        (None, "internal.corp", "x/y", 404),  # not a registry we proxy: never an open proxy
        (None, None, "169.254.169.254/latest/meta", 404),
        (None, None, "docker.io/evil/thing", 403),
        (None, None, "docker.io/x/../y", 400),
    ]:
        with pytest.raises(MirrorError) as info:
            router.route(host, ns, name)
        assert wire(info.value).status == status
    with pytest.raises(MirrorError, match=r"docker\.io/evil/\*"):
        router.route(None, None, "evil/thing")  # the message names the rule
    only = Router(docker_hub="https://hub.example", allow=("docker.io/library/*",))
    assert only.route(None, None, "nginx").repository == "library/nginx"
    with pytest.raises(MirrorError, match="allow rules"):
        only.route(None, None, "someone/app")


async def test_prefix_alias_host_and_ns_reach_the_second_registry(
    world: World, second: Upstream, multi: Mirror
) -> None:
    image = world.image("dao-test/schema2:v1")
    for url, headers in [
        (f"{multi.url}/v2/{SECOND}/other/app/manifests/v1", {}),
        (f"{multi.url}/v2/r2/other/app/manifests/v1", {}),
        (f"{multi.url}/v2/other/app/manifests/v1?ns={SECOND}", {}),
        (f"{multi.url}/v2/other/app/manifests/v1", {"Host": "r2.mirror.test"}),
    ]:
        assert await get(url, **headers) == (200, image.manifest), url
    assert (await get(f"{multi.url}/v2/other/app/manifests/v1"))[0] == 404  # Docker Hub has no other/app
    status, body = await get(f"{multi.url}/v2/{SECOND}/other/secret-app/manifests/v1")
    assert status == 403 and b"DENIED" in body and b"other/secret*" in body
    status, body = await get(f"{multi.url}/v2/unknown.example/x/manifests/v1")
    assert status == 404 and b"does not proxy" in body


def test_containerd_pulls_from_two_registries_and_stores_shared_layers_once(
    world: World, second: Upstream, dockerd: Dockerd, multi: Mirror, tmp_path: Path
) -> None:
    certs = tmp_path / "certs.d"
    for registry, server in [("docker.io", "https://registry-1.docker.io"), (SECOND, f"https://{SECOND}")]:
        (certs / registry).mkdir(parents=True)
        (certs / registry / "hosts.toml").write_text(
            f'server = "{server}"\n[host."http://127.0.0.1:{multi.port}"]\n  capabilities = ["pull", "resolve"]\n'
        )
    ctr = ["ctr", "--address", dockerd.containerd_address, "--namespace", "dao-test-ns"]
    refs = ["docker.io/dao-test/schema2:v1", f"{SECOND}/other/app:v1"]
    image = world.image("dao-test/schema2:v1")
    first_offset, second_offset = world.upstream.log_offset(), second.log_offset()
    try:
        for ref in refs:
            subprocess.run(
                [*ctr, "images", "pull", "--hosts-dir", str(certs), ref],
                check=True,
                capture_output=True,
                text=True,
                timeout=300,
            )
        listed = subprocess.run([*ctr, "images", "ls", "-q"], check=True, capture_output=True, text=True).stdout
        assert set(refs) <= set(listed.split())
    finally:
        for ref in refs:
            subprocess.run([*ctr, "images", "rm", ref], capture_output=True, timeout=60)
    assert any(f"ns={SECOND}" in a.path for a in multi.accesses())  # containerd named the registry with ns=
    fetched_first = {r.path.rsplit("/", 1)[1] for r in world.upstream.blob_gets(first_offset)}
    fetched_second = {r.path.rsplit("/", 1)[1] for r in second.blob_gets(second_offset)}
    layers = set(image.layer_digests())
    assert layers <= fetched_first
    assert not layers & fetched_second  # the same layers, already in the store: not fetched again
    assert layers <= multi.committed_blobs()  # one content-addressed copy of each


def test_docker_pulls_through_a_path_prefix(world: World, second: Upstream, dockerd: Dockerd, multi: Mirror) -> None:
    for ref in [f"127.0.0.1:{multi.port}/{SECOND}/other/app:v1", f"127.0.0.1:{multi.port}/docker.io/library/tiny:v1"]:
        dockerd.docker("pull", ref)
        run = dockerd.docker("run", "--rm", "--network", "none", ref, "true", check=False)
        assert run.returncode == 0, run.stderr
    paths = [a.path for a in multi.accesses() if "/manifests/" in a.path and a.status == 200]
    assert any(p.startswith(f"/v2/{SECOND}/other/app/") for p in paths)
    assert any(p.startswith("/v2/docker.io/library/tiny/") for p in paths)
