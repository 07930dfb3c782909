"""Into the Docker engine: a docker-archive (``docker save`` format) streamed straight into ``/images/load``.

The archive is written on the fly -- tar headers, then each file's bytes from the content cache, no temporary
tarball -- and layers go in compressed, as downloaded (the engine decompresses them on load). Layers whose
chain ID the engine already has are left out of the archive: the classic image store never opens a layer file
whose chain it has (moby ``image/tarexport/load.go``). The containerd image store has no such shortcut, so
there every layer is sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tarfile
from collections.abc import AsyncIterator, Awaitable, Iterable
from pathlib import Path

from dao.aio import gather_bounded
from dao.docker import Engine

BLOCK = 512
READ_CHUNK = 1024 * 1024


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The layer chain IDs of an image (image spec: ChainID(L0..Ln) = sha256(ChainID(L0..Ln-1) + " " + DiffID(Ln)))."""
    out: list[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest())
    return out


async def engine_chain_ids(engine: Engine, at_once: int = 8) -> set[str]:
    """Every layer chain the engine holds, from its images' RootFS layers (one inspect per image, several at
    once: a host with hundreds of images answers in a fraction of a second)."""
    ids = [str(image.get("Id", "")) for image in await engine.images()]
    have: set[str] = set()
    for inspected in await gather_bounded(ids, engine.inspect_image, at_once):
        layers = ((inspected or {}).get("RootFS") or {}).get("Layers") or []
        have.update(chain_ids([str(layer) for layer in layers]))
    return have


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


async def docker_archive(
    config_name: str,
    config: bytes | Awaitable[bytes],
    repo_tags: list[str],
    layers: Iterable[tuple[str, Path | Awaitable[Path] | None]],
) -> AsyncIterator[bytes]:
    """The archive's bytes. ``layers``: (name in the archive, the cached file, None to leave it out, or an
    awaitable of the file: the archive waits for each layer in turn, so the engine unpacks the first layers
    while the last ones still download)."""
    layers = list(layers)
    if not isinstance(config, bytes):
        config = await config  # the archive may be opened before the config is in
    manifest = json.dumps([{"Config": config_name, "RepoTags": repo_tags, "Layers": [n for n, _ in layers]}])
    for name, data in (("manifest.json", manifest.encode()), (config_name, config)):
        yield _header(name, len(data)) + data + _padding(len(data))
    for name, entry in layers:
        if entry is None:
            continue
        path = entry if isinstance(entry, Path) else await entry
        f = await asyncio.to_thread(open, path, "rb")
        try:
            size = os.fstat(f.fileno()).st_size
            yield _header(name, size)
            while chunk := await asyncio.to_thread(f.read, READ_CHUNK):
                yield chunk
        finally:
            f.close()
        yield _padding(size)
    yield b"\0" * (2 * BLOCK)
