"""A bounded cache: least recently used first, manifests go with their blobs, a plan removes exactly what its
dry run listed, and eviction running under concurrent pulls never breaks one."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
from pathlib import Path

import aiohttp

from dao.mirror.storage.base import Origin, Stored
from dao.oci.digest import Digest
from tests.conftest import World
from tests.mirror.test_faults import DOCKER_ACCEPT
from tests.services.mirror import DAO, Mirror

IMAGES = ["dao-test/schema2:v1", "dao-test/oci:v1", "library/tiny:v1"]


async def pull(mirror: Mirror, ref: str, world: World) -> None:
    """Manifest and every blob of ``ref`` through the mirror, bytes checked."""
    repo, tag = ref.split(":")
    image = world.image(ref)
    accept = DOCKER_ACCEPT + ", " + image.media_type
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{mirror.url}/v2/{repo}/manifests/{tag}", headers={"Accept": accept}) as r:
            assert r.status == 200 and await r.read() == image.manifest
        for digest in image.blobs:
            async with s.get(f"{mirror.url}/v2/{repo}/blobs/{digest}") as r:
                assert r.status == 200
                assert hashlib.sha256(await r.read()).hexdigest() == digest.split(":")[1], digest


def cache_size(data: Path) -> int:
    return sum(p.stat().st_size for d in ("blobs", "manifests") for p in (data / d).rglob("*") if p.is_file())


def gc(data: Path, *args: str) -> dict:
    out = subprocess.run(
        [DAO, "mirror", "gc", "--data-dir", str(data), "--json", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return json.loads(out)


async def test_dry_run_lists_lru_and_apply_removes_exactly_that(world: World, tmp_path: Path) -> None:
    mirror = Mirror(tmp_path / "m", world.upstream.url)
    try:
        for ref in IMAGES:  # schema2 is the least recently used; tiny the most
            await pull(mirror, ref, world)
            await asyncio.sleep(1.1)  # distinct last-use times (file mtimes have 1 s resolution on some filesystems)
        await pull(mirror, "library/tiny:v1", world)  # busybox layer used again, last
    finally:
        mirror.stop()  # a clean stop writes the last-use times it kept in memory
    data = mirror.data_dir
    before = cache_size(data)
    committed = mirror.committed_blobs()
    schema2 = world.image("dao-test/schema2:v1")
    target = before - 1_000_000  # forces the 1.5 MB layer of schema2, the oldest, out first
    dry = gc(data, "--dry-run", "--max-size", str(target))
    assert dry["cache_bytes"] == before and dry["removed"] == 0
    assert mirror.committed_blobs() == committed  # a dry run removes nothing
    blobs = [i["digest"] for i in dry["items"] if i["kind"] == "blob"]
    manifests = [i["digest"] for i in dry["items"] if i["kind"] == "manifest"]
    assert blobs and set(blobs) <= set(schema2.blobs)  # only the least recently used image's blobs
    assert "sha256:" + hashlib.sha256(schema2.manifest).hexdigest() in manifests  # gone together with them
    assert world.image("library/tiny:v1").layer_digests()[0] not in blobs  # busybox was used last

    done = gc(data, "--max-size", str(target))
    assert [i["digest"] for i in done["items"]] == [i["digest"] for i in dry["items"]]
    assert done["removed"] == len(done["items"])
    assert mirror.committed_blobs() == committed - set(blobs)
    assert cache_size(data) <= target
    tags = [json.loads(p.read_bytes())["digest"] for p in (data / "tags").rglob("*.json")]
    assert not set(manifests) & set(tags)  # no tag points at a manifest that is gone


async def test_server_keeps_the_cache_bounded_under_concurrent_pulls(world: World, tmp_path: Path) -> None:
    limit = 2_500_000
    mirror = Mirror(tmp_path / "m", world.upstream.url, args=("--cache-max", str(limit), "--gc-interval", "0.1"))
    try:
        for _ in range(3):  # every image, several clients at once, while eviction runs ten times a second
            await asyncio.gather(*(pull(mirror, ref, world) for ref in IMAGES for _ in range(2)))
        await asyncio.sleep(0.5)
        assert cache_size(mirror.data_dir) <= limit
        async with aiohttp.ClientSession() as s, s.get(f"{mirror.url}/metrics") as r:
            metrics = await r.text()
        evicted = next(line for line in metrics.splitlines() if line.startswith("dao_mirror_evictions_total"))
        assert float(evicted.split()[1]) > 0
    finally:
        mirror.stop()


async def test_partial_downloads_count_toward_the_limit(tmp_path: Path) -> None:
    """Blobs being fetched live in tmp/ and cannot be evicted, but they take the disk: with 3 MB being
    fetched (2 MB of it written) under a 3.5 MB limit, the 2 MB cached blob goes (before, only committed files
    were counted)."""
    from dao.mirror.eviction import Collector
    from dao.mirror.storage import FilesystemBlobStore, FilesystemManifestStore, FilesystemOrigins

    blobs = FilesystemBlobStore(tmp_path)  # the layout: blobs/, tmp/
    blob = os.urandom(2_000_000)
    digest = hashlib.sha256(blob).hexdigest()
    path = tmp_path / "blobs" / "sha256" / digest[:2] / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    collector = Collector(blobs, FilesystemManifestStore(tmp_path), FilesystemOrigins(tmp_path), max_bytes=3_500_000)
    assert (await collector.plan()).items == []
    fd = os.open(tmp_path / "tmp" / "partial", os.O_WRONLY | os.O_CREAT)
    os.pwrite(fd, os.urandom(1_000_000), 2_000_000)  # written out of order, as parallel ranges do
    os.pwrite(fd, os.urandom(1_000_000), 0)
    os.close(fd)
    plan = await collector.plan()
    assert 2_000_000 <= plan.spool_bytes <= 2_100_000  # what the disk holds, not the sparse file's length
    assert [(i.kind, i.digest) for i in plan.items] == [("blob", f"sha256:{digest}")]


class _MemoryStores:
    """A backend with no files at all (as an object store would be): blobs, manifests, origins in dicts."""

    def __init__(self) -> None:
        self.blobs: dict[str, Stored] = {}
        self.bodies: dict[str, list[str]] = {}  # manifest -> what it references
        self.manifests: dict[str, Stored] = {}
        self.origins: dict[str, set[Origin]] = {}
        self.reading: set[str] = set()
        self.recorded = 0

    async def listing(self) -> list[Stored]:
        return list(self.blobs.values())

    def in_use(self) -> set[str]:
        return set(self.reading)

    async def delete(self, digest: Digest) -> bool:
        return self.blobs.pop(str(digest), None) is not None

    async def record_uses(self) -> None:
        self.recorded += 1

    async def spool_bytes(self) -> int:
        return 0

    async def free_bytes(self) -> int | None:
        return None  # no disk to keep free


class _MemoryManifests:
    def __init__(self, stores: _MemoryStores) -> None:
        self.s = stores

    async def listing(self) -> list[Stored]:
        return list(self.s.manifests.values())

    async def references(self, digests: list[str]) -> dict[str, list[str]]:
        return {d: self.s.bodies.get(d, []) for d in digests}

    async def delete(self, digests: set[str]) -> int:
        return sum(self.s.manifests.pop(d, None) is not None for d in digests)


class _MemoryOrigins:
    def __init__(self, stores: _MemoryStores) -> None:
        self.s = stores

    async def forget(self, digest: str) -> None:
        self.s.origins.pop(digest, None)


async def test_eviction_needs_nothing_but_the_storage_protocols() -> None:
    """An object-store backend is collected like the filesystem: listing, last use, deletion, the blobs being
    read, through the Protocols alone (no path is ever built)."""
    from dao.mirror.eviction import Collector

    stores = _MemoryStores()
    d = [f"sha256:{i:064x}" for i in range(5)]
    for i, digest in enumerate(d[:4]):
        stores.blobs[digest] = Stored(digest, 1000, last_used=100.0 + i)  # d0 is the least recently used
        stores.origins[digest] = {Origin("docker.io", "library/x")}
    stores.manifests[d[4]] = Stored(d[4], 10, last_used=50.0)
    stores.bodies[d[4]] = [d[1]]  # d1 is referenced: it goes after the orphans, with its manifest
    stores.reading.add(d[2])  # being read: never a candidate
    collector = Collector(stores, _MemoryManifests(stores), _MemoryOrigins(stores), max_bytes=1500, min_free=10**12)
    plan = await collector.plan()
    assert plan.cache_bytes == 4010 and plan.target_bytes == 1500  # min_free means nothing without a disk
    assert [(i.kind, i.digest) for i in plan.items] == [
        ("blob", d[0]),
        ("blob", d[3]),
        ("blob", d[1]),
        ("manifest", d[4]),
    ]
    assert await collector.apply(plan) == 4
    assert set(stores.blobs) == {d[2]} and stores.manifests == {}
    assert set(stores.origins) == {d[2]}  # the origins of what went are forgotten
