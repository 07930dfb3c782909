"""Unmodified clients pulling through the mirror: docker (registry-mirrors), skopeo (registries.conf) and
containerd's ctr (hosts.toml). All run in the test's private network namespace: a fallback to Docker Hub
would fail, not leave the machine."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import World
from tests.services.dockerd import Dockerd
from tests.services.mirror import FaultProxy, Mirror, ctr_pulled, skopeo_copy

RUNNABLE = ["dao-test/schema2:v1", "dao-test/oci:v1", "dao-test/multi:v1", "dao-test/big:v1"]


@pytest.fixture
def docker_mirror(world: World, tmp_path: Path, docker_mirror_port: int) -> Iterator[Mirror]:
    m = Mirror(tmp_path / "mirror", world.upstream.url, port=docker_mirror_port)
    yield m
    m.stop()


def served_blobs(mirror: Mirror) -> set[str]:
    return {
        a.path.split("?")[0].rsplit("/", 1)[1]
        for a in mirror.accesses()
        if "/blobs/" in a.path and a.status in (200, 206)
    }


@pytest.mark.parametrize("ref", RUNNABLE)
def test_docker_pulls_through_the_mirror_and_runs(
    world: World, dockerd: Dockerd, docker_mirror: Mirror, ref: str
) -> None:
    offset = world.upstream.log_offset()
    dockerd.docker("pull", ref)
    run = dockerd.docker("run", "--rm", "--network", "none", ref, "true", check=False)
    assert run.returncode == 0, run.stderr
    image = world.image(ref)
    target = image.children[0] if image.children else image  # docker picks linux/amd64 from the index
    expected = set(target.blobs) - {json.loads(target.manifest)["config"]["digest"]}
    assert expected <= served_blobs(docker_mirror)  # every layer came through dao
    fetched_upstream = {r.path.rsplit("/", 1)[1] for r in world.upstream.blob_gets(offset)}
    assert expected <= fetched_upstream
    repo_digests = dockerd.docker("image", "inspect", "-f", "{{json .RepoDigests}}", ref).stdout
    assert image.digest in repo_digests


def test_second_pull_is_served_from_cache(world: World, dockerd: Dockerd, docker_mirror: Mirror) -> None:
    ref = "dao-test/schema2:v1"
    dockerd.docker("pull", ref)
    dockerd.reset()
    offset = world.upstream.log_offset()
    dockerd.docker("pull", ref)
    assert world.upstream.blob_gets(offset) == []  # not one blob byte from upstream
    image = world.image(ref)
    layer_hits = [a for a in docker_mirror.accesses() if "/blobs/" in a.path and a.cache == "hit"]
    assert {a.path.rsplit("/", 1)[1] for a in layer_hits} >= set(image.layer_digests())


def test_docker_pull_works_with_upstream_down_after_warming(
    world: World, dockerd: Dockerd, tmp_path: Path, docker_mirror_port: int
) -> None:
    proxy = FaultProxy(tmp_path, world.upstream.url)
    mirror = Mirror(
        tmp_path / "mirror",
        proxy.url,
        port=docker_mirror_port,
        args=("--manifest-ttl", "0", "--manifest-swr", "0", "--manifest-timeout", "2"),
    )
    try:
        ref = "dao-test/oci:v1"
        dockerd.docker("pull", ref)
        dockerd.reset()
        proxy.kill()
        dockerd.docker("pull", ref)
        assert dockerd.docker("run", "--rm", "--network", "none", ref, "true").returncode == 0
        assert "stale" in [a.cache for a in mirror.accesses_to("/manifests/v1", 2)]
    finally:
        mirror.stop()
        proxy.stop()


def test_pull_through_a_stopped_mirror_cannot_leave_the_machine(dockerd: Dockerd) -> None:
    result = dockerd.docker("pull", "dao-test/schema2:v1", check=False, timeout=120)
    assert result.returncode != 0
    assert "127.0.0.9" in result.stderr or "connection refused" in result.stderr.lower()


def test_skopeo_copies_through_the_mirror(world: World, mirror: Mirror, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    done = skopeo_copy(f"127.0.0.1:{mirror.port}", "dao-test/schema2:v1", out)
    assert done.returncode == 0, done.stderr
    image = world.image("dao-test/schema2:v1")
    assert (out / "manifest.json").read_bytes() == image.manifest
    for digest, path in image.blobs.items():
        copied = out / digest.split(":")[1]
        assert hashlib.sha256(copied.read_bytes()).hexdigest() == digest.split(":")[1]
        assert copied.read_bytes() == path.read_bytes()
    assert set(image.blobs) <= served_blobs(mirror)


def test_containerd_pulls_through_hosts_toml(world: World, dockerd: Dockerd, mirror: Mirror, tmp_path: Path) -> None:
    with ctr_pulled(dockerd.containerd_address, mirror.port, "dao-test/multi:v1", tmp_path, "dao-test") as listed:
        assert world.image("dao-test/multi:v1").digest in listed
        amd64 = world.image("dao-test/multi:v1").children[0]
        assert set(amd64.layer_digests()) <= served_blobs(mirror)


def test_cold_pulls_over_a_segmented_link(
    segmented: World, dockerd: Dockerd, tmp_path: Path, docker_mirror_port: int
) -> None:
    """The field failure: an upstream whose token, manifest and blob answers arrive in 100-byte pieces (as
    over a long real link). docker pulls through the mirror cold, and runs the image; skopeo copies the
    index's platform through it byte for byte."""
    mirror = Mirror(tmp_path / "mirror", segmented.upstream.url, port=docker_mirror_port, args=("--log-format", "json"))
    try:
        relayed = [relay.connections() for relay in segmented.upstream.relays]
        ref = "dao-test/schema2:v1"
        pulled = dockerd.docker("pull", ref, check=False)
        assert pulled.returncode == 0, pulled.stderr
        assert dockerd.docker("run", "--rm", "--network", "none", ref, "true").returncode == 0
        image = segmented.image(ref)
        assert set(image.layer_digests()) <= served_blobs(mirror)
        # the token and the registry answers really came through the relays
        assert all(
            now > before
            for now, before in zip((r.connections() for r in segmented.upstream.relays), relayed, strict=True)
        )
        out = tmp_path / "copy"
        done = skopeo_copy(f"127.0.0.1:{mirror.port}", "dao-test/multi:v1", out)
        assert done.returncode == 0, done.stderr
        amd64 = segmented.image("dao-test/multi:v1").children[0]
        assert (out / "manifest.json").read_bytes() == amd64.manifest
        for digest, path in amd64.blobs.items():
            assert (out / digest.split(":")[1]).read_bytes() == path.read_bytes()
        # --log-format json: every line one object; access lines name the client program and the registry
        lines = [json.loads(line) for line in mirror.output().splitlines() if line.startswith("{")]
        assert lines and len(lines) == len(mirror.output().splitlines())
        blobs = [x for x in lines if "/blobs/" in x.get("path", "")]
        assert {x["user_agent"].split("/")[0] for x in blobs} == {"docker", "skopeo"}
        assert {x["registry"] for x in blobs} == {"docker.io"}
        first = blobs[0]
        assert set(first) >= {"time", "client", "user", "method", "path", "status", "bytes", "cache", "duration_ms"}
        assert first["client"] == "127.0.0.1" and first["method"] == "GET" and first["status"] == 200
    finally:
        mirror.stop()
