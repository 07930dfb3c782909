"""Mirror nodes as one cluster (``--storage s3://`` on a real SeaweedFS, ``--redis`` on a real Redis): one
upstream transfer per blob across the nodes, another node's fetch read as it grows, a dead node's fetch taken
over, quotas over the sum of the nodes, one re-validation per tag, and each degraded mode."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from dao.mirror.accounts import Accounts
from tests.conftest import World
from tests.services.mirror import DAO, FaultProxy, Mirror, skopeo_copy
from tests.services.procs import free_port, until
from tests.services.redis import Redis
from tests.services.seaweed import Seaweed
from tests.services.upstream import Trickle

SECRET = "cluster-test-secret"
SMALL = "dao-test/schema2:v1"
BIG = "dao-test/big:v1"


@dataclass
class Parts:
    weed: Seaweed
    redis: Redis
    workdir: Path


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory, isolated: None) -> Iterator[Parts]:
    root = tmp_path_factory.mktemp("cluster")
    weed = Seaweed(root / "weed")
    try:
        redis = Redis(root / "redis")
        try:
            yield Parts(weed, redis, root)
        finally:
            redis.stop()
    finally:
        weed.stop()


class Cluster:
    """Nodes on one bucket prefix and one Redis, all with the same upstream (a relay the test controls)."""

    def __init__(self, parts: Parts, tmp_path: Path, upstream: str, prefix: str) -> None:
        self.parts, self.tmp_path, self.upstream, self.prefix = parts, tmp_path, upstream, prefix
        self.nodes: list[Mirror] = []
        self.relays: list[Trickle] = []
        subprocess.run(["redis-cli", "-p", str(parts.redis.port), "flushall"], check=True, capture_output=True)

    def node(self, name: str, *args: str, trickled: bool = False, redis: str | None = None) -> Mirror:
        """A node; ``trickled``: the other nodes reach it through a relay that delivers its answers in small
        pieces with pauses, as a long link does."""
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        if trickled:
            relay = Trickle(self.tmp_path, f"127.0.0.1:{port}")
            self.relays.append(relay)
            url = relay.url
        env = {**os.environ, **self.parts.weed.env, "DAO_MIRROR_CLUSTER_SECRET": SECRET}
        argv = ("--storage", f"s3://{self.parts.weed.bucket}/{self.prefix}", "--redis", redis or self.parts.redis.url,
                "--node-url", url, *args)  # fmt: skip
        node = Mirror(self.tmp_path / name, self.upstream, port=port, args=argv, env=env)
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        for relay in self.relays:
            relay.stop()


@pytest.fixture
def relay(world: World, tmp_path: Path) -> Iterator[FaultProxy]:
    """A slow upstream: a blob body comes at 2 MB/s per connection, so fetches overlap."""
    (tmp_path / "relay").mkdir()
    proxy = FaultProxy(tmp_path / "relay", world.upstream.url, "--rate", "2000000")
    yield proxy
    proxy.stop()


def upstream_bytes(world: World, since: int, digest: str) -> int:
    return sum(r.size for r in world.upstream.blob_gets(since, digest))


def test_clients_spread_over_three_nodes_get_each_blob_from_the_upstream_once(
    world: World, parts: Parts, tmp_path: Path, relay: FaultProxy
) -> None:
    cluster = Cluster(parts, tmp_path, relay.url, "once")
    try:
        nodes = [cluster.node("a", trickled=True), cluster.node("b"), cluster.node("c")]
        since = world.upstream.log_offset()
        with concurrent.futures.ThreadPoolExecutor(6) as pool:  # six clients at once, two on each node
            futures = [
                pool.submit(skopeo_copy, f"127.0.0.1:{nodes[i % 3].port}", SMALL, tmp_path / f"out{i}")
                for i in range(6)
            ]
            results = [f.result() for f in futures]
        for done in results:
            assert done.returncode == 0, done.stderr
        image = world.image(SMALL)
        for i in range(6):
            for digest, path in image.blobs.items():
                assert (tmp_path / f"out{i}" / digest.split(":")[1]).read_bytes() == path.read_bytes()
        for digest, path in image.blobs.items():  # each blob crossed the upstream link once, whole
            assert upstream_bytes(world, since, digest) == path.stat().st_size, digest
        caches = {a.cache for n in nodes for a in n.accesses() if "/blobs/" in a.path and a.method == "GET"}
        assert "node" in caches  # some client read another node's fetch while it ran
        for node in nodes:
            assert "Traceback" not in node.output()
    finally:
        cluster.stop()


async def read_blob(url: str, digest: str, stop_after: int | None = None) -> tuple[int, str, bool]:
    """GET a blob: bytes read, their sha256, whether the body was complete (False: the connection broke)."""
    hashed, got = hashlib.sha256(), 0
    timeout = aiohttp.ClientTimeout(total=120)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as s,
            s.get(f"{url}/v2/{BIG.split(':')[0]}/blobs/{digest}") as r,
        ):
            assert r.status == 200, r.status
            async for chunk in r.content.iter_chunked(256 * 1024):
                hashed.update(chunk)
                got += len(chunk)
                if stop_after is not None and got >= stop_after:
                    await asyncio.sleep(0)
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, ConnectionError):
        return got, hashed.hexdigest(), False
    return got, "sha256:" + hashed.hexdigest(), True


async def test_a_node_killed_mid_fetch_cuts_its_clients_and_another_node_goes_on_from_where_it_was(
    world: World, parts: Parts, tmp_path: Path
) -> None:
    """Node A fetches the big layer (its lease); B's client reads it through B from A's spool file. A is
    killed: A's client sees a broken body, B takes the lease once it expires and fetches the rest from the
    upstream from the byte it had, and a retry of A's client on C gets the right bytes."""
    image = world.image(BIG)
    digest = max(image.layer_digests(), key=lambda d: image.blobs[d].stat().st_size)
    size = image.blobs[digest].stat().st_size
    (tmp_path / "relay").mkdir()
    relay = FaultProxy(tmp_path / "relay", world.upstream.url, "--rate", "12000000")
    cluster = Cluster(parts, tmp_path, relay.url, "killed")
    try:
        a, b, c = (cluster.node(n, "--lease-ttl", "2", "--fetch-connections", "2") for n in "abc")
        since = world.upstream.log_offset()
        first = asyncio.create_task(read_blob(a.url, digest))
        await until(lambda: any(p.stat().st_size > 2_000_000 for p in a.spool_files()), 30, "fetch on A")
        second = asyncio.create_task(read_blob(b.url, digest))
        await until(lambda: any(p.stat().st_size > 0 for p in b.spool_files()), 30, "B reading A's fetch")
        a.kill()
        got, _, complete = await first
        assert not complete and got < size  # A's client: a cut body, never a short clean one
        got, sha, complete = await asyncio.wait_for(second, 120)
        assert complete and got == size and sha == digest
        log = b.output()
        assert f"gave up on {digest}: this node goes on from byte" in log
        resumed_at = int(log.split(f"gave up on {digest}: this node goes on from byte ")[1].split()[0])
        assert resumed_at > 0  # what B had was kept, not fetched again
        assert upstream_bytes(world, since, digest) < 2 * size
        got, sha, complete = await read_blob(c.url, digest)  # the client of A tries again, elsewhere
        assert complete and sha == digest
        for node in (b, c):
            assert "Traceback" not in node.output()
    finally:
        cluster.stop()
        relay.stop()


def readyz(node: Mirror) -> tuple[int, str]:
    import urllib.request

    with urllib.request.urlopen(node.url + "/readyz", timeout=10) as resp:
        return resp.status, resp.read().decode()


def test_with_redis_down_the_nodes_serve_alone_and_say_so(
    world: World, parts: Parts, tmp_path: Path, relay: FaultProxy
) -> None:
    own = Redis(tmp_path / "redis")  # (its own: this one is stopped)
    cluster = Cluster(parts, tmp_path, relay.url, "noredis")
    try:
        a, b = cluster.node("a", redis=own.url), cluster.node("b", redis=own.url)
        assert readyz(a) == (200, "ok\n")
        own.stop()
        done = skopeo_copy(f"127.0.0.1:{a.port}", SMALL, tmp_path / "via-a")
        assert done.returncode == 0, done.stderr
        status, text = readyz(a)
        assert status == 200 and text.startswith("degraded: redis down") and "local single-flight" in text
        assert "does not answer" in a.output() and "this node goes on alone" in a.output()
        done = skopeo_copy(f"127.0.0.1:{b.port}", SMALL, tmp_path / "via-b")  # (from the bucket A filled)
        assert done.returncode == 0, done.stderr
        own.start()
        deadline = time.monotonic() + 15
        while readyz(a) != (200, "ok\n") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert readyz(a) == (200, "ok\n")
        assert "answers again" in a.output()
        for node in (a, b):
            assert "Traceback" not in node.output()
    finally:
        cluster.stop()
        own.stop()


def test_with_the_bucket_down_hot_blobs_come_from_disk_and_misses_from_the_upstream(
    world: World, parts: Parts, tmp_path: Path, relay: FaultProxy
) -> None:
    bucket = Trickle(tmp_path, f"127.0.0.1:{parts.weed.port}", "--piece", "65536", "--pause", "0")
    cluster = Cluster(parts, tmp_path, relay.url, "nobucket")
    try:
        env = {**os.environ, **parts.weed.env, "DAO_MIRROR_CLUSTER_SECRET": SECRET}
        port = free_port()
        argv = ("--storage", f"s3://{parts.weed.bucket}/nobucket", "--s3-endpoint", bucket.url,  # (the flag wins)
                "--redis", parts.redis.url, "--node-url", f"http://127.0.0.1:{port}")  # fmt: skip
        node = Mirror(tmp_path / "node", relay.url, port=port, args=argv, env=env)
        cluster.nodes.append(node)
        assert skopeo_copy(f"127.0.0.1:{node.port}", SMALL, tmp_path / "fill").returncode == 0
        bucket.stop()
        since = world.upstream.log_offset()
        done = skopeo_copy(f"127.0.0.1:{node.port}", SMALL, tmp_path / "hot")
        assert done.returncode == 0, done.stderr
        assert world.upstream.blob_gets(since) == []  # every blob from the node's disk
        other = "dao-test/oci:v1"
        done = skopeo_copy(f"127.0.0.1:{node.port}", other, tmp_path / "miss")
        assert done.returncode == 0, done.stderr
        for digest, path in world.image(other).blobs.items():
            assert (tmp_path / "miss" / digest.split(":")[1]).read_bytes() == path.read_bytes()
        status, text = readyz(node)
        assert status == 200 and "degraded: bucket" in text and "does not answer" in text
        assert "kept on this node only" in node.output()
        assert "Traceback" not in node.output()
    finally:
        cluster.stop()
        bucket.stop()


async def usage(database: str) -> list[dict[str, int | str]]:
    proc = await asyncio.create_subprocess_exec(
        DAO, "mirror", "usage", "--json", "--database", database, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    return json.loads(out)


async def test_a_quota_holds_for_the_sum_over_the_nodes_redirected_bytes_included(
    world: World, parts: Parts, tmp_path: Path
) -> None:
    """Usage written to SQL only once a minute: what keeps a user under their quota across nodes is the
    shared counters. Node B redirects into the bucket, and the redirected bytes count as well."""
    image = world.image(BIG)
    digest = max(image.layer_digests(), key=lambda d: image.blobs[d].stat().st_size)
    size = image.blobs[digest].stat().st_size
    database = f"sqlite:///{tmp_path}/users.db"
    dave = Accounts(database).add_user("Dave", user_id="dave", quota_bytes=size * 3 // 2)
    cluster = Cluster(parts, tmp_path, world.upstream.url, "quota")
    try:
        common = ("--database", database, "--usage-flush", "60")
        a, b = cluster.node("a", *common), cluster.node("b", *common, "--redirect")
        auth = {"Authorization": f"Bearer {dave.token}"}
        path = f"/v2/dao-test/big/blobs/{digest}"
        async with aiohttp.ClientSession() as s:
            async with s.get(a.url + path, headers=auth) as r:
                assert r.status == 200 and len(await r.read()) == size  # 1.0 of 1.5 used
            await asyncio.sleep(2.5)  # the shared counters' sync
            async with s.get(b.url + path, headers=auth, allow_redirects=False) as r:
                assert r.status == 307  # under the quota still; the bucket sends it: 2.0 of 1.5 used
            await asyncio.sleep(2.5)
            async with s.get(a.url + path, headers=auth) as r:
                assert r.status == 429  # A saw B's redirected bytes, though neither wrote to SQL yet
                assert "quota" in (await r.text())
        rows = await usage(database)
        assert [r for r in rows if r["user"] == "dave"] == []  # (nothing written yet: SQL is not what held it)
    finally:
        cluster.stop()
    rows = await usage(database)
    assert sum(r["bytes_served"] for r in rows if r["user"] == "dave") == 2 * size  # a clean stop wrote it all


async def test_a_404_and_a_due_tag_cost_the_upstream_one_request_for_all_the_nodes(
    world: World, parts: Parts, tmp_path: Path
) -> None:
    cluster = Cluster(parts, tmp_path, world.upstream.url, "memo")
    try:
        ttl = ("--manifest-ttl", "2", "--manifest-swr", "0")
        nodes = [cluster.node(n, *ttl) for n in "abc"]
        accept = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
        async with aiohttp.ClientSession() as s:
            for node in nodes:
                async with s.get(f"{node.url}/v2/dao-test/schema2/manifests/v1", headers=accept) as r:
                    assert r.status == 200
            since = world.upstream.log_offset()
            for node in nodes:
                async with s.get(f"{node.url}/v2/dao-test/schema2/manifests/nope", headers=accept) as r:
                    assert r.status == 404
            blob = next(iter(world.image(SMALL).blobs))
            for headers in ({}, {"X-Dao-Node": "0" * 64}):  # the node-to-node endpoint wants the cluster's signature
                async with s.get(f"{nodes[0].url}/_dao/blobs/{blob}", headers=headers) as r:
                    assert r.status == 403
            async with s.get(f"{nodes[0].url}/_dao/blobs/sha256:nothex", headers={"X-Dao-Node": "x"}) as r:
                assert r.status == 400
            missing = [q for q in world.upstream.requests(since) if q.path.endswith("/manifests/nope")]
            assert len(missing) == 1  # the first node asked; the others remembered its answer
            await asyncio.sleep(2.2)  # the tag is due on every node
            since = world.upstream.log_offset()

            async def get(node: Mirror) -> int:
                async with s.get(f"{node.url}/v2/dao-test/schema2/manifests/v1", headers=accept) as r:
                    await r.read()
                    return r.status

            assert await asyncio.gather(*(get(n) for n in nodes)) == [200, 200, 200]
            checks = [q for q in world.upstream.requests(since) if q.path.endswith("/manifests/v1") and q.status != 401]
            assert [q.method for q in checks] == ["HEAD"]  # one re-validation for the three nodes
    finally:
        cluster.stop()


def test_gc_over_the_bucket_takes_the_least_recently_used_with_the_manifests_that_name_it(
    world: World, parts: Parts, tmp_path: Path
) -> None:
    """Two images through a node: the older one's blob goes, and its manifest and tag record with it; the
    newer one (its shared base layer included, used again since) stays whole in the bucket. The last uses
    come from the object the node wrote at its stop, not from a write per hit."""
    cluster = Cluster(parts, tmp_path, world.upstream.url, "gc")
    old, new = world.image("dao-test/oci:v1"), world.image(SMALL)
    try:
        node = cluster.node("a")
        assert skopeo_copy(f"127.0.0.1:{node.port}", "dao-test/oci:v1", tmp_path / "old").returncode == 0
        time.sleep(1.5)
        assert skopeo_copy(f"127.0.0.1:{node.port}", SMALL, tmp_path / "new").returncode == 0
    finally:
        cluster.stop()  # (a clean stop records the node's uses in the bucket)
    assert parts.weed.objects("gc/uses/")
    blobs = parts.weed.objects("gc/blobs/")
    manifests = parts.weed.objects("gc/manifests/")
    total = sum(blobs.values()) + sum(manifests.values())
    from tests.services.seaweed import ACCESS_KEY, SECRET_KEY

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # the settings alone name the bucket
    env |= {"DAO_MIRROR_S3_ENDPOINT": parts.weed.url, "DAO_MIRROR_S3_ACCESS_KEY": ACCESS_KEY,
            "DAO_MIRROR_S3_SECRET_KEY": SECRET_KEY}  # fmt: skip
    gc = [DAO, "mirror", "gc", "--storage", f"s3://{parts.weed.bucket}/gc", "--max-size", str(total - 1), "--json"]
    dry = json.loads(subprocess.run([*gc, "-d"], env=env, check=True, capture_output=True, text=True).stdout)
    assert parts.weed.objects("gc/blobs/") == blobs  # a dry run removes nothing
    done = json.loads(subprocess.run(gc, env=env, check=True, capture_output=True, text=True).stdout)
    assert [i["digest"] for i in done["items"]] == [i["digest"] for i in dry["items"]]  # it said what would go
    gone_blobs = {i["digest"] for i in done["items"] if i["kind"] == "blob"}
    gone_manifests = {i["digest"] for i in done["items"] if i["kind"] == "manifest"}
    only_old = set(old.blobs) - set(new.blobs)
    assert len(gone_blobs) == 1 and gone_blobs <= only_old  # the least recently used: the old image's
    assert gone_manifests == {old.digest}  # the manifest that named it went with it
    left = {"sha256:" + k.rsplit("/", 1)[1] for k in parts.weed.objects("gc/blobs/")}
    assert set(new.blobs) <= left and not gone_blobs & left
    assert f"gc/manifests/sha256/{old.digest.split(':')[1]}" not in parts.weed.objects("gc/manifests/")
    tags = parts.weed.objects("gc/tags/")
    assert tags and not any("/dao-test/oci/" in k for k in tags)  # its tag record too
    assert any("/dao-test/schema2/" in k for k in tags)
    assert len(parts.weed.objects("gc/uses/")) == 1  # the nodes' records folded into one
