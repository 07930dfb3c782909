"""Session-wide test world: one seeded upstream registry (with token auth), one dockerd, built once."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.services import images
from tests.services.dockerd import Dockerd
from tests.services.images import Image
from tests.services.procs import free_port
from tests.services.upstream import Upstream

BIG_LAYER_SIZE = int(os.environ.get("DAO_TEST_BIG_LAYER_MIB", "100")) * 1024 * 1024


def _isolated() -> bool:
    """Only loopback in this network namespace: nothing a test starts can reach the internet."""
    with open("/proc/net/dev") as f:  # per network namespace, unlike a /sys mounted outside it
        names = [line.split(":", 1)[0].strip() for line in f.readlines()[2:]]
    return names == ["lo"]


@pytest.fixture(scope="session")
def isolated() -> None:
    if not _isolated():
        pytest.fail(
            "service tests start docker/skopeo/containerd, which fall back to Docker Hub: run them in a private "
            "network namespace, e.g. 'make test' or 'tests/services/isolated.sh .venv/bin/pytest'",
            pytrace=False,
        )


@dataclass
class World:
    upstream: Upstream
    images: dict[str, Image]  # "repo:tag" -> image
    workdir: Path

    def image(self, ref: str) -> Image:
        return self.images[ref]


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory, isolated: None) -> Iterator[World]:
    root = tmp_path_factory.mktemp("world")
    layers_dir = root / "layers"
    layers_dir.mkdir()
    busybox = images.busybox_layer(layers_dir)
    built = {
        "dao-test/schema2:v1": images.image(
            layers_dir,
            [busybox, images.data_layer(layers_dir, "s2a", 300_000), images.data_layer(layers_dir, "s2b", 1_500_000)],
        ),
        "dao-test/oci:v1": images.image(layers_dir, [busybox, images.data_layer(layers_dir, "oci", 700_000)], oci=True),
        "dao-test/big:v1": images.image(layers_dir, [busybox, images.data_layer(layers_dir, "big", BIG_LAYER_SIZE)]),
    }
    amd64 = images.image(layers_dir, [busybox, images.data_layer(layers_dir, "amd", 200_000)])
    arm64 = images.image(layers_dir, [images.data_layer(layers_dir, "arm", 200_000)], arch="arm64")
    built["dao-test/multi:v1"] = images.index([(amd64, "linux", "amd64"), (arm64, "linux", "arm64")])
    built["library/tiny:v1"] = images.image(layers_dir, [busybox])
    upstream = Upstream(root / "upstream")
    try:
        for ref, image in built.items():
            repo, tag = ref.split(":")
            upstream.push(repo, tag, image)
        yield World(upstream, built, root)
    finally:
        upstream.stop()


@pytest.fixture(scope="session")
def segmented(world: World) -> Iterator[World]:
    """A second upstream (registry + token server) reached only through trickle relays: every answer, token
    and manifest included, arrives in 100-byte pieces with pauses, as over a long real link. Seeded with a
    schema2 image and the index."""
    upstream = Upstream(world.workdir / "segmented", segmented=True)
    try:
        refs = ("dao-test/schema2:v1", "dao-test/multi:v1")
        for ref in refs:
            repo, tag = ref.split(":")
            upstream.push(repo, tag, world.image(ref))
        yield World(upstream, {ref: world.image(ref) for ref in refs}, world.workdir)
    finally:
        upstream.stop()


@pytest.fixture(scope="session")
def docker_mirror_port() -> int:
    """The one mirror address the session's dockerd is configured with; each test starts its own mirror there."""
    return free_port()


@pytest.fixture(scope="session")
def dockerd_session(
    tmp_path_factory: pytest.TempPathFactory, isolated: None, docker_mirror_port: int
) -> Iterator[Dockerd]:
    engine = Dockerd(tmp_path_factory.mktemp("dockerd"), [f"http://127.0.0.1:{docker_mirror_port}"])
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def dockerd(dockerd_session: Dockerd) -> Iterator[Dockerd]:
    dockerd_session.reset()
    yield dockerd_session
    dockerd_session.reset()


@pytest.fixture
def named_hosts(isolated: None) -> Iterator[Callable[..., None]]:
    """Names that resolve to loopback, in this test's namespace only (its /etc/hosts is a private copy)."""
    hosts = Path("/etc/hosts")
    original = hosts.read_text()

    def resolve(*names: str) -> None:
        with hosts.open("a") as f:
            f.write(f"\n127.0.0.1 {' '.join(names)}\n")

    try:
        yield resolve
    finally:
        hosts.write_text(original)
