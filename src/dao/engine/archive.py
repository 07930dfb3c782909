"""The docker-archive format (what ``docker save`` writes and ``/images/load`` reads), written on the fly.

Tar headers, then each file's bytes from where it lies, no temporary tarball. Layers go in as they are
(compressed, as downloaded: the engine decompresses on load); a layer may be left out, which the classic image
store accepts when it already has the layer's chain (moby ``image/tarexport/load.go``).
"""

from __future__ import annotations

import asyncio
import json
import os
import tarfile
from collections.abc import AsyncIterator, Awaitable, Iterable
from pathlib import Path

BLOCK = 512
READ_CHUNK = 1024 * 1024


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
