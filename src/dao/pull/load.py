"""Where a pulled image goes besides the engine: an OCI image layout directory or a docker-archive file.

(Into the engine, the layers stream through :func:`dao.engine.archive.docker_archive` to ``/images/load``.)
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from dao.oci.digest import Digest
from dao.oci.manifest import DOCKER_MANIFEST_V2, OCI_MANIFEST
from dao.pull.plan import PullError
from dao.registry.client import Manifest

REF_NAME = "org.opencontainers.image.ref.name"


_OCI_LAYER_TYPES = {
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": (
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
    ),
}


def as_oci(body: bytes, media_type: str) -> tuple[bytes, str]:
    """A Docker schema2 manifest rewritten with OCI media types (what OCI layout readers expect; the blobs
    are the same bytes, only the manifest -- and so its digest -- changes, as ``skopeo copy`` does)."""
    if media_type != DOCKER_MANIFEST_V2:
        return body, media_type
    doc = json.loads(body)
    doc["mediaType"] = OCI_MANIFEST
    doc["config"]["mediaType"] = "application/vnd.oci.image.config.v1+json"
    for layer in doc.get("layers", []):
        layer["mediaType"] = _OCI_LAYER_TYPES.get(layer.get("mediaType"), layer.get("mediaType"))
    return json.dumps(doc, separators=(",", ":")).encode(), OCI_MANIFEST


def parse_output(text: str) -> tuple[str, Path]:
    kind, sep, where = text.partition(":")
    if not sep or not where or kind not in ("oci", "docker-archive"):
        raise PullError(f"--output must be oci:DIR or docker-archive:FILE, got {text!r}")
    return kind, Path(where)


async def write_stream(stream: AsyncIterator[bytes], path: Path) -> None:
    """The archive into ``path`` through a temp file, so a failed pull leaves no half archive."""
    tmp = path.with_name(f".{path.name}.dao-tmp")
    f = await asyncio.to_thread(open, tmp, "wb")
    try:
        async for chunk in stream:
            await asyncio.to_thread(f.write, chunk)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise
    f.close()
    os.replace(tmp, path)


def write_oci_layout(root: Path, manifest: Manifest, blobs: dict[Digest, Path], tag: str | None) -> None:
    """An OCI image layout holding the platform's manifest, its config and layers (hard links where possible)."""
    blob_dir = root / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    for digest, path in blobs.items():
        target = blob_dir / digest.encoded
        if target.exists():
            continue
        try:
            os.link(path, target)
        except OSError:
            shutil.copyfile(path, target)
    body, media_type = as_oci(manifest.body, manifest.media_type)
    digest = Digest.of(body)
    (blob_dir / digest.encoded).write_bytes(body)
    entry: dict[str, object] = {"mediaType": media_type, "digest": str(digest), "size": len(body)}
    if tag:
        entry["annotations"] = {REF_NAME: tag}
    index_path = root / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"schemaVersion": 2, "manifests": []}
    index["manifests"] = [
        m
        for m in index.get("manifests", [])
        if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") != tag
    ] + [entry]
    index_path.write_text(json.dumps(index, indent=2))
