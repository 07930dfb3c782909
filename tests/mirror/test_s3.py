"""The mirror on shared object storage: nodes with ``--storage s3://`` on a real SeaweedFS. What one node
fetched (verified) is in the bucket; another node with an empty disk and no upstream at all serves it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.conftest import World
from tests.services.dockerd import Dockerd
from tests.services.mirror import FaultProxy, Mirror, ctr_pulled, skopeo_copy
from tests.services.seaweed import Seaweed

REF = "dao-test/schema2:v1"


def test_a_second_node_with_an_empty_disk_and_no_upstream_serves_from_the_bucket(
    world: World, tmp_path: Path, isolated: None
) -> None:
    weed = Seaweed(tmp_path / "weed")
    env = {**os.environ, **weed.env}
    storage = ("--storage", f"s3://{weed.bucket}/mirror")
    try:
        since = world.upstream.log_offset()
        # The nodes' upstream (a relay to the registry, so that it can be taken away: the nodes name their
        # tag records by their upstream, which is one for all the nodes of a cluster).
        (tmp_path / "relay").mkdir()
        relay = FaultProxy(tmp_path / "relay", world.upstream.url)
        first = Mirror(tmp_path / "first", relay.url, args=storage, env=env)
        try:
            done = skopeo_copy(f"127.0.0.1:{first.port}", REF, tmp_path / "via-first")
            assert done.returncode == 0, done.stderr
        finally:
            first.stop()
            relay.stop()
        image = world.image(REF)
        manifest = json.loads(image.manifest)
        digests = [manifest["config"]["digest"], *(x["digest"] for x in manifest["layers"])]
        stored = list(weed.objects("mirror/blobs/"))
        assert sorted(stored) == sorted(f"mirror/blobs/sha256/{d.split(':')[1]}" for d in digests)
        assert any(k.startswith("mirror/tags/") for k in weed.objects("mirror/tags/"))

        # a new node: nothing on its disk, and its upstream gone
        second = Mirror(tmp_path / "second", relay.url, args=storage, env=env)
        try:
            out = tmp_path / "via-second"
            done = skopeo_copy(f"127.0.0.1:{second.port}", REF, out)
            assert done.returncode == 0, done.stderr
        finally:
            second.stop()
        for digest in digests:  # the right bytes, every one
            assert (out / digest.split(":")[1]).read_bytes() == image.blobs[digest].read_bytes()
        fetched = [r.path.rsplit("/", 1)[1] for r in world.upstream.blob_gets(since)]
        assert sorted(set(fetched)) == sorted(digests)  # the upstream served the first node only
        assert "Traceback" not in (tmp_path / "second" / "mirror.log").read_text()
    finally:
        weed.stop()


def test_docker_containerd_and_skopeo_follow_a_redirect_into_the_bucket(
    world: World, dockerd: Dockerd, tmp_path: Path, docker_mirror_port: int
) -> None:
    """With ``--redirect`` a node answers for a blob only the bucket has with a 307 to a presigned URL: the
    three clients fetch the bytes from the bucket, and none of them pass through the node."""
    weed = Seaweed(tmp_path / "weed")
    env = {**os.environ, **weed.env}
    storage = ("--storage", f"s3://{weed.bucket}/mirror")
    image = world.image(REF)
    try:
        filler = Mirror(tmp_path / "filler", world.upstream.url, args=storage, env=env)
        try:
            assert skopeo_copy(f"127.0.0.1:{filler.port}", REF, tmp_path / "fill").returncode == 0
        finally:
            filler.stop()
        node = Mirror(
            tmp_path / "node", world.upstream.url, port=docker_mirror_port, args=(*storage, "--redirect"), env=env
        )
        try:
            dockerd.docker("pull", REF)  # the engine's registry-mirrors is this node
            got = dockerd.docker("image", "inspect", "--format", "{{.Id}}", REF).stdout.strip()
            assert got == json.loads(image.manifest)["config"]["digest"]
            out = tmp_path / "skopeo"
            done = skopeo_copy(f"127.0.0.1:{node.port}", REF, out)
            assert done.returncode == 0, done.stderr
            for digest, path in image.blobs.items():
                assert (out / digest.split(":")[1]).read_bytes() == path.read_bytes()
            with ctr_pulled(dockerd.containerd_address, node.port, REF, tmp_path, "dao-redirect") as listed:
                assert image.digest in listed
            gets = [a for a in node.accesses() if a.method == "GET" and "/blobs/" in a.path]
            assert gets and {(a.status, a.cache) for a in gets} == {(307, "redirect")}  # no byte from the node
            redirected = {a.path.split("?")[0].rsplit("/", 1)[1] for a in gets}
            assert set(image.layer_digests()) <= redirected
        finally:
            node.stop()
    finally:
        weed.stop()
