"""Real garbage on a real Docker engine, built the same way for the dao clean tests and bench/clean_vs_prune.

What :func:`make` leaves (names in ``Garbage.ids``): exited containers finished at different times (old-exit
before an engine restart, new-exit last), a container that never started, dangling images (app:1 re-tagged;
pulled:1 pushed to a registry and re-tagged, so its old image keeps a digest reference),
one whose only user is an exited container (app2:1), a dangling image labelled dao.keep=true (kept:1), unused
tagged images (unused-old:1, unused-new:1), anonymous volumes (one orphaned by ``docker rm`` without ``-v``,
one of an exited container, one of the running container), named volumes (keepvol in use, named-unused),
networks (keepnet in use, unused-net, kept-net labelled keep), a running container using base:1, keepvol and
keepnet, BuildKit cache no image shares, a broken image (broken:1, its layer directory deleted while the engine
was down), an image whose parent image is gone (orphaned:1, built by the classic builder), and the layers of
an image whose record never got written (ghost:1: what an engine killed mid-pull
leaves). ``extra`` adds that many more of each cheap kind (exited containers, dangling images, orphan anonymous
volumes, unused networks) for benchmarks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.services import images
from tests.services.dockerd import DOCKER_CLI, Dockerd
from tests.services.procs import Process, free_port, http_status, wait_until


@dataclass
class Garbage:
    ids: dict[str, str] = field(default_factory=dict)  # what was made: name -> id
    ghost_chains: list[str] = field(default_factory=list)  # orphan layer chains (interrupted pull)
    ghost_dirs: list[Path] = field(default_factory=list)  # their layerdb and graph driver directories
    broken_dir: Path | None = None  # the broken image's deleted layer directory


def layer_dirs(engine: Dockerd, chain: str) -> tuple[Path, Path]:
    layerdb = engine.data_root / "image" / "overlay2" / "layerdb" / "sha256" / chain.removeprefix("sha256:")
    cache_id = (layerdb / "cache-id").read_text().strip()
    return layerdb, engine.data_root / "overlay2" / cache_id


def _registry(workdir: Path) -> tuple[Process, int]:
    """A plain CNCF registry on loopback (which docker trusts over HTTP), to push to."""
    workdir.mkdir()
    port = free_port()
    config = workdir / "registry.yml"
    config.write_text(
        json.dumps(
            {
                "version": 0.1,
                "storage": {"filesystem": {"rootdirectory": str(workdir / "storage")}},
                "http": {"addr": f"127.0.0.1:{port}"},
            }
        )
    )
    proc = Process(["docker-registry", "serve", str(config)], workdir / "registry.log")
    wait_until(lambda: http_status(f"http://127.0.0.1:{port}/v2/") == 200, 15, "registry", proc.proc)
    return proc, port


def make(engine: Dockerd, work: Path, extra: int = 0) -> Garbage:
    h = Garbage()

    def docker(*args: str) -> str:
        return engine.docker(*args).stdout.strip()

    layers = work / "layers"
    layers.mkdir()

    def imported(ref: str, size: int, *changes: str) -> str:
        layer = images.data_layer(layers, ref.replace(":", "-").replace("/", "-"), size)
        args = [a for change in changes for a in ("--change", change)]
        return docker("import", *args, str(layer.path), ref)

    h.ids["base"] = docker("import", "--change", 'CMD ["/bin/sh"]', str(images.busybox_layer(layers).path), "base:1")
    # BuildKit's cache: build on base:1, then drop the image so the cache records are nobody's
    ctx = work / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM base:1\nCOPY blob /blob\n")
    (ctx / "blob").write_bytes(os.urandom(300_000))
    subprocess.run(
        [DOCKER_CLI, "-H", f"unix://{engine.sock}", "build", "--network", "none", "-t", "built:1", str(ctx)],
        env={**os.environ, "DOCKER_BUILDKIT": "1"},
        check=True,
        capture_output=True,
        timeout=300,
    )
    docker("rmi", "built:1")
    # the classic builder: orphaned:1 sits on an untagged build-step image, which the damage below deletes
    (ctx / "Dockerfile.classic").write_text("FROM base:1\nCOPY blob /blob\nCOPY blob /blob2\n")
    subprocess.run(
        [DOCKER_CLI, "-H", f"unix://{engine.sock}", "build", "--network", "none", "-f", str(ctx / "Dockerfile.classic"),
         "-t", "orphaned:1", str(ctx)],
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
        check=True,
        capture_output=True,
        timeout=300,
    )  # fmt: skip
    orphaned = json.loads(docker("image", "inspect", "orphaned:1"))[0]
    h.ids["orphaned"], step = orphaned["Id"], orphaned["Parent"]
    h.ids["broken"] = imported("broken:1", 300_000)
    h.ids["ghost"] = imported("ghost:1", 500_000)
    docker("run", "--name", "old-exit", "base:1", "true")
    ghost_doc = json.loads(docker("image", "inspect", "ghost:1"))[0]
    broken_doc = json.loads(docker("image", "inspect", "broken:1"))[0]
    ghost_chain = ghost_doc["RootFS"]["Layers"][0]  # one layer: its chain is its diff ID
    broken_chain = broken_doc["RootFS"]["Layers"][0]

    def damage() -> None:
        # broken:1 loses its layer's files; ghost:1 loses its image record but keeps its layers
        h.broken_dir = layer_dirs(engine, broken_chain)[1]
        shutil.rmtree(h.broken_dir)
        image_db = engine.data_root / "image" / "overlay2" / "imagedb"
        for gone in (h.ids["ghost"], step):  # ghost:1's record; orphaned:1's parent image
            (image_db / "content" / "sha256" / gone.removeprefix("sha256:")).unlink()
            shutil.rmtree(image_db / "metadata" / "sha256" / gone.removeprefix("sha256:"), ignore_errors=True)
        repos = engine.data_root / "image" / "overlay2" / "repositories.json"
        doc = json.loads(repos.read_text())
        del doc["Repositories"]["ghost"]
        repos.write_text(json.dumps(doc))
        h.ghost_chains.append(ghost_chain)
        h.ghost_dirs.extend(layer_dirs(engine, ghost_chain))

    engine.restart(damage)

    # a re-pulled tag: the old image keeps its digest reference (it came from a registry) but loses its tag,
    # the commonest dangling image on real hosts (docker counts it as dangling)
    registry = _registry(work / "registry")
    try:
        ref, mirrored = f"127.0.0.1:{registry[1]}/pulled:1", f"127.0.0.1:{registry[1]}/pulled-too:1"
        h.ids["pulled-old"] = imported(ref, 150_000)
        docker("tag", ref, mirrored)  # named by two repositories: the engine wants force to delete it by ID
        docker("push", ref)
        docker("push", mirrored)
        h.ids["pulled-new"] = imported(ref, 100_000)
        docker("tag", h.ids["pulled-new"], mirrored)
    finally:
        registry[0].stop()

    # images: re-tagging leaves the first app:1 dangling; app2's old image is used by an exited container
    h.ids["app-old"] = imported("app:1", 400_000)
    h.ids["app-new"] = imported("app:1", 100_000)
    h.ids["app2-old"] = imported("app2:1", 200_000, 'CMD ["/bin/true"]')
    docker("create", "--name", "uses-old", h.ids["app2-old"])
    h.ids["app2-new"] = imported("app2:1", 100_000)
    h.ids["kept-old"] = imported("kept:1", 100_000, "LABEL dao.keep=true")
    imported("kept:1", 100_000)
    h.ids["u-old"] = imported("unused-old:1", 2_000_000)
    h.ids["u-new"] = imported("unused-new:1", 100_000)

    # volumes and networks
    docker("volume", "create", "keepvol")
    docker("volume", "create", "named-unused")
    h.ids["hexnamed-vol"] = docker("volume", "create", os.urandom(32).hex())  # named, though it looks random
    docker("network", "create", "keepnet")
    h.ids["unused-net"] = docker("network", "create", "unused-net")
    docker("network", "create", "--label", "dao.keep=true", "kept-net")
    docker("run", "--name", "filler", "-v", "/data", "base:1", "sh", "-c", "cat /bin/busybox > /data/f")
    h.ids["filler-vol"] = json.loads(docker("inspect", "filler"))[0]["Mounts"][0]["Name"]
    docker("rm", "filler")  # without -v: its anonymous volume stays behind, orphaned
    docker("run", "--name", "with-anon", "-v", "/data", "base:1", "true")
    h.ids["with-anon-vol"] = json.loads(docker("inspect", "with-anon"))[0]["Mounts"][0]["Name"]
    docker("create", "--name", "never-started", "base:1")
    docker(
        "run", "-d", "--name", "running", "--network", "keepnet", "-v", "keepvol:/kv", "-v", "/anon",
        "base:1", "sh", "-c", "sleep 3600",
    )  # fmt: skip
    h.ids["running-vol"] = next(
        m["Name"] for m in json.loads(docker("inspect", "running"))[0]["Mounts"] if m["Destination"] == "/anon"
    )
    docker("run", "--name", "new-exit", "base:1", "true")
    for name in ("old-exit", "new-exit", "uses-old", "with-anon", "never-started", "running"):
        h.ids[name] = json.loads(docker("inspect", name))[0]["Id"]
    for i in range(extra):
        docker("run", "--name", f"extra-exit-{i}", "base:1", "true")
        imported(f"extra-{i}:1", 50_000)
        imported(f"extra-{i}:1", 50_000)
        docker("volume", "create", "--label", "com.docker.volume.anonymous=", os.urandom(32).hex())
        docker("network", "create", "--subnet", f"10.99.{i % 250}.0/24", f"extra-net-{i}")  # default pools: ~30
    return h
