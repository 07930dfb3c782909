"""The local accelerator (``dao mirror serve --local``): the engine's own pull through it, its accelerators
(``--via``), and peers: what they may ask, and a peer that lies."""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from dao.mirror.local import PEER_HEADER, peer_signer
from dao.oci.digest import Digest
from tests.conftest import World
from tests.services.dockerd import Dockerd
from tests.services.mirror import DAO, FaultProxy, Mirror
from tests.services.procs import free_port, wait_until

SECRET = "alice's peers share this secret"
PEER_ENV = {"DAO_MIRROR_PEER_SECRET": SECRET}


def get_blob(url: str, attempts: int = 3) -> bytes:
    """A blob as a client that retries a cut transfer (as the engine does) reads it."""
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=60) as resp:
                return resp.read()
        except (http.client.IncompleteRead, ConnectionError):
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def layers(world: World, ref: str) -> list[str]:
    return world.image(ref).layer_digests()


@pytest.fixture
def peer(world: World, tmp_path: Path) -> Iterator[tuple[Mirror, str]]:
    """A local accelerator serving peers on a port of its own, with schema2's layers in its cache."""
    port = free_port()
    m = Mirror(
        tmp_path / "peer",
        world.upstream.url,
        args=("--local", "--peer-listen", f"127.0.0.1:{port}"),
        env=PEER_ENV,
    )
    wanted = layers(world, "dao-test/schema2:v1")
    for digest in wanted:
        get_blob(f"{m.url}/v2/dao-test/schema2/blobs/{digest}")
    wait_until(lambda: set(wanted) <= m.committed_blobs(), 10, "the commits", m.proc.proc if m.proc else None)
    yield m, f"http://127.0.0.1:{port}"
    m.stop()


@pytest.mark.parametrize("step_aside", [True, False], ids=["near-accelerator-serves-the-engine", "no-step-aside"])
def test_docker_pull_through_the_local_accelerator_and_its_accelerator(
    world: World, dockerd: Dockerd, tmp_path: Path, docker_mirror_port: int, step_aside: bool
) -> None:
    """The accelerator here is on loopback and anonymous: by default the local accelerator sends the engine
    to it for each blob (a 307) and holds none; with --no-step-aside every blob goes through and into it."""
    ref = "dao-test/schema2:v1"
    hub = Mirror(tmp_path / "hub", world.upstream.url)  # the user's accelerator
    args = ("--local", "--via", hub.url, *(() if step_aside else ("--no-step-aside",)))
    local = Mirror(tmp_path / "local", world.upstream.url, port=docker_mirror_port, args=args)
    try:
        info = json.loads(urllib.request.urlopen(f"{local.url}/_dao/local", timeout=10).read())
        assert info["local"] is True and info["via"] == [hub.url]
        offset = world.upstream.log_offset()
        dockerd.docker("pull", ref)
        image = world.image(ref)
        repo_digests = json.loads(dockerd.docker("image", "inspect", "-f", "{{json .RepoDigests}}", ref).stdout)
        assert repo_digests == [f"dao-test/schema2@{image.digest}"]  # what docker records for Docker Hub
        run = dockerd.docker("run", "--rm", "--network", "none", ref, "true", check=False)
        assert run.returncode == 0, run.stderr
        wanted = set(layers(world, ref))
        answered = {a.path.rsplit("/", 1)[1]: a.status for a in local.accesses() if "/blobs/" in a.path}
        assert {d: answered.get(d) for d in wanted} == dict.fromkeys(wanted, 307 if step_aside else 200)
        through_hub = {
            a.path.rsplit("/", 1)[1]: a.size for a in hub.accesses() if "/blobs/" in a.path and a.status in (200, 206)
        }
        assert wanted <= set(through_hub)  # the accelerator was asked, not the registry
        if step_aside:  # the engine read every byte from it
            assert all(through_hub[d] == Path(image.blobs[d]).stat().st_size for d in wanted)
        assert any("/manifests/" in a.path for a in hub.accesses())
        for digest in wanted:  # each layer crossed the upstream's link once: the accelerator's fetch
            sent = sum(r.size for r in world.upstream.blob_gets(offset, digest))
            assert sent == Path(image.blobs[digest]).stat().st_size
        if step_aside:
            assert not wanted & local.committed_blobs()
        else:
            wait_until(lambda: wanted <= local.committed_blobs(), 10, "the commits")
    finally:
        local.stop()
        hub.stop()


def test_a_peer_that_sends_bad_bytes_is_blamed_and_left_out(
    world: World, tmp_path: Path, peer: tuple[Mirror, str]
) -> None:
    _, peer_url = peer
    liar = FaultProxy(tmp_path, peer_url, "--flip-byte", ready=(404,))
    local = Mirror(tmp_path / "local", world.upstream.url, args=("--local", "--peer", liar.url), env=PEER_ENV)
    try:
        image = world.image("dao-test/schema2:v1")
        big = max(layers(world, "dao-test/schema2:v1"), key=lambda d: Path(image.blobs[d]).stat().st_size)
        body = get_blob(f"{local.url}/v2/dao-test/schema2/blobs/{big}")
        assert "sha256:" + hashlib.sha256(body).hexdigest() == big
        assert liar.blob_bytes_sent(big)  # it did serve (bad) bytes of it
        log = local.output()
        assert f"{liar.url} sent corrupt bytes for {big}" in log
        # Left out from then on: the next blob it has is not asked of it.
        other = next(d for d in layers(world, "dao-test/schema2:v1") if d != big)
        asked = len(liar.requests())
        body = get_blob(f"{local.url}/v2/dao-test/schema2/blobs/{other}")
        assert "sha256:" + hashlib.sha256(body).hexdigest() == other
        assert len(liar.requests()) == asked
    finally:
        local.stop()
        liar.stop()


def test_a_peer_serves_only_cached_blobs_to_signed_requests(world: World, peer: tuple[Mirror, str]) -> None:
    _, peer_url = peer
    digest = layers(world, "dao-test/schema2:v1")[-1]
    signer = peer_signer(SECRET)

    def status(path: str, signature: str | None) -> int:
        headers = {PEER_HEADER: signature} if signature is not None else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(peer_url + path, headers=headers), timeout=10) as r:
                r.read()
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status(f"/_dao/peer/blobs/{digest}", signer.sign(Digest.parse(digest))) == 200
    assert status(f"/_dao/peer/blobs/{digest}", None) == 403
    assert (
        status(f"/_dao/peer/blobs/{digest}", peer_signer("another user's secret!!").sign(Digest.parse(digest))) == 403
    )
    missing = "sha256:" + "ab" * 32
    assert status(f"/_dao/peer/blobs/{missing}", signer.sign(Digest.parse(missing))) == 404
    assert status("/v2/dao-test/schema2/manifests/v1", signer.sign(Digest.parse(digest))) == 404
    assert status("/v2/", None) == 404


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (("--listen", "0.0.0.0:5999"), {}, "local listens on loopback only"),
        (("--peer", "http://10.0.0.9:5001"), {}, "peer, peers_file and peer_listen need peer_secret"),
        (("--peer", "ftp://x"), PEER_ENV, "via and peer must be http(s)://host[:port]"),
    ],
)
def test_local_settings_are_checked(args: tuple[str, ...], env: dict[str, str], message: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [DAO, "mirror", "serve", "--local", "--data-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", **env},
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_via_and_peer_need_local(tmp_path: Path) -> None:
    done = subprocess.run(
        [DAO, "mirror", "serve", "--via", "http://127.0.0.1:1", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "are for the local accelerator (--local)" in done.stderr


def test_an_image_manifest_starts_the_fetch_of_all_its_blobs(world: World, tmp_path: Path) -> None:
    """The engine asks for three layers at a time; the accelerator fetches them all as soon as it has served
    the manifest."""
    local = Mirror(tmp_path / "local", world.upstream.url, args=("--local",))
    try:
        ref = "dao-test/schema2:v1"
        image = world.image(ref)
        request = urllib.request.Request(
            f"{local.url}/v2/dao-test/schema2/manifests/v1", headers={"Accept": image.media_type}
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.read() == image.manifest
        config = json.loads(image.manifest)["config"]["digest"]
        wanted = {*layers(world, ref), config}
        wait_until(lambda: wanted <= local.committed_blobs(), 30, "the prefetched blobs")
        assert not [a for a in local.accesses() if "/blobs/" in a.path]  # nobody asked for a blob
        body = get_blob(f"{local.url}/v2/dao-test/schema2/blobs/{config}")
        assert "sha256:" + hashlib.sha256(body).hexdigest() == config
    finally:
        local.stop()
