"""Test images built offline: real gzip'd tar layers, configs and manifests, byte-exact and digest-addressed.

A runnable image carries a static busybox (Debian ``busybox-static``) so ``docker run IMAGE true`` works.
Big layers are written to files, never held in memory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

BUSYBOX = Path("/bin/busybox")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


@dataclass
class Layer:
    path: Path  # the gzip'd tar, as stored in the registry
    digest: str
    size: int
    diff_id: str  # sha256 of the uncompressed tar


@dataclass
class Image:
    """One manifest (image or index) plus every blob and child manifest it needs, ready to push."""

    manifest: bytes
    media_type: str
    blobs: dict[str, Path] = field(default_factory=dict)  # digest -> file
    children: list[Image] = field(default_factory=list)  # index entries, pushed by digest first

    @property
    def digest(self) -> str:
        return sha256(self.manifest)

    def layer_digests(self) -> list[str]:
        doc = json.loads(self.manifest)
        return [entry["digest"] for entry in doc.get("layers", [])]


def _tar_info(name: str, size: int = 0, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uid, info.gid = size, mode, 0, 0, 0
    return info


def build_layer(workdir: Path, name: str, members: list[tuple[str, bytes | Path | None, str | None]]) -> Layer:
    """members: (path in tar, content bytes or a file to stream or None for a dir, symlink target or None)."""
    tar_path = workdir / f"{name}.tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for member, content, link in members:
            if link is not None:
                info = _tar_info(member, mode=0o777)
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            elif content is None:
                info = _tar_info(member, mode=0o755)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(content, Path):
                with open(content, "rb") as f:
                    tar.addfile(_tar_info(member, content.stat().st_size, 0o755), f)
            else:
                tar.addfile(_tar_info(member, len(content)), io.BytesIO(content))
    diff_id = file_digest(tar_path)
    gz_path = workdir / f"{name}.tar.gz"
    with (
        open(tar_path, "rb") as src,
        open(gz_path, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz,
    ):
        shutil.copyfileobj(src, gz, 1 << 20)
    tar_path.unlink()
    return Layer(gz_path, file_digest(gz_path), gz_path.stat().st_size, diff_id)


def busybox_layer(workdir: Path) -> Layer:
    return build_layer(
        workdir,
        "busybox",
        [
            ("bin", None, None),
            ("bin/busybox", BUSYBOX, None),
            ("bin/true", None, "busybox"),
            ("bin/sh", None, "busybox"),
            ("bin/cat", None, "busybox"),
        ],
    )


def data_layer(workdir: Path, name: str, size: int) -> Layer:
    """A layer with one file of ``size`` incompressible (random) bytes; gzip cannot shrink it."""
    blob = workdir / f"{name}.bin"
    with open(blob, "wb") as f:
        remaining = size
        while remaining > 0:
            chunk = os.urandom(min(remaining, 1 << 20))
            f.write(chunk)
            remaining -= len(chunk)
    layer = build_layer(workdir, name, [("data", None, None), (f"data/{name}.bin", blob, None)])
    blob.unlink()
    return layer


def write_blob(workdir: Path, data: bytes) -> tuple[str, Path]:
    digest = sha256(data)
    path = workdir / digest.replace(":", "_")
    path.write_bytes(data)
    return digest, path


def image(
    workdir: Path, layers: list[Layer], *, oci: bool = False, arch: str = "amd64", cmd: list[str] | None = None
) -> Image:
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": cmd or ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created_by": "dao test fixture"} for _ in layers],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_digest, config_path = write_blob(workdir, config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST if oci else DOCKER_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG if oci else DOCKER_CONFIG,
            "size": len(config_bytes),
            "digest": config_digest,
        },
        "layers": [
            {"mediaType": OCI_LAYER if oci else DOCKER_LAYER, "size": layer.size, "digest": layer.digest}
            for layer in layers
        ],
    }
    blobs = {config_digest: config_path, **{layer.digest: layer.path for layer in layers}}
    return Image(json.dumps(manifest, indent=3).encode(), manifest["mediaType"], blobs)


def index(children: list[tuple[Image, str, str]], *, oci: bool = False) -> Image:
    """children: (image, os, architecture)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX if oci else DOCKER_LIST,
        "manifests": [
            {
                "mediaType": child.media_type,
                "size": len(child.manifest),
                "digest": child.digest,
                "platform": {"os": os_, "architecture": arch},
            }
            for child, os_, arch in children
        ],
    }
    return Image(json.dumps(doc, indent=3).encode(), doc["mediaType"], {}, [c for c, _, _ in children])
